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
        raise CacheError(
            f"{where} holds the sample key {key!r}: {problem}",
            "the cache was edited or is corrupt; rebuild it with extract --overwrite",
        )
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
    """Vectorised check of a whole sample table's keys: (index, problem) of the first bad key.
    Works on the positions of '/' and '.' only, so a million keys take a few tens of ms."""
    blob = np.asarray(key_bytes, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    if n <= 0:
        return None
    lengths = np.diff(offsets)
    bad_length = (lengths <= 0) | (lengths > MAX_KEY_BYTES)
    if bad_length.any():
        return int(np.flatnonzero(bad_length)[0]), "a key must be non-empty and at most 4096 bytes"
    try:
        blob.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return _owner(offsets, exc.start), "a key must be valid UTF-8"
    starts = offsets[:-1]
    bad_positions = [starts[(blob[starts] & 0xC0) == 0x80]]  # a key boundary inside a character
    bad_positions.append(np.flatnonzero((blob == 0) | (blob == _BACKSLASH)))
    is_start = np.zeros(len(blob) + 1, dtype=bool)
    is_start[starts] = True
    is_end = np.zeros(len(blob) + 1, dtype=bool)  # position just past a key
    is_end[offsets[1:]] = True
    slash = blob == _SLASH

    def sep_before(pos: np.ndarray) -> np.ndarray:  # a component starts at pos
        prev = np.maximum(pos - 1, 0)
        return is_start[pos] | (slash[prev] & (pos > 0))

    def sep_after(pos: np.ndarray) -> np.ndarray:  # a component ends after pos (pos inclusive)
        nxt = np.minimum(pos + 1, len(blob) - 1)
        return is_end[pos + 1] | slash[nxt]

    slashes = np.flatnonzero(slash)
    bad_positions.append(slashes[sep_before(slashes) | is_end[slashes + 1]])  # leading, doubled, trailing
    dots = np.flatnonzero(blob == _DOT)
    single = sep_before(dots) & sep_after(dots)  # "."
    bad_positions.append(dots[single])
    if len(dots) > 1:
        pairs = dots[:-1][(np.diff(dots) == 1) & ~is_end[dots[:-1] + 1]]  # ".." inside one key
        bad_positions.append(pairs[sep_before(pairs) & sep_after(pairs + 1)])
    bad = np.concatenate(bad_positions)
    if not len(bad):
        return None
    i = _owner(offsets, int(bad.min()))
    key = blob[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8", errors="backslashreplace")
    return i, key_problem(key) or "a key is a normalised relative path"


def _owner(offsets: np.ndarray, position: int) -> int:
    return int(np.searchsorted(offsets, position, side="right") - 1)


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
            raise DecodeError(
                "outside_source",
                f"a symbolic link leads outside {root} (to {real}); copy the file in, or pass --follow-symlinks",
            )
    return path
