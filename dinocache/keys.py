"""Sample keys: their syntax, and the only way a key becomes a path.

A key is the POSIX path of an image relative to the input folder: UTF-8, relative, normalised
(no empty, `.` or `..` component, no leading or trailing `/`), without NUL or backslash. Every
cache is checked against this when read, and a key becomes a file path only through
`source_path`, which also resolves links and refuses a target outside the source folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import CacheError, DecodeError

MAX_KEY_BYTES = 4096
_SLASH, _DOT, _BACKSLASH = 0x2F, 0x2E, 0x5C


def key_problem(key: object) -> str | None:
    """Why `key` is not a valid sample key, or None."""
    if not isinstance(key, str) or not key:
        return "a key must be a non-empty string"
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return "a key must be valid UTF-8"
    if len(encoded) > MAX_KEY_BYTES:
        return f"a key is at most {MAX_KEY_BYTES} bytes"
    if "\0" in key or "\\" in key:
        return "a key holds no NUL or backslash"
    if key.startswith("/"):
        return "a key is relative (no leading /)"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "a key is a normalised path (no empty, '.' or '..' component)"
    return None


def check_key(key: object, where: str = "the cache") -> str:
    problem = key_problem(key)
    if problem:
        raise CacheError(f"{where} holds the sample key {key!r}: {problem}",
                         "the cache was edited or is corrupt; rebuild it with extract --overwrite")
    return key  # type: ignore[return-value]


def key_for_file(relative: str) -> tuple[str, str | None]:
    """(key, problem) for a file found by a scan at `relative` (an OS path relative to the input
    folder). A name that cannot be a key (not UTF-8, a backslash) gets a printable stand-in
    with `\\xNN` escapes, never used as a path, and the problem to record."""
    key = Path(relative).as_posix()
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(relative)
        shown = raw.decode("utf-8", errors="backslashreplace")
        return shown, "the file name is not valid UTF-8"
    problem = key_problem(key)
    return key, problem


def first_bad_key(key_bytes: np.ndarray, offsets: np.ndarray) -> tuple[int, str] | None:
    """Vectorised check of a whole sample table's keys: (index, problem) of the first bad key."""
    blob = np.asarray(key_bytes, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    if n <= 0:
        return None
    lengths = np.diff(offsets)
    if (lengths <= 0).any() or (lengths > MAX_KEY_BYTES).any():
        i = int(np.flatnonzero((lengths <= 0) | (lengths > MAX_KEY_BYTES))[0])
        return i, "a key must be non-empty and at most 4096 bytes"
    try:
        blob.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return int(np.searchsorted(offsets, exc.start, side="right") - 1), "a key must be valid UTF-8"
    starts, lasts = offsets[:-1], offsets[1:] - 1
    continuation = (blob[starts] & 0xC0) == 0x80
    bad = np.zeros(len(blob), dtype=bool)
    bad[starts[continuation]] = True  # a key boundary inside a character
    bad |= (blob == 0) | (blob == _BACKSLASH)
    slash, dot = blob == _SLASH, blob == _DOT
    is_start = np.zeros(len(blob), dtype=bool)
    is_start[starts] = True
    is_last = np.zeros(len(blob), dtype=bool)
    is_last[lasts] = True
    sep_before = is_start.copy()  # a component starts at i
    sep_before[1:] |= slash[:-1] & ~is_start[1:]
    sep_after = is_last.copy()  # a component ends at i
    sep_after[:-1] |= slash[1:] & ~is_last[:-1]
    bad |= slash & (sep_before | is_last)  # leading, doubled or trailing slash
    bad |= dot & sep_before & sep_after  # "."
    two_dots = np.zeros(len(blob), dtype=bool)
    two_dots[:-1] = dot[:-1] & dot[1:] & ~is_last[:-1] & sep_before[:-1] & sep_after[1:]
    bad |= two_dots  # ".."
    if not bad.any():
        return None
    at = int(np.flatnonzero(bad)[0])
    i = int(np.searchsorted(offsets, at, side="right") - 1)
    key = blob[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8", errors="backslashreplace")
    return i, key_problem(key) or "a key is a normalised relative path"


def source_path(source_root: str | Path, key: str, follow_symlinks: bool = False) -> Path:
    """The file a key names inside `source_root`. Raises DecodeError("outside_source") when the
    key or a symbolic link on the way leads out of the folder (unless `follow_symlinks`)."""
    problem = key_problem(key)
    if problem:
        raise DecodeError("bad_key", f"{key!r}: {problem}")
    root = Path(source_root)
    path = root / key
    if not follow_symlinks:
        real_root = root.resolve()
        real = path.resolve()
        if not real.is_relative_to(real_root):
            raise DecodeError("outside_source", f"a symbolic link leads outside {root} (to {real}); "
                                                "copy the file in, or pass --follow-symlinks")
    return path
