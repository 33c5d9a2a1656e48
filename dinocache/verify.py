"""Prove a cache is complete and intact: every problem is named with the shard or key it is in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CacheError
from .manifest import SHARD_DIR, SHARD_SUFFIX, read_manifest, shard_path
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

    cols = manifest["samples"]
    report.samples = len(cols["key"])
    seen_keys: set[str] = set()
    seen_rows: dict[tuple[int, int], str] = {}
    for key, shard_i, row, bucket in zip(cols["key"], cols["shard"], cols["row"], cols["bucket"]):
        if key in seen_keys:
            report.problems.append(f"sample {key!r} is listed more than once")
        seen_keys.add(key)
        if not isinstance(shard_i, int) or not 0 <= shard_i < len(shards):
            report.problems.append(f"sample {key!r} points at shard #{shard_i}, which does not exist")
            continue
        shard = shards[shard_i]
        if not isinstance(row, int) or not 0 <= row < shard.get("rows", 0):
            report.problems.append(f"sample {key!r} points at row {row} of {shard.get('file')}, which has {shard.get('rows')} rows")
        if bucket != shard.get("bucket"):
            report.problems.append(f"sample {key!r} says bucket {bucket} but its shard {shard.get('file')} is bucket {shard.get('bucket')}")
        if (shard_i, row) in seen_rows:
            report.problems.append(f"samples {seen_rows[shard_i, row]!r} and {key!r} share row {row} of {shard.get('file')}")
        seen_rows[shard_i, row] = key
    for failure in manifest["failures"]:
        if failure.get("key") in seen_keys:
            report.problems.append(f"{failure.get('key')!r} is both cached and recorded as failed")

    listed = {s.get("file") for s in shards}
    shard_dir = root / SHARD_DIR
    if shard_dir.is_dir():
        for path in sorted(shard_dir.glob("*" + SHARD_SUFFIX)):
            if f"{SHARD_DIR}/{path.name}" not in listed:
                report.problems.append(f"{SHARD_DIR}/{path.name} is not in the manifest "
                                       "(left by an interrupted run? rerun extract to adopt it, or delete it)")
    return report


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
