"""The extraction pipeline:

    scan -> plan (bucket + crop box per image) -> decode/resize in worker processes
         -> one exact shape per batch -> forward -> split tokens -> shard writer -> manifest

Per-image problems are recorded as failures and the run goes on. Reruns skip what is cached
(same key, size and mtime), recompute changed files, and adopt shards that were written but
not yet in the manifest when a previous run died.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .buckets import Bucket, assign_bucket, crop_box, make_buckets
from .config import ExtractOptions
from .errors import CacheError, DecodeError
from .imaging import decode_image, preprocess
from .lock import CacheLock
from .manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SAMPLE_COLUMNS, SHARD_DIR, SHARD_SUFFIX,
                       read_manifest, write_manifest)
from .model import LoadedModel, load_model, split_tokens
from .scan import SourceFile, probe, scan_folder
from .writer import ShardWriter, sha256_file

log = logging.getLogger("dinocache")

TOKENS_PER_BATCH = 65536  # default batch = this many patch tokens (16 images at 1024x1024)
MAX_DEFAULT_BATCH = 256
COMMIT_EVERY_S = 30.0


@dataclass(frozen=True)
class PlannedImage:
    key: str
    path: str
    bucket: int
    box: tuple[int, int, int, int]
    source_bytes: int
    source_mtime_ns: int
    source_size: tuple[int, int]

    def record(self) -> dict:
        return {"key": self.key, "bucket": self.bucket, "source_bytes": self.source_bytes,
                "source_mtime_ns": self.source_mtime_ns, "source_size": list(self.source_size), "box": list(self.box)}


@dataclass
class ExtractResult:
    out: Path
    scanned: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    missing_sources: int = 0
    shards_written: int = 0
    seconds: float = 0.0
    failures_by_reason: dict[str, int] = field(default_factory=dict)


def default_batch_size(bucket: Bucket) -> int:
    return max(1, min(MAX_DEFAULT_BATCH, TOKENS_PER_BATCH // bucket.num_patches))


def cache_settings(loaded: LoadedModel, buckets: list[Bucket], options: ExtractOptions) -> dict:
    """Everything that changes the stored features; a cache never mixes two of these.
    JSON-normalized, so that it compares equal to what a manifest read back holds."""
    return json.loads(json.dumps({
        "model": {"id": loaded.model_id, "revision": loaded.revision, "patch_size": loaded.patch_size,
                  "hidden_size": loaded.hidden_size, "num_registers": loaded.num_registers,
                  "compute_dtype": str(loaded.dtype).removeprefix("torch."), "config": loaded.config},
        "preprocessing": {"image_mean": list(loaded.image_mean), "image_std": list(loaded.image_std),
                          "resize": options.buckets.resize, "resample": "bilinear", "antialias": True,
                          "rescale": "1/255 (16-bit: 1/65535)", "alpha_background": [255, 255, 255],
                          "exif_transpose": True},
        "storage": {"dtype": options.storage_dtype, "registers": options.keep_registers},
        "buckets": [b.to_record() for b in buckets],
    }))


def settings_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += settings_differences(a, b, where + ".")
        elif a != b:
            diffs.append(f"{where}: cache has {a!r}, this run has {b!r}")
    return diffs


class CacheState:
    """The in-memory index of a cache while it is being written; `commit` writes the manifest."""

    def __init__(self, root: Path, settings: dict):
        self.root = root
        self.settings = settings
        self.shards: list[dict] = []
        self.samples: dict[str, dict] = {}  # key -> record with shard index + row
        self.failures: dict[str, dict] = {}
        self.runs: list[dict] = []
        self.created = _now()

    @classmethod
    def open(cls, root: Path, settings: dict, overwrite: bool) -> "CacheState":
        state = cls(root, settings)
        if (root / MANIFEST_NAME).exists() and overwrite:
            (root / MANIFEST_NAME).unlink()
            shutil.rmtree(root / SHARD_DIR, ignore_errors=True)
        if (root / MANIFEST_NAME).exists():
            manifest = read_manifest(root)
            old = {k: manifest[k] for k in ("model", "preprocessing", "storage", "buckets")}
            diffs = settings_differences(old, settings)
            if diffs:
                raise CacheError(f"{root} was built with different settings:\n    " + "\n    ".join(diffs),
                                 "use the same options as before, another --out, or --overwrite to rebuild it")
            state.created = manifest.get("created", state.created)
            state.shards = manifest["shards"]
            state.runs = manifest.get("runs", [])
            cols = manifest["samples"]
            for i, key in enumerate(cols["key"]):
                state.samples[key] = {name: cols[name][i] for name in SAMPLE_COLUMNS}
            state.failures = {f["key"]: f for f in manifest["failures"]}
        elif any((root / SHARD_DIR).glob("*" + SHARD_SUFFIX)) and overwrite:
            shutil.rmtree(root / SHARD_DIR, ignore_errors=True)
        state.adopt_orphans()
        return state

    def adopt_orphans(self) -> int:
        """Shards that are durable on disk but not in the manifest (the run died before committing)."""
        from safetensors import safe_open

        known = {s["file"] for s in self.shards}
        adopted = 0
        for path in sorted((self.root / SHARD_DIR).glob("*" + SHARD_SUFFIX)):
            name = f"{SHARD_DIR}/{path.name}"
            if name in known:
                continue
            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
                samples = json.loads(meta["samples"])
                bucket = samples[0]["bucket"]
                if any(s["bucket"] != bucket for s in samples) or bucket >= len(self.settings["buckets"]):
                    raise ValueError("inconsistent bucket")
                if self.settings["buckets"][bucket]["name"] != meta.get("bucket"):
                    raise ValueError("bucket table differs")
            except Exception as exc:  # not ours or damaged: leave it for verify to report
                log.warning("not adopting %s: %s", name, exc)
                continue
            record = {"file": name, "bucket": bucket, "rows": len(samples), "bytes": path.stat().st_size,
                      "sha256": sha256_file(path)}
            self.add_shard(record, samples)
            adopted += 1
        if adopted:
            log.info("adopted %d shard(s) written by an interrupted run", adopted)
        return adopted

    def add_shard(self, record: dict, samples: list[dict]) -> None:
        index = len(self.shards)
        self.shards.append(record)
        for row, sample in enumerate(samples):
            # A recomputed image supersedes its old row: the old shard keeps the bytes, nobody references them.
            self.samples[sample["key"]] = {**sample, "shard": index, "row": row}
            self.failures.pop(sample["key"], None)

    def add_failure(self, item: PlannedImage | SourceFile, reason: str, detail: str) -> None:
        self.failures[item.key] = {"key": item.key, "reason": reason, "detail": detail,
                                   "source_bytes": item.source_bytes if isinstance(item, PlannedImage) else item.size,
                                   "source_mtime_ns": item.source_mtime_ns if isinstance(item, PlannedImage) else item.mtime_ns}

    def commit(self) -> None:
        keys = sorted(self.samples)
        columns = {name: [self.samples[k][name] for k in keys] for name in SAMPLE_COLUMNS}
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tool_version": __version__,
            "created": self.created, "updated": _now(),
            **self.settings,
            "shards": self.shards,
            "samples": columns,
            "failures": [self.failures[k] for k in sorted(self.failures)],
            "runs": self.runs,
        }
        write_manifest(self.root, manifest)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan_images(sources: list[SourceFile], buckets: list[Bucket], state: CacheState, resize: str,
                max_pixels: int) -> tuple[list[PlannedImage], int]:
    """Which images to (re)compute and how; returns (plan sorted by bucket then key, skipped count)."""
    plan: list[PlannedImage] = []
    skipped = 0
    for src in sources:
        cached = state.samples.get(src.key) or state.failures.get(src.key)
        if cached and cached["source_bytes"] == src.size and cached["source_mtime_ns"] == src.mtime_ns:
            skipped += 1
            continue
        if src.size < 0:
            state.add_failure(src, "unreadable", "cannot stat the file (broken or looping symlink?)")
            continue
        if src.size == 0:
            state.add_failure(src, "empty", "zero-byte file")
            continue
        try:
            width, height = probe(src.path)
            if width * height > max_pixels:
                raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels is over the limit of "
                                               f"{max_pixels} (raise --max-pixels if this image is legitimate)")
        except DecodeError as exc:
            state.add_failure(src, exc.reason, exc.detail)
            continue
        bucket = assign_bucket(width, height, buckets)
        plan.append(PlannedImage(src.key, src.path, bucket.index, crop_box(width, height, bucket, resize),
                                 src.size, src.mtime_ns, (width, height)))
    plan.sort(key=lambda p: (p.bucket, p.key))
    return plan, skipped


class DecodeDataset(Dataset):
    """Decode + preprocess one planned image; failures are returned, not raised."""

    def __init__(self, plan: list[PlannedImage], buckets: list[Bucket], mean, std, max_pixels: int):
        self.plan, self.buckets, self.mean, self.std, self.max_pixels = plan, buckets, mean, std, max_pixels

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        item = self.plan[i]
        bucket = self.buckets[item.bucket]
        try:
            pixels = decode_image(item.path, self.max_pixels)
            if (pixels.shape[2], pixels.shape[1]) != item.source_size:
                raise DecodeError("changed", f"decoded size {pixels.shape[2]}x{pixels.shape[1]} differs from the "
                                             f"header's {item.source_size[0]}x{item.source_size[1]}")
            x = preprocess(pixels, item.box, (bucket.input_width, bucket.input_height), self.mean, self.std)
            return i, x, None
        except DecodeError as exc:
            return i, None, (exc.reason, exc.detail)
        except Exception as exc:  # a decoder bug must cost one image, not the run
            return i, None, ("decode_error", f"{type(exc).__name__}: {exc}")


def collate_decoded(items):
    ok = [(i, x) for i, x, err in items if err is None]
    failed = [(i, err) for i, x, err in items if err is not None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed


def bucket_batches(plan: list[PlannedImage], buckets: list[Bucket], batch_size: int | None) -> list[list[int]]:
    """Consecutive index chunks, never crossing a bucket boundary (one exact shape per batch)."""
    batches: list[list[int]] = []
    start = 0
    while start < len(plan):
        bucket = buckets[plan[start].bucket]
        size = batch_size or default_batch_size(bucket)
        end = start
        while end < len(plan) and end - start < size and plan[end].bucket == bucket.index:
            end += 1
        batches.append(list(range(start, end)))
        start = end
    return batches


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def extract(input_dir: str | Path, options: ExtractOptions, loaded: LoadedModel | None = None) -> ExtractResult:
    """Extract features for every image under `input_dir` into `options.out`."""
    root = Path(options.out)
    started = time.perf_counter()
    sources = scan_folder(input_dir)
    loaded = loaded or load_model(options.model, options.revision, options.device, options.dtype,
                                  options.image_mean, options.image_std, options.seed)
    buckets = make_buckets(options.buckets.sizes, loaded.patch_size)
    settings = cache_settings(loaded, buckets, options)
    result = ExtractResult(out=root, scanned=len(sources))
    root.mkdir(parents=True, exist_ok=True)
    with CacheLock(root):
        state = CacheState.open(root, settings, options.overwrite)
        plan, result.skipped = plan_images(sources, buckets, state, options.buckets.resize, options.max_pixels)
        present = {s.key for s in sources}
        result.missing_sources = sum(1 for k in state.samples if k not in present)
        batch_size = options.batch_size or options.buckets.batch_size
        dataset = DecodeDataset(plan, buckets, loaded.image_mean, loaded.image_std, options.max_pixels)
        workers = default_workers() if options.workers is None else options.workers
        loader = DataLoader(dataset, batch_sampler=bucket_batches(plan, buckets, batch_size), num_workers=workers,
                            collate_fn=collate_decoded, pin_memory=loaded.device.type == "cuda",
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        writer = ShardWriter(root, options.storage_dtype, options.shard_max_bytes, options.keep_registers)
        run_started = _now()
        last_commit = time.monotonic()
        current_bucket = None
        from tqdm import tqdm

        bar = tqdm(total=len(plan), unit="img", disable=not options.progress, dynamic_ncols=True, desc="extract")
        try:
            for indices, pixels, failed in loader:
                for i, (reason, detail) in failed:
                    state.add_failure(plan[i], reason, detail)
                batch_bucket = plan[(indices or [failed[0][0]])[0]].bucket
                if current_bucket is not None and batch_bucket != current_bucket:
                    writer.flush(current_bucket)  # a bucket is done: its last shard need not wait
                current_bucket = batch_bucket
                if pixels is not None:
                    bucket = buckets[batch_bucket]
                    hidden = loaded.forward(pixels)
                    cls, registers, patches = split_tokens(hidden, loaded.num_registers, bucket.grid)
                    writer.add(bucket, cls, registers, patches, [plan[i].record() for i in indices])
                for record, samples in writer.completed():
                    state.add_shard(record, samples)
                    result.shards_written += 1
                if time.monotonic() - last_commit > COMMIT_EVERY_S:
                    state.commit()
                    last_commit = time.monotonic()
                bar.update(len(indices) + len(failed))
                result.processed += len(indices)
        finally:
            bar.close()
            try:
                for record, samples in writer.close():
                    state.add_shard(record, samples)
                    result.shards_written += 1
            finally:
                result.seconds = time.perf_counter() - started
                state.runs.append({"started": run_started, "finished": _now(), "processed": result.processed,
                                   "failed": sum(1 for p in plan if p.key in state.failures),
                                   "seconds": round(result.seconds, 3),
                                   "images_per_second": round(result.processed / result.seconds, 3) if result.seconds else 0,
                                   "device": str(loaded.device), "tool_version": __version__})
                state.commit()
    result.failed = len(state.failures)
    for f in state.failures.values():
        result.failures_by_reason[f["reason"]] = result.failures_by_reason.get(f["reason"], 0) + 1
    return result
