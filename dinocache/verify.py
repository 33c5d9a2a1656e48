"""Prove a cache is complete and intact: every problem is named with the shard or key it is in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CacheError
from .manifest import INDEX_DIR, SHARD_DIR, SHARD_SUFFIX, cache_path, load_samples, read_manifest, shard_path
from .writer import sha256_file


@dataclass
class VerifyReport:
    root: Path
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(root: str | Path, check_values: bool = True) -> VerifyReport:
    root = Path(root)
    report = VerifyReport(root)
    try:
        manifest = read_manifest(root)
    except CacheError as exc:
        report.problems.append(exc.message)
        return report
    model, buckets, shards = manifest["model"], manifest["buckets"], manifest["shards"]
    hidden, registers = model.get("hidden_size"), model.get("num_registers")
    keep_registers = manifest["storage"].get("registers", False)
    report.shards = len(shards)
    for index, shard in enumerate(shards):
        report.problems += _check_shard(root, index, shard, buckets, hidden, registers, keep_registers, check_values)

    report.samples = manifest["samples"]["count"]
    report.problems += _check_samples(root, manifest)

    listed = {s.get("file") for s in shards}
    shard_dir = root / SHARD_DIR
    if shard_dir.is_dir():
        for path in sorted(shard_dir.glob("*" + SHARD_SUFFIX)):
            if f"{SHARD_DIR}/{path.name}" not in listed:
                report.problems.append(f"{SHARD_DIR}/{path.name} is not in the manifest "
                                       "(left by an interrupted run? rerun extract to adopt it, or delete it)")
    return report


def _check_samples(root: Path, manifest: dict) -> list[str]:
    """The sample index: intact, sorted and unique keys, every row inside its shard, no row twice."""
    info, shards = manifest["samples"], manifest["shards"]
    try:
        path = cache_path(root, info["file"], INDEX_DIR)
        if path.is_file() and sha256_file(path) != info["sha256"]:
            return [f"sample index {info['file']} fails its sha256 checksum (corrupted on disk)"]
        table = load_samples(root, manifest)
    except CacheError as exc:
        return [exc.message]
    problems = []
    keys = table.keys()
    for a, b in zip(keys, keys[1:]):
        if a >= b:
            problems.append(f"sample {b!r} is listed more than once" if a == b else f"sample index is not sorted at {b!r}")
    shard = np.asarray(table.columns["shard"], dtype=np.int64)
    row = np.asarray(table.columns["row"], dtype=np.int64)
    bucket = np.asarray(table.columns["bucket"], dtype=np.int64)
    bad_shard = (shard < 0) | (shard >= len(shards))
    for i in np.flatnonzero(bad_shard)[:20]:
        problems.append(f"sample {keys[i]!r} points at shard #{shard[i]}, which does not exist")
    ok = ~bad_shard
    shard_rows = np.array([s["rows"] for s in shards] or [0], dtype=np.int64)
    shard_bucket = np.array([s["bucket"] for s in shards] or [0], dtype=np.int64)
    safe_shard = np.where(ok, shard, 0)
    for i in np.flatnonzero(ok & ((row < 0) | (row >= shard_rows[safe_shard])))[:20]:
        problems.append(f"sample {keys[i]!r} points at row {row[i]} of {shards[shard[i]]['file']}, "
                        f"which has {shard_rows[shard[i]]} rows")
    for i in np.flatnonzero(ok & (bucket != shard_bucket[safe_shard]))[:20]:
        problems.append(f"sample {keys[i]!r} says bucket {bucket[i]} but its shard {shards[shard[i]]['file']} "
                        f"is bucket {shard_bucket[shard[i]]}")
    slots = shard * (1 << 32) + row
    unique, counts = np.unique(slots, return_counts=True)
    for slot in unique[counts > 1][:20]:
        owners = [keys[i] for i in np.flatnonzero(slots == slot)]
        problems.append(f"samples {', '.join(map(repr, owners))} share row {slot & 0xFFFFFFFF} of "
                        f"{shards[slot >> 32]['file'] if 0 <= slot >> 32 < len(shards) else slot >> 32}")
    for failure in manifest["failures"]:
        if table.find(failure["key"]) >= 0:
            problems.append(f"{failure['key']!r} is both cached and recorded as failed")
    return problems


def _check_shard(root, index, shard, buckets, hidden, registers, keep_registers, check_values) -> list[str]:
    from safetensors import safe_open

    name = shard.get("file")
    try:
        path = shard_path(root, name)
    except CacheError as exc:
        return [f"shard #{index}: {exc.message}"]
    if not path.is_file():
        return [f"shard {name} is missing"]
    size = path.stat().st_size
    if size != shard.get("bytes"):
        return [f"shard {name} has {size} bytes, the manifest says {shard.get('bytes')} (truncated or replaced)"]
    if sha256_file(path) != shard.get("sha256"):
        return [f"shard {name} fails its sha256 checksum (corrupted on disk)"]
    bucket_i = shard.get("bucket")
    if not isinstance(bucket_i, int) or not 0 <= bucket_i < len(buckets):
        return [f"shard {name} names bucket {bucket_i!r}, which is not in the bucket table"]
    rows_, cols_ = buckets[bucket_i]["grid"]
    n = shard.get("rows")
    expected = {"cls": [n, hidden], "patches": [n, rows_ * cols_, hidden]}
    if keep_registers:
        expected["registers"] = [n, registers, hidden]
    problems = []
    try:
        with safe_open(str(path), framework="pt") as fh:
            names = set(fh.keys())
            if names != set(expected):
                problems.append(f"shard {name} holds tensors {sorted(names)}, expected {sorted(expected)}")
            for tensor_name, shape in expected.items():
                if tensor_name not in names:
                    continue
                got = list(fh.get_slice(tensor_name).get_shape())
                if got != shape:
                    problems.append(f"shard {name}: {tensor_name} has shape {got}, expected {shape} "
                                    f"(bucket {buckets[bucket_i]['name']}, grid {rows_}x{cols_}, hidden {hidden})")
                elif check_values and not torch.isfinite(fh.get_tensor(tensor_name)).all():
                    problems.append(f"shard {name}: {tensor_name} contains NaN or Inf")
    except Exception as exc:
        problems.append(f"shard {name} is not a readable safetensors file: {exc}")
    return problems
