"""One shard, one pass: its sha256 and the finite check of every value, in bounded windows.

The finite check reads the layout's dtype table (layout.NONFINITE_BITS): a storage dtype added
there is checked here with no change."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..layout import NONFINITE_BITS
from ..stfile import DTYPES, SafetensorsError, SafetensorsFile

CHUNK = 16 * 1024 * 1024


def scan_shard(path: Path, check_values: bool, window: int = CHUNK) -> tuple[str, SafetensorsFile, list[str], int]:
    """Read a shard once: (sha256 of the whole file, its parsed header, value problems, bytes).

    The file is memory-mapped and walked in windows: each window is hashed, and the values of
    every tensor inside it are checked, while its pages are hot; then the window is released
    (MADV_DONTNEED), so resident memory stays at one window whatever the shard's size."""
    import mmap

    header = SafetensorsFile(path)
    digest = hashlib.sha256()
    bad: set[str] = set()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise SafetensorsError("the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)
            try:
                for start in range(0, size, window):
                    stop = min(size, start + window)
                    digest.update(view[start:stop])
                    if check_values:
                        _check_window(mm, header, start, stop, bad)
                    if hasattr(mm, "madvise") and stop - start == window and window % mmap.PAGESIZE == 0:
                        mm.madvise(mmap.MADV_DONTNEED, start, window)
            finally:
                view.release()
    problems = [f"{name} contains NaN or Inf" for name in sorted(bad)]
    return digest.hexdigest(), header, problems, size


def _check_window(mm, header: SafetensorsFile, start: int, stop: int, bad: set[str]) -> None:
    """Finite-check the elements of every tensor that begin inside [start, stop) of the file
    (an element straddling `stop` belongs to the next window)."""
    for entry in header.entries.values():
        if entry.name in bad or entry.dtype not in NONFINITE_BITS:
            continue
        itemsize = DTYPES[entry.dtype][0].itemsize
        base = header.data_start + entry.start
        count = (entry.stop - entry.start) // itemsize
        first = max(0, -(-(start - base) // itemsize)) if start > base else 0
        last = min(count, -(-(stop - base) // itemsize))
        if last <= first:
            continue
        first_byte = base + first * itemsize
        if first_byte + (last - first) * itemsize > len(mm):
            continue
        data = memoryview(mm)[first_byte : first_byte + (last - first) * itemsize]
        try:
            if not _finite(data, entry.dtype):
                bad.add(entry.name)
        finally:
            data.release()


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _finite(data: memoryview, code: str) -> bool:
    """No NaN or Inf among the raw values of a tensor of safetensors `code`, from the layout's
    dtype table (layout.NONFINITE_BITS): a value is not finite exactly when its masked bits are
    all ones."""
    if code not in NONFINITE_BITS:
        return True  # integer tensors
    itemsize, mask = NONFINITE_BITS[code]
    dtype = _UINT[itemsize]
    bits = np.bitwise_and(np.frombuffer(data, dtype=dtype), dtype(mask))
    return bool(bits.max(initial=0) != mask)
