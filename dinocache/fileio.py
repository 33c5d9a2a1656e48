"""File helpers every writer shares: checksums, durable writes, and deletion that never leaves
the cache.

Rules (docs/FORMAT.md, "Trust"): dinocache writes and deletes only inside the cache folder,
never through a symbolic link, and deletes only files whose names it gives them itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from .errors import CacheError

HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | Path, chunk: int = HASH_CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode an ordinary new file gets here (0666 minus the umask): shards written through a
    temp file keep it, so a cache on a shared filesystem is as readable as the rest of it."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_limited(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A link is not followed and a FIFO,
    device or folder is refused without reading (a `.lock` linked to /dev/zero, a FIFO named
    manifest.json): OSError for those, ValueError past `limit`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if info.st_size > limit:  # refused unread
            raise ValueError(f"it is larger than {limit} bytes")
        chunks, size = [], 0
        while block := os.read(fd, min(HASH_CHUNK, limit + 1 - size)):
            chunks.append(block)
            size += len(block)
            if size > limit:
                raise ValueError(f"it is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_link(path: Path) -> bool:
    return os.path.islink(path)


def real_folder(path: Path, what: str) -> Path:
    """`path` itself if it is a real folder (or absent); a link or a file there is refused, so that
    nothing the cache writes or deletes can land outside it."""
    if is_link(path):
        raise CacheError(
            f"{path} is a symbolic link; dinocache writes and deletes only inside the cache folder "
            f"and never through a link ({what})",
            f"replace the link with a real folder (or link the whole cache folder instead of {path.name}/)",
        )
    if path.exists() and not path.is_dir():
        raise CacheError(f"{path} is not a folder ({what})", f"move {path} away")
    return path


def remove_owned(folder: Path, pattern: re.Pattern[str]) -> int:
    """Delete the regular files directly in `folder` whose names match `pattern` (names dinocache
    gives its own files). `folder` must be a real folder: its links are never followed, other
    entries (folders, links, foreign files) are left alone. Returns how many were deleted."""
    if not folder.is_dir() or is_link(folder):
        return 0
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            try:
                if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
    return removed


def remove_folder_if_empty(folder: Path) -> None:
    if folder.is_dir() and not is_link(folder):
        try:
            folder.rmdir()
        except OSError:  # holds something that is not ours: leave it
            pass


def contained_file(root: Path, relative: str, what: str) -> Path:
    """The path of a cache file named `relative`: a regular file inside `root`, reached without
    any symbolic link (a link, even to a file in the cache, is refused)."""
    path = root / relative
    here = root
    for part in Path(relative).parts:
        here = here / part
        if is_link(here):
            raise CacheError(
                f"{what} {relative} is reached through a symbolic link ({here})",
                "dinocache reads only files inside the cache; replace the link with the file",
            )
    return path
