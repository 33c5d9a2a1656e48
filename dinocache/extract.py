"""The extraction pipeline:

    scan -> plan (bucket + crop box per image) -> decode/resize in worker processes
         -> one exact shape per batch -> forward -> split tokens -> shard writer -> manifest

Per-image problems are recorded as failures and the run goes on. Reruns skip what is cached
(same key, size and mtime; or same content hash with --rehash) and recompute changed files;
state.py keeps the cache's bookkeeping (commits, adoption of shards, multi-rank merges).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .buckets import Bucket, assign_bucket, crop_box, make_buckets
from .config import ExtractOptions
from .distributed import RankContext, split_by_cost
from .errors import CacheError, ConfigError, DecodeError, DinocacheError
from .faults import fault_point
from .features import stored_grid, stored_tensors
from .imaging import decode_image, preprocess, read_source
from .lock import CacheLock
from .manifest import MANIFEST_NAME, RANK_DIR, atomic_write_bytes
from .model import LoadedModel, load_model
from .scan import SourceFile, probe, scan_folder
from .state import CacheState, merge_cache, now
from .writer import ShardWriter, sha256_file

log = logging.getLogger("dinocache")

# Default batch = this many patch tokens: 16 images at 1024x1024 on a GPU. On a CPU large batches
# only delay the first forward (nothing overlaps decoding) and run no faster: ~4 images at 448x448.
TOKENS_PER_BATCH = {"cuda": 65536, "cpu": 4096}
MAX_DEFAULT_BATCH = 256
MIN_ATTEMPTS_FOR_FRACTION = 100  # --max-failures 0.5 is judged once this many images were tried


@dataclass(frozen=True, slots=True)
class PlannedImage:  # one per image to extract: kept small, a run may plan millions
    key: str
    bucket: int
    box: tuple[int, int, int, int]
    source_bytes: int
    source_mtime_ns: int
    source_size: tuple[int, int]

    def record(self, sha256: str) -> dict:
        return {"key": self.key, "bucket": self.bucket, "source_bytes": self.source_bytes,
                "source_mtime_ns": self.source_mtime_ns, "source_sha256": sha256,
                "source_size": list(self.source_size), "box": list(self.box)}


@dataclass
class ExtractResult:
    out: Path
    scanned: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0  # failures recorded in the cache (all runs)
    failed_this_run: int = 0
    missing_sources: int = 0
    pruned: int = 0
    shards_written: int = 0
    shards_adopted: int = 0
    job_processed: int | None = None  # rank 0 of a torchrun job: images extracted by all ranks
    seconds: float = 0.0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"decode_wait": 0.0, "forward": 0.0, "write_wait": 0.0, "commit": 0.0})


def default_batch_size(bucket: Bucket, device_type: str = "cuda") -> int:
    tokens = TOKENS_PER_BATCH.get(device_type, TOKENS_PER_BATCH["cuda"])
    return max(1, min(MAX_DEFAULT_BATCH, tokens // bucket.num_patches))


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
                          "exif_transpose": True, "jpeg_draft": options.jpeg_draft},
        "storage": {"dtype": options.storage_dtype, "registers": options.keep_registers, "pool": options.pool,
                    "layers": list(options.layers), "layers_normed": False,
                    "scaled": options.storage_dtype.startswith("float8")},
        "buckets": [b.to_record() | {"stored_grid": list(stored_grid(b.grid, options.pool))} for b in buckets],
    }))


def _file_sha256(path: str) -> str | None:
    try:
        return sha256_file(Path(path))
    except OSError:
        return None


def _probe(src: SourceFile, max_pixels: int) -> tuple:
    """("ok", width, height) or ("failed", reason, detail): picklable, for gathering across ranks."""
    try:
        if src.size < 0:
            raise DecodeError("unreadable", "cannot stat the file (broken or looping symlink?)")
        if src.size == 0:
            raise DecodeError("empty", "zero-byte file")
        width, height = probe(src.path, max_pixels)
        return ("ok", width, height)
    except DecodeError as exc:
        return ("failed", exc.reason, exc.detail)


def plan_images(sources: list[SourceFile], buckets: list[Bucket], state: CacheState, options: ExtractOptions,
                result: ExtractResult, ctx: RankContext | None = None) -> list[PlannedImage]:
    """Which images to (re)compute and how: a plan sorted by bucket, then key. Under a process
    group each rank reads 1/world of the headers and all ranks receive every result."""
    ctx = ctx or RankContext()
    todo: list[SourceFile] = []
    for src in sources:
        cached = state.cached(src.key)
        previous = cached or state.failures.get(src.key)
        if previous and previous["source_bytes"] == src.size and previous["source_mtime_ns"] == src.mtime_ns \
                and not (options.rehash and cached):
            result.skipped += 1
            continue
        if options.rehash and cached and _file_sha256(src.path) == cached["source_sha256"]:
            # Same content, new size/mtime stamp (copied, touched): keep the row, refresh the stamp.
            state.pending.append({**cached, "source_bytes": src.size, "source_mtime_ns": src.mtime_ns})
            result.skipped += 1
            continue
        todo.append(src)
    if ctx.group:
        mine = {i: _probe(todo[i], options.max_pixels) for i in range(ctx.rank, len(todo), ctx.world_size)}
        probes: dict[int, tuple] = {}
        for part in ctx.all_gather(mine):
            probes.update(part)
    else:
        probes = {i: _probe(src, options.max_pixels) for i, src in enumerate(todo)}
    plan: list[PlannedImage] = []
    for i, src in enumerate(todo):
        status, a, b = probes[i]
        if status != "ok":
            state.add_failure(src.key, src.size, src.mtime_ns, a, b)
            result.failed_this_run += 1
            continue
        bucket = assign_bucket(a, b, buckets)
        plan.append(PlannedImage(src.key, bucket.index, crop_box(a, b, bucket, options.buckets.resize),
                                 src.size, src.mtime_ns, (a, b)))
    plan.sort(key=lambda p: (p.bucket, p.key))
    return plan


class DecodeDataset(Dataset):
    """Read, hash, decode and preprocess one planned image; failures are returned, not raised."""

    def __init__(self, root: Path, plan: list[PlannedImage], buckets: list[Bucket], mean, std, max_pixels: int,
                 jpeg_draft: bool = False, resize_on_device: bool = False):
        self.root, self.plan, self.buckets = root, plan, buckets
        self.mean, self.std, self.max_pixels, self.jpeg_draft = mean, std, max_pixels, jpeg_draft
        self.resize_on_device = resize_on_device  # return the cropped uint8 region; the device resizes

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        item = self.plan[i]
        bucket = self.buckets[item.bucket]
        fault_point("decode")
        try:
            data = read_source(os.path.join(self.root, item.key))
            sha256 = hashlib.sha256(data).hexdigest()
            box, size = item.box, (bucket.input_width, bucket.input_height)
            draft = None
            if self.jpeg_draft:  # the smallest full-image size whose crop box still covers the bucket
                box_w, box_h = box[2] - box[0], box[3] - box[1]
                draft = (math.ceil(size[0] * item.source_size[0] / box_w), math.ceil(size[1] * item.source_size[1] / box_h))
            pixels = decode_image(data, self.max_pixels, draft_size=draft, keep_uint8=self.resize_on_device)
            height, width = pixels.shape[1:]
            if (width, height) != item.source_size:
                scale_x, scale_y = width / item.source_size[0], height / item.source_size[1]
                if draft is None or width < draft[0] or height < draft[1]:
                    raise DecodeError("changed", f"decoded size {width}x{height} differs from the header's "
                                                 f"{item.source_size[0]}x{item.source_size[1]} (file replaced during "
                                                 "the run, or EXIF stored after the pixels)")
                box = (round(box[0] * scale_x), round(box[1] * scale_y), round(box[2] * scale_x), round(box[3] * scale_y))
            if self.resize_on_device:
                x = pixels[:, box[1]:box[3], box[0]:box[2]].contiguous()
            else:
                x = preprocess(pixels, box, size, self.mean, self.std)
            return i, x, sha256, None
        except DecodeError as exc:
            return i, None, None, (exc.reason, exc.detail)
        except Exception as exc:  # a decoder bug must cost one image, not the run
            return i, None, None, ("decode_error", f"{type(exc).__name__}: {exc}")


def collate_decoded(items):
    """Model-ready images stack into one batch; cropped regions of different sizes (resize on the
    device) stay a list."""
    ok = [(i, x, h) for i, x, h, err in items if err is None]
    failed = [(i, err) for i, x, h, err in items if err is not None]
    pixels = [x for _, x, _ in ok] if ok else None
    if pixels and len({x.shape for x in pixels}) == 1 and pixels[0].dtype == torch.float32:
        pixels = torch.stack(pixels)
    return [i for i, _, _ in ok], [h for _, _, h in ok], pixels, failed


def resize_on(device: torch.device, regions: list[torch.Tensor], size: tuple[int, int], mean, std) -> torch.Tensor:
    """Upload each cropped region (uint8 where the source was 8-bit) and resize + normalize it on
    `device`: the same math as the workers' path, without its CPU cost (~40 ms per 3 MP image)."""
    return torch.stack([preprocess(r.to(device, non_blocking=True), (0, 0, r.shape[2], r.shape[1]), size, mean, std)
                        for r in regions])


class BucketBatches:
    """Consecutive index chunks of the plan, never crossing a bucket (one exact shape per batch).
    Generated lazily: a list of lists would cost ~100 bytes per image."""

    def __init__(self, plan: list[PlannedImage], buckets: list[Bucket], batch_size: int | None, device_type: str):
        self.plan, self.buckets, self.batch_size, self.device_type = plan, buckets, batch_size, device_type

    def __iter__(self):
        plan, start = self.plan, 0
        while start < len(plan):
            bucket = self.buckets[plan[start].bucket]
            size = self.batch_size or default_batch_size(bucket, self.device_type)
            end = start
            while end < len(plan) and end - start < size and plan[end].bucket == bucket.index:
                end += 1
            yield list(range(start, end))
            start = end

    def __len__(self) -> int:
        return sum(1 for _ in self)


def keys_not_in(sorted_keys, sorted_present: list[str]) -> list[str]:
    """Keys of the first sorted sequence that the second (sorted) lacks: a merge, no big sets."""
    gone, j = [], 0
    for key in sorted_keys:
        while j < len(sorted_present) and sorted_present[j] < key:
            j += 1
        if j >= len(sorted_present) or sorted_present[j] != key:
            gone.append(key)
    return gone


def _decode_worker_init(_worker_id: int) -> None:
    """Decode workers yield to the forward: on a CPU-only machine they share cores with the model's
    threads, whose spin-waiting barriers lose far more than a decode gains when preempted."""
    try:
        os.nice(10)
    except OSError:
        pass


def default_workers() -> int:
    """One decode process per spare core, at most 8; under torchrun the node's cores are shared
    by its LOCAL_WORLD_SIZE ranks."""
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cores - 1))


def _check_failure_budget(options: ExtractOptions, failed: int, attempted: int, total: int) -> None:
    limit = options.max_failures
    if limit is None:
        return
    if isinstance(limit, int):
        too_many = failed > limit
    else:
        too_many = attempted >= min(MIN_ATTEMPTS_FOR_FRACTION, total) and failed > limit * attempted
    if too_many:
        raise DinocacheError(
            f"stopped: {failed} of {attempted} images failed, over --max-failures {limit} "
            "(everything extracted so far is kept)",
            "see `dinocache stats` for the reasons; fix the data or raise --max-failures")


def extract(input_dir: str | Path, options: ExtractOptions, loaded: LoadedModel | None = None) -> ExtractResult:
    """Extract features for every image under `input_dir` into `options.out`.

    Under torchrun every rank calls this; each takes a cost-balanced share of the remaining work
    and writes its own shards, and rank 0 merges the manifest once all have finished.
    """
    ctx = RankContext.create(options.rank, options.world_size, options.device)
    try:
        return _extract(Path(input_dir), options, loaded, ctx)
    finally:
        ctx.close()


def _extract(input_dir: Path, options: ExtractOptions, loaded: LoadedModel | None, ctx: RankContext) -> ExtractResult:
    root = Path(options.out)
    started = time.perf_counter()
    sources = scan_folder(input_dir)
    try:  # cheap input checks before the model loads
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the output folder {root}: {exc.strerror}", "pass a writable --out") from None
    loaded = loaded or load_model(options.model, options.revision, ctx.device(options.device), options.dtype,
                                  options.image_mean, options.image_std, options.seed, options.compile,
                                  options.sdpa_backend)
    buckets = make_buckets(options.buckets.sizes, loaded.patch_size)
    settings = cache_settings(loaded, buckets, options)
    result = ExtractResult(out=root, scanned=len(sources))
    bad_layers = [k for k in options.layers if not 1 <= k <= loaded.config.get("num_hidden_layers", 0)]
    if bad_layers:
        raise ConfigError(f"--layers {','.join(map(str, bad_layers))}: this model has blocks 1.."
                          f"{loaded.config.get('num_hidden_layers')}", "pick block numbers in that range")
    if ctx.multi and not ctx.group and (options.overwrite or options.prune):
        raise ConfigError("--overwrite and --prune change the whole cache: run them without --rank/--world-size",
                          "run `dinocache merge OUT` after the ranks, then a single extract with the option")
    leader = ctx.rank == 0 and (ctx.group or not ctx.multi)  # the one process that commits
    with CacheLock(root) if leader else contextlib.nullcontext():
        if leader:
            state = CacheState.open(root, settings, options.overwrite)
            result.shards_adopted = state.adopt_orphans()
            _note_missing_sources(state, sources, options, result)
            state.commit()  # adopted shards and pruning are durable before any new work
        ctx.barrier()
        if not leader or ctx.multi:  # every rank plans from the same committed snapshot
            state = CacheState.open(root, settings, overwrite=False, cleanup=False) if (root / MANIFEST_NAME).exists() \
                else CacheState(root, settings)
        plan = plan_images(sources, buckets, state, options, result, ctx)
        del sources  # the plan holds what is needed; a run may scan millions of files
        if ctx.multi:
            share = split_by_cost([p.bucket for p in plan], [b.num_patches for b in buckets], ctx.world_size)[ctx.rank]
            if ctx.rank != 0:  # headers failures are known to every rank: rank 0 reports them
                result.failed_this_run = 0
            plan = [plan[i] for i in share]
        _run_plan(input_dir, plan, buckets, loaded, state, options, result, ctx)
        ctx.barrier()
        if ctx.multi and ctx.group and ctx.rank == 0:
            result.job_processed = merge_cache(root, locked=True).processed
    result.seconds = time.perf_counter() - started
    result.failed = len(state.failures)
    for f in state.failures.values():
        result.failures_by_reason[f["reason"]] = result.failures_by_reason.get(f["reason"], 0) + 1
    return result


def _note_missing_sources(state: CacheState, sources: list[SourceFile], options: ExtractOptions,
                          result: ExtractResult) -> None:
    present = [s.key for s in sources]  # sorted, like the table's keys
    gone = keys_not_in(state.table.iter_keys(), present) + keys_not_in(sorted(state.failures), present)
    result.missing_sources = len(gone)
    if options.prune and gone:
        state.dropped.update(gone)
        for key in gone:
            state.failures.pop(key, None)
        result.pruned, result.missing_sources = len(gone), 0


def _run_plan(input_dir: Path, plan, buckets, loaded, state: CacheState, options: ExtractOptions, result: ExtractResult,
              ctx: RankContext | None = None) -> None:
    ctx = ctx or RankContext()
    commits = not ctx.multi  # ranks leave the manifest alone and report instead; rank 0 merges
    written: list[dict] = []  # this run's shard records, for the rank report
    from tqdm import tqdm

    batch_size = options.batch_size or options.buckets.batch_size
    on_device = loaded.device.type == "cuda" if options.resize_on_device is None else options.resize_on_device
    dataset = DecodeDataset(input_dir, plan, buckets, loaded.image_mean, loaded.image_std, options.max_pixels,
                            options.jpeg_draft, on_device)
    workers = default_workers() if options.workers is None else options.workers
    loader = DataLoader(dataset, batch_sampler=BucketBatches(plan, buckets, batch_size, loaded.device.type),
                        num_workers=workers,
                        collate_fn=collate_decoded, pin_memory=loaded.device.type == "cuda",
                        prefetch_factor=4 if workers else None,
                        worker_init_fn=_decode_worker_init if loaded.device.type == "cpu" else None)
    writer = ShardWriter(state.root, options.storage_dtype, options.shard_max_bytes, pool=options.pool)

    def landed(shards: list[tuple[dict, list[dict]]]) -> None:
        for record, samples in shards:
            state.add_shard(record, samples)
            written.append(record)
            result.shards_written += 1
    run = {"started": now(), "input_dir": str(Path(input_dir).resolve()), "planned": len(plan),
           "device": str(loaded.device), "tool_version": __version__, "rank": ctx.rank, "world_size": ctx.world_size}
    state.runs.append(run)
    run_started = time.perf_counter()
    last_commit = time.monotonic()
    commit_interval = options.commit_every_s
    current_bucket = None
    total = len(plan) + result.failed_this_run
    # Where the time goes: waiting for decoded batches (decode-bound), the forward plus the
    # device-to-host copy (compute-bound), waiting for the writer (disk-bound), manifest commits.
    stages = result.stage_seconds
    bar = tqdm(total=len(plan), unit="img", disable=not options.progress, dynamic_ncols=True, desc="extract")
    closing: list = []
    try:
        try:
            _check_failure_budget(options, result.failed_this_run, result.failed_this_run, total)
            batches = iter(loader)
            while True:
                began = time.perf_counter()
                try:
                    indices, hashes, pixels, failed = next(batches)
                except StopIteration:
                    break
                stages["decode_wait"] += time.perf_counter() - began
                for i, (reason, detail) in failed:
                    p = plan[i]
                    state.add_failure(p.key, p.source_bytes, p.source_mtime_ns, reason, detail)
                result.failed_this_run += len(failed)
                batch_bucket = plan[(indices or [failed[0][0]])[0]].bucket
                if current_bucket is not None and batch_bucket != current_bucket:
                    writer.flush(current_bucket)  # a bucket is done: its last shard need not wait
                current_bucket = batch_bucket
                if pixels is not None:
                    bucket = buckets[batch_bucket]
                    began = time.perf_counter()
                    if isinstance(pixels, list):
                        pixels = resize_on(loaded.device, pixels, (bucket.input_width, bucket.input_height),
                                           loaded.image_mean, loaded.image_std)
                    hidden, intermediates = loaded.forward_layers(pixels, options.layers)
                    tensors = stored_tensors(hidden, intermediates, loaded.num_registers, bucket.grid,
                                             options.pool, options.keep_registers)
                    # add() copies to the host, which waits for the forward: both count as "forward".
                    writer.add(bucket, tensors, [plan[i].record(h) for i, h in zip(indices, hashes)])
                    waited = writer.take_wait_seconds()
                    stages["write_wait"] += waited
                    stages["forward"] += time.perf_counter() - began - waited
                landed(writer.completed())
                result.processed += len(indices)
                bar.update(len(indices) + len(failed))
                if commits and time.monotonic() - last_commit >= commit_interval:
                    began = time.monotonic()
                    state.commit()
                    last_commit = time.monotonic()
                    stages["commit"] += last_commit - began
                    # A commit rewrites the whole sample index (4 s at 10M samples): keep it under ~10%
                    # of the run. Shards are self-describing, so a crash between commits loses nothing.
                    commit_interval = max(options.commit_every_s, 10 * (last_commit - began))
                _check_failure_budget(options, result.failed_this_run, result.processed + result.failed_this_run, total)
            closing = writer.close()
        except BaseException:
            closing = writer.close_quietly()  # keep every shard that did reach the disk
            raise
        finally:
            bar.close()
            landed(closing)
            seconds = time.perf_counter() - run_started
            stages["write_wait"] += writer.take_wait_seconds()
            run.update(finished=now(), processed=result.processed, failed=result.failed_this_run,
                       seconds=round(seconds, 3), stage_seconds={k: round(v, 3) for k, v in stages.items()},
                       images_per_second=round(result.processed / seconds, 3) if seconds else 0.0)
            if commits:
                state.commit()
            else:
                report = {"rank": ctx.rank, "world_size": ctx.world_size, "settings": state.settings, "run": run,
                          "shards": written, "failures": list(state.failures.values())}
                (state.root / RANK_DIR).mkdir(exist_ok=True)
                atomic_write_bytes(state.root / RANK_DIR / f"rank-{ctx.rank:05d}-{writer.run_id}.json",
                                   json.dumps(report).encode())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CacheError(f"the disk holding {state.root} is full: {exc}",
                             "free space and rerun the same command; everything finished so far is kept") from None
        raise
