"""The sample table: one row per cached image, sorted by key, stored as a safetensors file of
plain arrays so that millions of samples open in milliseconds and stay memory-mapped.

    key_bytes   uint8  [total]    UTF-8 keys, concatenated in sorted order
    key_offsets int64  [N + 1]    key i is key_bytes[key_offsets[i]:key_offsets[i + 1]]
    shard       int32  [N]        index into manifest["shards"]
    row         int32  [N]        row inside that shard
    bucket      int32  [N]        index into manifest["buckets"]
    source_bytes     int64 [N]    size of the source file
    source_mtime_ns  int64 [N]    its modification time
    source_sha256    uint8 [N, 32]
    source_size      int32 [N, 2] (width, height) of the upright source
    box              int32 [N, 4] (left, top, right, bottom) region resized to the bucket

Sorted UTF-8 bytes order equals Python's str order, so lookups are a binary search.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import CacheError

COLUMNS: dict[str, tuple[type, tuple[int, ...]]] = {
    "shard": (np.int32, ()),
    "row": (np.int32, ()),
    "bucket": (np.int32, ()),
    "source_bytes": (np.int64, ()),
    "source_mtime_ns": (np.int64, ()),
    "source_sha256": (np.uint8, (32,)),
    "source_size": (np.int32, (2,)),
    "box": (np.int32, (4,)),
}
_ST_DTYPES = {"U8": np.uint8, "I32": np.int32, "I64": np.int64}


def _column_value(name: str, value):
    if name == "source_sha256":
        return np.frombuffer(bytes.fromhex(value), dtype=np.uint8) if value else np.zeros(32, np.uint8)
    return value


class SampleTable:
    """Sorted, immutable columns; `merged` returns a new table."""

    def __init__(self, key_bytes: np.ndarray, key_offsets: np.ndarray, columns: dict[str, np.ndarray]):
        self.key_bytes = key_bytes
        self.key_offsets = key_offsets
        self.columns = columns
        self._raw = memoryview(np.ascontiguousarray(key_bytes))  # zero-copy view, also over a memory map

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls) -> "SampleTable":
        return cls(np.zeros(0, np.uint8), np.zeros(1, np.int64),
                   {n: np.zeros((0, *shape), dt) for n, (dt, shape) in COLUMNS.items()})

    @classmethod
    def from_records(cls, records: list[dict]) -> "SampleTable":
        """Records with a "key" and every column (source_sha256 as hex); later duplicates win."""
        latest = {r["key"]: r for r in records}
        return cls.from_sorted_records([latest[k] for k in sorted(latest)])

    @classmethod
    def from_sorted_records(cls, records: list[dict]) -> "SampleTable":
        """Records already sorted by key and unique (not checked: verify must be able to see violations)."""
        keys = [r["key"] for r in records]
        encoded = [k.encode() for k in keys]
        offsets = np.zeros(len(keys) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        key_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        columns = {}
        for name, (dtype, shape) in COLUMNS.items():
            data = [_column_value(name, r[name]) for r in records]
            columns[name] = np.array(data, dtype=dtype).reshape(len(keys), *shape)
        return cls(key_bytes, offsets, columns)

    # ---- access -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.key_offsets) - 1

    def key(self, i: int) -> str:
        return bytes(self._raw[self.key_offsets[i]:self.key_offsets[i + 1]]).decode()

    def _key_bytes(self, i: int) -> bytes:
        return bytes(self._raw[int(self.key_offsets[i]):int(self.key_offsets[i + 1])])

    def iter_keys(self):
        """Keys in sorted order, decoded one at a time."""
        for i in range(len(self)):
            yield self.key(i)

    def keys(self) -> list[str]:
        raw = bytes(self._raw)
        offs = self.key_offsets.tolist()
        return [raw[offs[i]:offs[i + 1]].decode() for i in range(len(self))]

    def find(self, key: str) -> int:
        """Index of `key`, or -1."""
        i = self._insert_point(key)
        return i if i < len(self) and self._key_bytes(i) == key.encode() else -1

    def record(self, i: int) -> dict:
        out = {"key": self.key(i)}
        for name in COLUMNS:
            value = self.columns[name][i]
            out[name] = value.tobytes().hex() if name == "source_sha256" else value.tolist()
        return out

    # ---- change -----------------------------------------------------------------------
    def merged(self, new_records: list[dict], drop_keys: set[str] = frozenset()) -> "SampleTable":
        """This table with `new_records` added (superseding same-key rows) and `drop_keys` removed."""
        new = SampleTable.from_records(new_records)
        new_keys = new.keys()
        keep = np.ones(len(self), dtype=bool)
        for key in list(new_keys) + list(drop_keys):
            i = self.find(key)
            if i >= 0:
                keep[i] = False
        kept = np.flatnonzero(keep)
        # Insert position of each new key among the kept old rows (both sorted).
        positions = np.searchsorted(kept, np.array([self._insert_point(k) for k in new_keys], dtype=np.int64))
        lengths = np.insert(np.diff(self.key_offsets)[kept], positions, np.diff(new.key_offsets))
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Key bytes: runs of kept old rows, with the new keys spliced in between.
        pieces, start = [], 0
        old_raw = np.asarray(self.key_bytes)
        cut_points = positions.tolist() + [len(kept)]
        for j, cut in enumerate(cut_points):
            for a, b in _runs(kept[start:cut]):
                pieces.append(old_raw[self.key_offsets[a]:self.key_offsets[b]])
            start = cut
            if j < len(new_keys):
                pieces.append(new.key_bytes[new.key_offsets[j]:new.key_offsets[j + 1]])
        key_bytes = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        columns = {n: np.insert(np.asarray(self.columns[n])[kept], positions, new.columns[n], axis=0) for n in COLUMNS}
        return SampleTable(key_bytes.astype(np.uint8, copy=False), offsets, columns)

    def _insert_point(self, key: str) -> int:
        """Binary search: the first row whose key is >= `key`."""
        target = key.encode()
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._key_bytes(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # ---- disk -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {"key_bytes": np.ascontiguousarray(self.key_bytes), "key_offsets": np.ascontiguousarray(self.key_offsets)}
        tensors.update({n: np.ascontiguousarray(c) for n, c in self.columns.items()})
        return save(tensors, metadata={"rows": str(len(self))})

    @classmethod
    def load(cls, path: Path) -> "SampleTable":
        """Memory-map the arrays (nothing is copied until touched)."""
        arrays = mmap_safetensors(path)
        missing = [n for n in ("key_bytes", "key_offsets", *COLUMNS) if n not in arrays]
        if missing:
            raise CacheError(f"{path.name} lacks column(s) {', '.join(missing)}", "rerun extract with --overwrite")
        n = len(arrays["key_offsets"]) - 1
        for name, (dtype, shape) in COLUMNS.items():
            col = arrays[name]
            if col.dtype != dtype or col.shape != (n, *shape):
                raise CacheError(f"{path.name}: column {name} has {col.dtype}{list(col.shape)}, "
                                 f"expected {np.dtype(dtype)}{[n, *shape]}", "rerun extract with --overwrite")
        offsets = arrays["key_offsets"]
        if n < 0 or offsets[0] != 0 or offsets[-1] != len(arrays["key_bytes"]) or np.any(np.diff(offsets) < 0):
            raise CacheError(f"{path.name}: key offsets are inconsistent", "rerun extract with --overwrite")
        return cls(arrays["key_bytes"], offsets, {n: arrays[n] for n in COLUMNS})


def _runs(indices: np.ndarray):
    """Maximal runs of consecutive integers as (start, stop) pairs."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts, stops)]


def mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of a safetensors file's tensors (header parsed here, data memory-mapped)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(size - 8, 100 * 1024**2):
                raise ValueError("header length out of range")
            header = json.loads(fh.read(header_len))
        base = 8 + header_len
        mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES[info["dtype"]]
            start, stop = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            if not 0 <= start <= stop <= size - base:
                raise ValueError(f"{name}: data offsets out of range")
            out[name] = mm[base + start:base + stop].view(dtype).reshape(shape)
        return out
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, struct.error) as exc:
        raise CacheError(f"cannot read the sample index {path.name}: {exc}", "rerun extract with --overwrite") from None
