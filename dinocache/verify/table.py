"""The sample table: intact, keys valid, sorted and unique, every row inside its shard, no row
twice, no sample both cached and failed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CacheError
from ..manifest import INDEX_DIR, cache_path, load_samples
from .report import VerifyReport

SHOWN = 20  # problems of one kind listed per check


def check_samples(root: Path, manifest: dict, report: VerifyReport) -> bool:
    """Check the sample table; False when it cannot be read at all."""
    table = _load_table(root, manifest, report)
    if table is None:
        return False
    keys = table.keys()
    _check_order(keys, manifest["samples"]["file"], report)
    _check_rows(table, keys, manifest["shards"], report)
    for failure in manifest["failures"]:
        if table.find(failure["key"]) >= 0:
            report.add(
                "failure_and_cached",
                f"{failure['key']!r} is both cached and recorded as failed (a sample is "
                "one or the other; rerun extract to settle it)",
                key=failure["key"],
            )
    return True


def _load_table(root: Path, manifest: dict, report: VerifyReport):
    from ..fileio import sha256_file

    info = manifest["samples"]
    try:
        path = cache_path(root, info["file"], INDEX_DIR)
        if path.is_file() and sha256_file(path) != info["sha256"]:
            report.add(
                "index", f"sample table {info['file']} fails its sha256 checksum (corrupted on disk)", info["file"]
            )
            return None
        table = load_samples(root, manifest)
        table.check_keys()
    except CacheError as exc:
        report.add("index", exc.message, info["file"])
        return None
    return table


def _check_order(keys: list[str], file: str, report: VerifyReport) -> None:
    for a, b in zip(keys, keys[1:]):
        if a >= b:
            if a == b:
                report.add("duplicate", f"sample {b!r} is listed more than once", file, b)
            else:
                report.add("index", f"sample table is not sorted at {b!r}", file, b)


def _check_rows(table, keys: list[str], shards: list[dict], report: VerifyReport) -> None:
    """Every row points at an existing shard, inside it, of its own bucket, and at a slot no
    other row holds."""
    shard = np.asarray(table.columns["shard"], dtype=np.int64)
    row = np.asarray(table.columns["row"], dtype=np.int64)
    bucket = np.asarray(table.columns["bucket"], dtype=np.int64)
    bad_shard = (shard < 0) | (shard >= len(shards))
    for i in np.flatnonzero(bad_shard)[:SHOWN]:
        report.add("row", f"sample {keys[i]!r} points at shard #{shard[i]}, which does not exist", key=keys[i])
    ok = ~bad_shard
    shard_rows = np.array([s["rows"] for s in shards] or [0], dtype=np.int64)
    shard_bucket = np.array([s["bucket"] for s in shards] or [0], dtype=np.int64)
    safe_shard = np.where(ok, shard, 0)
    for i in np.flatnonzero(ok & ((row < 0) | (row >= shard_rows[safe_shard])))[:SHOWN]:
        report.add(
            "row",
            f"sample {keys[i]!r} points at row {row[i]} of {shards[shard[i]]['file']}, "
            f"which has {shard_rows[shard[i]]} rows",
            shards[shard[i]]["file"],
            keys[i],
        )
    for i in np.flatnonzero(ok & (bucket != shard_bucket[safe_shard]))[:SHOWN]:
        report.add(
            "row",
            f"sample {keys[i]!r} says bucket {bucket[i]} but its shard {shards[shard[i]]['file']} "
            f"is bucket {shard_bucket[shard[i]]}",
            shards[shard[i]]["file"],
            keys[i],
        )
    _check_shared_slots(shard * (1 << 32) + row, keys, shards, report)


def _check_shared_slots(slots: np.ndarray, keys: list[str], shards: list[dict], report: VerifyReport) -> None:
    unique, counts = np.unique(slots, return_counts=True)
    for slot in unique[counts > 1][:SHOWN]:
        owners = [keys[i] for i in np.flatnonzero(slots == slot)]
        where = shards[slot >> 32]["file"] if 0 <= slot >> 32 < len(shards) else str(slot >> 32)
        report.add("row", f"samples {', '.join(map(repr, owners))} share row {slot & 0xFFFFFFFF} of {where}", where)
