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
    placement        uint8 [N]    how bucket and box were chosen: 0 the bucket rule, 1 a --crops file

Sorted UTF-8 bytes order equals Python's str order, so lookups are a binary search. A sample
record (a row as a dict) travels as JSON in shard metadata: `record_to_json`/`record_from_json`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import CacheError
from .keys import check_key, first_bad_key, key_problem
from .names import FORMAT_VERSION

COLUMNS: dict[str, tuple[type, tuple[int, ...]]] = {
    "shard": (np.int32, ()),
    "row": (np.int32, ()),
    "bucket": (np.int32, ()),
    "source_bytes": (np.int64, ()),
    "source_mtime_ns": (np.int64, ()),
    "source_sha256": (np.uint8, (32,)),
    "source_size": (np.int32, (2,)),
    "box": (np.int32, (4,)),
    "placement": (np.uint8, ()),
}
OPTIONAL_COLUMNS = {"placement": 0}  # absent from version-1 tables: filled with this value
PLACEMENTS = ("rule", "crops")  # placement code -> meaning
_SHA256 = re.compile(r"[0-9a-f]{64}")
ORDER_BLOCK_ROWS, ORDER_BLOCK_BYTES = 1 << 20, 32 << 20  # the order check's blocks: bounded memory, few calls


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
        return cls(
            np.zeros(0, np.uint8),
            np.zeros(1, np.int64),
            {n: np.zeros((0, *shape), dt) for n, (dt, shape) in COLUMNS.items()},
        )

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
            data = [_column_value(name, r[name] if name in r else OPTIONAL_COLUMNS[name]) for r in records]
            columns[name] = np.array(data, dtype=dtype).reshape(len(keys), *shape)
        return cls(key_bytes, offsets, columns)

    # ---- access -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.key_offsets) - 1

    def key(self, i: int) -> str:
        raw = bytes(self._raw[int(self.key_offsets[i]) : int(self.key_offsets[i + 1])])
        try:
            return check_key(raw.decode("utf-8"), "the sample table")
        except UnicodeDecodeError:
            raise CacheError(
                f"the sample table holds a key that is not UTF-8: {raw!r}",
                "the cache was edited or is corrupt; rebuild it with extract --overwrite",
            ) from None

    def _key_bytes(self, i: int) -> bytes:
        return bytes(self._raw[int(self.key_offsets[i]) : int(self.key_offsets[i + 1])])

    def iter_keys(self):
        """Keys in sorted order, decoded one at a time."""
        for i in range(len(self)):
            yield self.key(i)

    def keys(self) -> list[str]:
        self.check_keys()
        raw = bytes(self._raw)
        offs = self.key_offsets.tolist()
        return [raw[offs[i] : offs[i + 1]].decode() for i in range(len(self))]

    def check_keys(self) -> None:
        """Every key's syntax, vectorised (CacheError naming the first bad one)."""
        bad = first_bad_key(self.key_bytes, self.key_offsets)
        if bad is not None:
            i, problem = bad
            shown = bytes(self._raw[int(self.key_offsets[i]) : int(self.key_offsets[i + 1])])
            raise CacheError(
                f"the sample table holds the key {shown.decode('utf-8', 'backslashreplace')!r}: {problem}",
                "the cache was edited or is corrupt; rebuild it with extract --overwrite",
            )

    def order_problem(self) -> str | None:
        """Why binary search cannot be trusted on this table, or None: keys must be strictly
        increasing (sorted, no key twice) and no two rows may share a (shard, row). Keys are
        compared as NUL-padded fixed-width byte strings (a key holds no NUL, so the order is
        the same), a block of rows at a time (memory bounded): ~0.1 s a million keys."""
        n = len(self)
        data = np.asarray(self.key_bytes)
        offsets = np.asarray(self.key_offsets, dtype=np.int64)
        first = 0
        while first < n - 1:
            widest = int(np.diff(offsets[first : min(n, first + ORDER_BLOCK_ROWS) + 1]).max())
            last = min(n, first + max(2, min(ORDER_BLOCK_ROWS, ORDER_BLOCK_BYTES // max(1, widest))))
            starts, lengths = offsets[first:last], np.diff(offsets[first : last + 1])
            width = max(1, int(lengths.max()))
            chunk = np.concatenate([data[offsets[first] : offsets[last]], np.zeros(width, np.uint8)])
            padded = sliding_window_view(chunk, width)[starts - starts[0]]  # one row per key, copied
            padded[np.arange(width)[None, :] >= lengths[:, None]] = 0  # the bytes of the next keys
            keys = padded.view(f"S{width}").ravel()
            bad = np.flatnonzero(keys[1:] <= keys[:-1])
            if len(bad):
                i = first + int(bad[0]) + 1
                same = keys[bad[0] + 1] == keys[bad[0]]
                return f"the key of row {i} is listed twice" if same else f"keys are not sorted at row {i}"
            first = last - 1  # the next block starts with this one's last key
        shard = np.asarray(self.columns["shard"], dtype=np.int64)
        slots = np.sort(shard << 32 | np.asarray(self.columns["row"], dtype=np.int64))
        if np.any(slots[1:] == slots[:-1]):
            return "two samples share one shard row"
        return None

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
                pieces.append(old_raw[self.key_offsets[a] : self.key_offsets[b]])
            start = cut
            if j < len(new_keys):
                pieces.append(new.key_bytes[new.key_offsets[j] : new.key_offsets[j + 1]])
        key_bytes = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        columns = {n: np.insert(np.asarray(self.columns[n])[kept], positions, new.columns[n], axis=0) for n in COLUMNS}
        return SampleTable(key_bytes.astype(np.uint8, copy=False), offsets, columns)

    def with_shards_remapped(self, remap: np.ndarray) -> "SampleTable":
        """The same rows with shard index i renamed remap[i] (after shards were removed)."""
        columns = dict(self.columns)
        columns["shard"] = np.asarray(remap)[np.asarray(self.columns["shard"], dtype=np.int64)].astype(np.int32)
        return SampleTable(np.asarray(self.key_bytes), np.asarray(self.key_offsets), columns)

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

        tensors = {
            "key_bytes": np.ascontiguousarray(self.key_bytes),
            "key_offsets": np.ascontiguousarray(self.key_offsets),
        }
        tensors.update({n: np.ascontiguousarray(c) for n, c in self.columns.items()})
        return save(
            tensors,
            metadata={"format": "dinocache-samples", "format_version": str(FORMAT_VERSION), "rows": str(len(self))},
        )

    @classmethod
    def load(cls, path: Path) -> "SampleTable":
        """Memory-map the arrays (nothing is copied until touched), checking every column's dtype
        and shape and the key offsets; key syntax is checked as keys are read (`check_keys` for all)."""
        from .stfile import SafetensorsError, SafetensorsFile

        try:
            st = SafetensorsFile(path)
            arrays = {name: st.array(name) for name in st.entries}
        except SafetensorsError as exc:
            raise CacheError(
                f"cannot read the sample table {path.name}: {exc}", "rerun extract with --overwrite"
            ) from None
        if "key_offsets" in arrays and arrays["key_offsets"].ndim == 1:
            n = len(arrays["key_offsets"]) - 1
            for name, value in OPTIONAL_COLUMNS.items():
                arrays.setdefault(name, np.full(max(n, 0), value, dtype=COLUMNS[name][0]))
        missing = [n for n in ("key_bytes", "key_offsets", *COLUMNS) if n not in arrays]
        if missing:
            raise CacheError(f"{path.name} lacks column(s) {', '.join(missing)}", "rerun extract with --overwrite")
        offsets, key_bytes = arrays["key_offsets"], arrays["key_bytes"]
        if (
            offsets.dtype != np.int64
            or offsets.ndim != 1
            or len(offsets) < 1
            or key_bytes.dtype != np.uint8
            or key_bytes.ndim != 1
        ):
            raise CacheError(
                f"{path.name}: key_offsets must be int64 [N + 1] and key_bytes uint8 [total]",
                "rerun extract with --overwrite",
            )
        n = len(offsets) - 1
        for name, (dtype, shape) in COLUMNS.items():
            col = arrays[name]
            if col.dtype != dtype or col.shape != (n, *shape):
                raise CacheError(
                    f"{path.name}: column {name} has {col.dtype}{list(col.shape)}, "
                    f"expected {np.dtype(dtype)}{[n, *shape]}",
                    "rerun extract with --overwrite",
                )
        if offsets[0] != 0 or offsets[-1] != len(key_bytes) or np.any(np.diff(offsets) < 0):
            raise CacheError(f"{path.name}: key offsets are inconsistent", "rerun extract with --overwrite")
        return cls(key_bytes, offsets, {n: arrays[n] for n in COLUMNS})


def record_to_json(record: dict) -> dict:
    """A sample record as it travels in JSON: source_mtime_ns as a decimal string (it exceeds
    2^53, which JavaScript and other double-based JSON readers would round)."""
    return {
        **{k: v for k, v in record.items() if k not in ("shard", "row")},
        "source_mtime_ns": str(record["source_mtime_ns"]),
    }


def record_from_json(obj: Any, num_buckets: int | None = None) -> dict:
    """Check and decode a sample record from shard metadata (version 1 or 2); ValueError names
    the field. The key is checked; the numbers must make sense together."""
    if not isinstance(obj, dict):
        raise ValueError("a sample record is not an object")
    problem = key_problem(obj.get("key"))
    if problem:
        raise ValueError(f"sample key {obj.get('key')!r}: {problem}")
    out: dict[str, Any] = {"key": obj["key"]}
    mtime = obj.get("source_mtime_ns")
    if isinstance(mtime, str) and re.fullmatch(r"-?[0-9]{1,19}", mtime):
        mtime = int(mtime)
    for name, low in (("bucket", 0), ("source_bytes", 0)):
        if not _int_in(obj.get(name), low, (num_buckets - 1) if name == "bucket" and num_buckets else 1 << 62):
            raise ValueError(f"{obj['key']!r}: {name} is {obj.get(name)!r}")
        out[name] = obj[name]
    if not _int_in(mtime, -(1 << 63), (1 << 63) - 1):
        raise ValueError(f"{obj['key']!r}: source_mtime_ns is {obj.get('source_mtime_ns')!r}")
    out["source_mtime_ns"] = mtime
    sha = obj.get("source_sha256")
    if not isinstance(sha, str) or not (_SHA256.fullmatch(sha) or sha == ""):
        raise ValueError(f"{obj['key']!r}: source_sha256 is not 64 hex digits")
    out["source_sha256"] = sha
    size, box = obj.get("source_size"), obj.get("box")
    if not (isinstance(size, list) and len(size) == 2 and all(_int_in(v, 1, 1 << 30) for v in size)):
        raise ValueError(f"{obj['key']!r}: source_size {size!r} is not [width, height]")
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(_int_in(v, 0, 1 << 30) for v in box)
        and box[0] < box[2] <= size[0]
        and box[1] < box[3] <= size[1]
    ):
        raise ValueError(f"{obj['key']!r}: box {box!r} is not inside the {size} source")
    out["source_size"], out["box"] = size, box
    placement = obj.get("placement", 0)
    if not _int_in(placement, 0, len(PLACEMENTS) - 1):
        raise ValueError(f"{obj['key']!r}: placement {placement!r} is not one of 0..{len(PLACEMENTS) - 1}")
    out["placement"] = placement
    return out


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _runs(indices: np.ndarray):
    """Maximal runs of consecutive integers as (start, stop) pairs."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts, stops)]
