"""Prove a cache is complete and intact: every problem is named with the shard or key it is in."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CacheError, DecodeError, DinocacheError
from .scan import scan_folder
from .manifest import INDEX_DIR, SHARD_DIR, SHARD_SUFFIX, cache_path, load_samples, read_manifest, shard_path
from .writer import sha256_file


RECOMPUTE_MIN_COSINE = 0.995  # per token, stored vs recomputed (bf16 round trips give > 0.999)


@dataclass
class VerifyReport:
    root: Path
    shards: int = 0
    samples: int = 0
    recomputed: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a fault

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(root: str | Path, check_values: bool = True, source: str | Path | None = None,
                 recompute: int = 0, seed: int = 0, device: str = "auto") -> VerifyReport:
    """Check a cache. With `source`, also compare it with the image folder; with `recompute` N,
    re-extract N random samples from their sources and compare features (catches drift that
    checksums cannot: a changed preprocessing, model or library)."""
    root = Path(root)
    if recompute and source is None:
        raise DinocacheError("--recompute needs the images: pass --source DIR", "e.g. dinocache verify OUT --source data/images --recompute 20")
    report = VerifyReport(root)
    try:
        manifest = read_manifest(root)
    except CacheError as exc:
        report.problems.append(exc.message)
        return report
    model, buckets, shards = manifest["model"], manifest["buckets"], manifest["shards"]
    hidden, registers = model.get("hidden_size"), model.get("num_registers")
    report.shards = len(shards)
    for index, shard in enumerate(shards):
        report.problems += _check_shard(root, index, shard, buckets, hidden, registers, manifest["storage"], check_values)

    report.samples = manifest["samples"]["count"]
    report.problems += _check_samples(root, manifest)

    if source is not None and not report.problems:
        table = load_samples(root, manifest)
        _check_source(Path(source), table, manifest, report)
        if recompute:
            _recompute(root, Path(source), table, manifest, recompute, seed, device, report)
    listed = {s.get("file") for s in shards}
    shard_dir = root / SHARD_DIR
    if shard_dir.is_dir():
        for path in sorted(shard_dir.glob("*" + SHARD_SUFFIX)):
            if f"{SHARD_DIR}/{path.name}" not in listed:
                report.problems.append(f"{SHARD_DIR}/{path.name} is not in the manifest "
                                       "(left by an interrupted run? rerun extract to adopt it, or delete it)")
    return report


def _check_source(source: Path, table, manifest: dict, report: VerifyReport) -> None:
    failed = {f["key"] for f in manifest["failures"]}
    present = set()
    missing, changed = [], []
    for src in scan_folder(source):
        present.add(src.key)
        i = table.find(src.key)
        if i < 0:
            if src.key not in failed:
                missing.append(src.key)
            continue
        cols = table.columns
        if int(cols["source_bytes"][i]) != src.size or int(cols["source_mtime_ns"][i]) != src.mtime_ns:
            changed.append(src.key)
    report.problems += [f"{key} is in {source} but not in the cache" for key in missing]
    report.problems += [f"{key} changed in {source} since it was extracted" for key in changed]
    gone = sum(1 for key in table.iter_keys() if key not in present)
    if gone:
        report.notes.append(f"{gone} cached image(s) are no longer in {source}")


def _recompute(root: Path, source: Path, table, manifest: dict, count: int, seed: int, device: str,
               report: VerifyReport) -> None:
    import random

    from .buckets import Bucket
    from .imaging import decode_image, preprocess, read_source
    from .features import stored_tensors
    from .model import load_model
    from .reader import FeatureCache

    model, prep = manifest["model"], manifest["preprocessing"]
    loaded = load_model(model["id"], model.get("revision"), device, model["compute_dtype"],
                        prep["image_mean"], prep["image_std"])
    cache = FeatureCache(root)
    picks = sorted(random.Random(seed).sample(range(len(table)), min(count, len(table))))
    for i in picks:
        record = table.record(i)
        key = record["key"]
        try:
            data = read_source(str(source / key))
        except DecodeError as exc:
            report.problems.append(f"{key}: cannot recompute, {exc.detail}")
            continue
        if hashlib.sha256(data).hexdigest() != record["source_sha256"]:
            report.problems.append(f"{key}: cannot recompute, the source file's content changed")
            continue
        b = manifest["buckets"][record["bucket"]]
        bucket = Bucket(b["index"], b["width"], b["height"], b["input_width"], b["input_height"], model["patch_size"])
        pixels = preprocess(decode_image(data, 2**62), tuple(record["box"]), (bucket.input_width, bucket.input_height),
                            loaded.image_mean, loaded.image_std)
        storage = manifest["storage"]
        layers = tuple(storage.get("layers", []))
        hidden, intermediates = loaded.forward_layers(pixels[None], layers)
        fresh = stored_tensors(hidden, intermediates, loaded.num_registers, bucket.grid, storage.get("pool", 1),
                               storage.get("registers", False))
        stored = cache[i]
        cosines = [_cosine(stored[name].reshape(value[0].shape), value[0]) for name, value in fresh.items()]
        worst = min(float(c.min()) for c in cosines)
        if worst < RECOMPUTE_MIN_COSINE:
            report.problems.append(f"{key}: recomputed features differ from the stored ones (worst token cosine "
                                   f"{worst:.4f} < {RECOMPUTE_MIN_COSINE}): preprocessing, model or data drift")
        report.recomputed += 1


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


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


def _check_shard(root, index, shard, buckets, hidden, registers, storage, check_values) -> list[str]:
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
    rows_, cols_ = buckets[bucket_i].get("stored_grid", buckets[bucket_i]["grid"])
    n = shard.get("rows")
    expected = {"cls": [n, hidden], "patches": [n, rows_ * cols_, hidden]}
    if storage.get("registers"):
        expected["registers"] = [n, registers, hidden]
    for k in storage.get("layers", []):
        expected[f"layer{k}_cls"] = [n, hidden]
        expected[f"layer{k}_patches"] = [n, rows_ * cols_, hidden]
    if storage.get("scaled"):
        expected.update({f"{name}_scale": [n] for name in list(expected)})
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
                elif check_values and not torch.isfinite(fh.get_tensor(tensor_name).float()).all():
                    problems.append(f"shard {name}: {tensor_name} contains NaN or Inf")
    except Exception as exc:
        problems.append(f"shard {name} is not a readable safetensors file: {exc}")
    return problems
