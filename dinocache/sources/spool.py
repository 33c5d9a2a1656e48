"""Remote archives are read in place from a local copy: each is downloaded whole, once,
sequentially, into a spool folder shared by the decode workers; the least recently used
copies go once the spool holds more than SPOOL_BYTES."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath

from .reading import _fsspec

SPOOL_BYTES = 16 * 1024**3
_COPY = re.compile(r"[0-9a-f]{32}\.[a-z0-9]{1,8}")  # the names spool() gives: the only files it deletes


def spool_dir() -> Path:
    return Path(os.environ.get("DINOCACHE_SPOOL", Path.home() / ".cache" / "dinocache" / "spool"))


def spool(url: str) -> str:
    """The path of a local copy of the archive at `url` (made through an atomic rename, so
    workers that ask at once share one)."""
    folder = spool_dir()
    folder.mkdir(parents=True, exist_ok=True)
    suffix = PurePosixPath(url.split("?", 1)[0]).suffix.lower()
    name = hashlib.sha256(url.encode()).hexdigest()[:32] + suffix
    local = folder / (name if _COPY.fullmatch(name) else name[:32] + ".bin")
    if local.exists():
        os.utime(local)
        return str(local)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    with _fsspec().open(url, "rb") as src, open(tmp, "wb") as dst:
        while block := src.read(16 * 1024 * 1024):
            dst.write(block)
    os.replace(tmp, local)
    _trim_spool(folder, keep=local)
    return str(local)


def _trim_spool(folder: Path, keep: Path) -> None:
    copies = sorted((p for p in folder.iterdir() if _COPY.fullmatch(p.name)), key=lambda p: p.stat().st_atime)
    total = sum(p.stat().st_size for p in copies)
    for path in copies:
        if total <= SPOOL_BYTES:
            break
        if path != keep:
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
