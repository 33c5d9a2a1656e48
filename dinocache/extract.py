"""The extraction pipeline:

    scan -> select work (skip cached, place the rest: bucket + crop box) -> decode in workers
         -> one exact shape per batch -> forward -> feature tensors -> shard writer -> manifest

Everything cheap is checked before the model's weights load: the input, the settings against
the cache, the lock, damaged shards, and whether there is anything to do at all. Per-image
problems are recorded as failures and the run goes on. SIGINT/SIGTERM stop it in order: the
batch in flight is finished, written and committed. State bookkeeping lives in state.py, the
decode workers in decoding.py, the forward and its out-of-memory halving in forward.py, the
layout of what is written in layout.py.

Read top-down: `_extract` (checks, settings, the cache settled, work selected and shared out),
`_extract_work` (one run's loader, writer and forward), `_Batches` (each batch in turn), `_finish`
(the run recorded: a commit, or a rank's report). Every failure goes through `RunFailures`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ._version import __version__
from .buckets import Bucket, make_buckets
from .config import ExtractOptions
from .decoding import (
    BatchSizes,
    BucketBatches,
    DecodeDataset,
    collate_decoded,
    cpu_worker_init,
    gpu_worker_init,
)
from .distributed import RankContext, split_by_cost
from .errors import CacheError, ConfigError, DinocacheError, untrusted
from .faults import fault_point
from .forward import Forward, nonfinite_rows
from .imaging import Preprocessing
from .lock import CacheLock, WriterLease, writers_at_work
from .manifest import MANIFEST_NAME, NORM_FILE, recorded_model, recorded_source
from .model import LoadedModel, ModelSpec, check_layers, check_model_spec, check_registers, load_weights, resolve_model
from .names import DEFAULT_MODEL
from .normstats import is_fresh
from .presets import warn_about_sizes
from .reports import merge_cache, write_rank_report
from .runlog import CommitPacer, RunRecord, StageTimer
from .sources import SourceFile, open_source
from .state import CacheState, now
from .worklist import Selection, WorkItem, select_work
from .writer import ShardWriter

log = logging.getLogger("dinocache")

MIN_ATTEMPTS_FOR_FRACTION = 100  # --max-failures 0.5 is judged once this many images were tried


@dataclass
class ExtractResult:
    out: Path
    scanned: int = 0
    processed: int = 0
    skipped: int = 0  # cached and unchanged
    failed_before: int = 0  # recorded as failed by an earlier run, unchanged: not retried
    failed: int = 0  # failures recorded in the cache (all runs)
    failed_this_run: int = 0
    failures_this_run: dict[str, int] = field(default_factory=dict)  # reason -> count
    missing_sources: list[str] = field(default_factory=list)  # cached or failed keys whose file is gone
    missing_failed: int = 0  # how many of those were failures, not cached features
    pruned: int = 0
    repaired_shards: dict[str, str] = field(default_factory=dict)  # file -> what was wrong
    lost: list[str] = field(default_factory=list)  # rows of damaged shards whose source is gone
    shards_written: int = 0
    shards_adopted: int = 0
    job_processed: int | None = None  # rank 0 of a torchrun job: images extracted by all ranks
    seconds: float = 0.0  # the run's wall time, model loading excluded
    images_per_second: float = 0.0  # processed / seconds: the one throughput figure
    model_loaded: bool = False
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stale_statistics: list[str] = field(default_factory=list)  # flavours whose norm-stats no longer match

    @property
    def extracted_nothing(self) -> bool:
        """Images were tried and every one failed (a list of paths relative to the wrong folder):
        the CLI exits 1, so a pipeline does not ship an empty cache as a success."""
        processed = self.job_processed if self.job_processed is not None else self.processed
        return processed == 0 and self.failed_this_run > 0


class Interrupted(DinocacheError):
    """SIGINT or SIGTERM stopped the run after committing what was done."""

    def __init__(self, signum: int, kept: int, result: ExtractResult):
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name}: {kept} image(s) extracted by this run are kept", "rerun the same command to resume"
        )
        self.signum, self.kept, self.result = signum, kept, result

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def cache_settings(mspec: ModelSpec, prep: Preprocessing, layout, buckets: list[Bucket]) -> dict:
    """Everything that changes the stored features; a cache never mixes two of these.
    JSON-normalized, so that it compares equal to what a manifest read back holds."""
    import dataclasses

    layout = dataclasses.replace(layout, summary=mspec.family.summary)  # CLS, or a pooling head's output
    return json.loads(
        json.dumps(
            {
                "model": mspec.record(),
                "preprocessing": prep.record(),
                "storage": layout.record(),
                "buckets": [b.to_record(layout.pool) for b in buckets],
            }
        )
    )


def _warn_about_partial_pool_windows(buckets: list[Bucket], pool: int) -> None:
    """A --pool that does not divide a grid averages partial windows at its bottom and right
    edges: a stored token then no longer covers a fixed square of pixels (REPA's alignment)."""
    uneven = [b for b in buckets if pool > 1 and (b.grid[0] % pool or b.grid[1] % pool)]
    if uneven:
        b = uneven[0]
        log.warning(
            "--pool %d does not divide the patch grid of %d bucket(s) (e.g. %s: %dx%d): their last "
            "stored row/column averages a partial window; pick a --pool that divides every grid "
            "if stored tokens must line up with a DiT's",
            pool,
            len(uneven),
            b.name,
            *b.grid,
        )


def preprocessing(mspec: ModelSpec, options: ExtractOptions) -> Preprocessing:
    from .presets import build_preprocessing

    return build_preprocessing(
        mspec,
        options.buckets.resize,
        options.jpeg_draft,
        options.preset,
        options.token_pixels,
        options.image_mean,
        options.image_std,
    )


def _check_failure_budget(
    options: ExtractOptions, result: ExtractResult, header_failed: int, header_total: int, out=None
) -> None:
    """Stop once more images failed than --max-failures allows. Header failures are all known
    before the first batch while decode failures trickle in, so a fraction is judged as the
    header failure rate plus the decode failure rate so far among the rest: 200 unreadable
    headers among a million images must not look like 100% after the first batch."""
    limit = options.max_failures
    if limit is None:
        return
    failed = result.failed_this_run
    decode_failed = failed - header_failed
    decoded = result.processed + decode_failed
    if isinstance(limit, int):
        too_many = failed > limit
    else:
        header_rate = header_failed / header_total if header_total else 0.0
        decode_rate = decode_failed / decoded if decoded else 0.0
        rate = header_rate + (1 - header_rate) * decode_rate
        judged = header_failed + decoded >= min(MIN_ATTEMPTS_FOR_FRACTION, header_total)
        too_many = judged and rate > limit
    if too_many:
        raise DinocacheError(
            f"stopped: {failed} of {header_failed + decoded} images tried failed, over --max-failures {limit} "
            "(everything extracted so far is kept)",
            f"`dinocache keys {out or options.out} --failed` lists them with their reasons; fix the data or raise "
            "--max-failures",
        )


def extract(input_dir: str | Path, options: ExtractOptions, loaded: LoadedModel | None = None) -> ExtractResult:
    """Extract features for every image of `input_dir` into `options.out`: a folder, webdataset
    tar shards (a path, URL, glob or brace pattern) or a list file (sources.py).

    Under torchrun every rank calls this; each takes a cost-balanced share of the remaining work
    and writes its own shards, and rank 0 merges the manifest once all have finished.
    """
    ctx = RankContext.create(options.rank, options.world_size, options.device)
    try:
        return _extract(str(input_dir), options, loaded, ctx)
    finally:
        ctx.close()


def _extract(input_dir: str, options: ExtractOptions, loaded: LoadedModel | None, ctx: RankContext) -> ExtractResult:
    from .location import CacheLocation
    from .remote import RemoteSession

    location = CacheLocation(options.out)
    remote = location.remote
    root = _output_root(remote, options, ctx)
    source = open_source(input_dir, exclude=[root], follow_symlinks=options.follow_symlinks)
    sources = source.scan()
    crops = _load_crops(options, sources)
    # Cheap checks first: the model the cache was built with, the model's shape and settings (no
    # weights), then the cache.
    _check_same_model(root, options)
    mspec = loaded.spec if loaded is not None and loaded.spec is not None else _resolve_model(options, ctx)
    prep, buckets, settings = _run_settings(mspec, options)
    result = ExtractResult(out=options.out, scanned=len(sources))
    _make_output_folder(root)
    session = RemoteSession(remote) if remote is not None and ctx.leader else contextlib.nullcontext()
    with CacheLock(root) if ctx.leader else contextlib.nullcontext(), session:
        if ctx.leader:
            store = location.shards(root)
            writers = writers_at_work(root, remote, options.out, options.overwrite)  # their files stay
            state = CacheState.open(
                root, settings, options.overwrite, not writers, extras={NORM_FILE: mspec.norm_file()}, store=store
            )
            _settle_cache(state, source.describe(), sources, options, result)
        ctx.barrier()
        if not ctx.leader or ctx.multi:  # every rank selects work from the same committed snapshot
            state = _committed_state(root, settings, mspec, location, ctx)
        selection = select_work(
            sources, buckets, state, prep.resize, options.max_pixels, options.rehash, crops, ctx, options.retry_failed
        )
        # Another engine (ray_engine.py) cuts its work units from the whole sorted scan.
        runner = options.engine.runner(sources, mspec) if options.engine is not None else _extract_work
        del sources  # the work list holds what is needed; a run may scan millions of files
        work = _my_share(_apply_selection(selection, state, result, ctx), buckets, ctx)
        _check_header_failures(options, result, work, state, ctx, root)
        if work and options.engine is None:  # an engine's workers load their own
            loaded = loaded or load_weights(mspec, options.compile, options.sdpa_backend)
            result.model_loaded = True
        with _disk_full_is_a_cache_error(root), WriterLease(root, remote) if ctx.multi else contextlib.nullcontext():
            try:
                runner(source.describe(), work, buckets, loaded, state, options, result, ctx)
            finally:
                result.failed = len(state.failures)
        ctx.barrier()
        if ctx.multi and ctx.group and ctx.rank == 0:
            merged = merge_cache(options.out, True, session) if remote is not None else merge_cache(root, True)
            result.job_processed = merged.processed
    result.failed = len(state.failures)
    for f in state.failures.values():
        result.failures_by_reason[f["reason"]] = result.failures_by_reason.get(f["reason"], 0) + 1
    return result


def _output_root(remote, options: ExtractOptions, ctx: RankContext) -> Path:
    """The local folder the run writes (a remote cache's mirror), after the checks of what a
    multi-process run may not do."""
    if ctx.multi and options.engine is not None:
        raise ConfigError("--engine ray runs its own workers", "drop --rank/--world-size (and torchrun)")
    if ctx.multi and not ctx.group and (options.overwrite or options.prune or options.repair):
        raise ConfigError(
            "--overwrite, --prune and --repair change the whole cache: run them without --rank/--world-size",
            "run `dinocache merge OUT` after the ranks, then a single extract with the option",
        )
    if remote is None:
        return Path(options.out)
    # The remote decides, not a stale mirror; the other ranks of a group pull once rank 0 has committed.
    return remote.mirror() if ctx.group and not ctx.leader else remote.sync_mirror()


def _load_crops(options: ExtractOptions, sources: list[SourceFile]) -> dict | None:
    if options.preset is not None:
        from .presets import check_no_crops

        check_no_crops(options.preset, options.crops)
    if options.crops is None:
        return None
    from .crops import load_crops

    return load_crops(options.crops, options.buckets, sources)


def _resolve_model(options: ExtractOptions, ctx: RankContext) -> ModelSpec:
    return resolve_model(
        options.model,
        options.revision,
        ctx.device(options.device),
        options.dtype,
        options.image_mean,
        options.image_std,
        options.seed,
    )


def _run_settings(mspec: ModelSpec, options: ExtractOptions) -> tuple[Preprocessing, list[Bucket], dict]:
    """(preprocessing, buckets, the cache settings) of this run, checked against the model."""
    check_layers(options.layers, mspec)
    check_registers(options.keep_registers, mspec)
    prep = preprocessing(mspec, options)
    buckets = make_buckets(options.buckets.sizes, mspec.patch_size, prep.token_pixels)
    _warn_about_partial_pool_windows(buckets, options.pool)
    warn_about_sizes(options.preset, options.buckets.sizes)
    return prep, buckets, cache_settings(mspec, prep, options.layout(), buckets)


def _make_output_folder(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the output folder {root}: {exc.strerror}", "pass a writable --out") from None


def _settle_cache(
    state: CacheState, source: str, sources: list[SourceFile], options: ExtractOptions, result: ExtractResult
) -> None:
    """The leader's work on the cache before any new work: damaged shards dropped, orphan shards
    adopted, the source checked, images gone noted (or pruned); then one commit, so repairs,
    adopted shards and pruning are durable first."""
    damage = state.find_damage(deep=options.repair)
    if damage.shards:
        result.repaired_shards = {state.shards[i]["file"]: why for i, why in damage.shards.items()}
        state.drop_damaged(damage)
    result.shards_adopted = state.adopt_orphans()
    _check_same_source(state, source, options)
    _note_missing_sources(state, sources, options, result)
    if damage.lost_keys:
        present = {s.key for s in sources}
        result.lost = [k for k in damage.lost_keys if k not in present]
        failures = RunFailures(state, result)
        for key in result.lost:  # not this run's failure: not counted
            failures.record(key, -1, -1, "lost", "its shard was damaged and its source image is gone", counted=False)
    state.commit()  # repairs, adopted shards and pruning are durable before any new work


def _committed_state(root: Path, settings: dict, mspec: ModelSpec, location, ctx: RankContext) -> CacheState:
    """The cache as committed (a rank's view: it never cleans up or overwrites). A rank of a
    remote cache writes its shards straight up (its store) and its report too (reports.py)."""
    if location.is_remote and ctx.group and not ctx.leader:
        location.remote.sync_mirror()  # rank 0 has settled and committed the cache
    store, extras = location.shards(root), {NORM_FILE: mspec.norm_file()}
    if (root / MANIFEST_NAME).exists():
        return CacheState.open(root, settings, overwrite=False, cleanup=False, extras=extras, store=store)
    return CacheState(root, settings, extras, store)


def _my_share(work: list[WorkItem], buckets: list[Bucket], ctx: RankContext) -> list[WorkItem]:
    if not ctx.multi:
        return work
    share = split_by_cost([w.bucket for w in work], [b.num_patches for b in buckets], ctx.world_size)[ctx.rank]
    return [work[i] for i in share]


def _check_header_failures(
    options: ExtractOptions, result: ExtractResult, work: list, state: CacheState, ctx: RankContext, root: Path
) -> None:
    """The failures found in headers count before any weights load."""
    try:
        _check_failure_budget(options, result, result.failed_this_run, len(work) + result.failed_this_run, root)
    except DinocacheError:
        if ctx.leader and not ctx.multi:
            state.commit()  # the failures that stopped the run are what `keys --failed` must list
        raise


@contextlib.contextmanager
def _disk_full_is_a_cache_error(root: Path):
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CacheError(
                f"the disk holding {root} is full: {exc}",
                "free space and rerun the same command; everything finished so far is kept",
            ) from None
        raise


class RunFailures:
    """Every image a run cannot use is recorded here, the one way: in the cache
    (`state.add_failure`: the manifest lists it, and an older cached version of it is dropped)
    and, when this process counts it, in the run's counts per reason."""

    def __init__(self, state: CacheState, result: ExtractResult):
        self.state, self.result = state, result

    def record(
        self, key: str, source_bytes: int, source_mtime_ns: int, reason: str, detail: str, counted: bool = True
    ) -> None:
        self.state.add_failure(key, source_bytes, source_mtime_ns, reason, detail)
        if counted:
            self.result.failed_this_run += 1
            self.result.failures_this_run[reason] = self.result.failures_this_run.get(reason, 0) + 1

    def of_work(self, item: WorkItem, reason: str, detail: str) -> None:
        self.record(item.key, item.source_bytes, item.source_mtime_ns, reason, detail)


def _apply_selection(
    selection: Selection, state: CacheState, result: ExtractResult, ctx: RankContext
) -> list[WorkItem]:
    state.pending.extend(selection.refreshed)
    result.skipped, result.failed_before = selection.cached, selection.failed_before
    failures = RunFailures(state, result)
    for src, reason, detail in selection.failures:
        # header failures are known to every rank: rank 0 reports them
        failures.record(src.key, src.size, src.mtime_ns, reason, detail, counted=ctx.rank == 0)
    return selection.work


def _check_same_model(root: Path, options: ExtractOptions) -> None:
    """A cache holds one model's features. Another model is refused before it is looked up, so a
    rerun that forgot --model hears about the cache, not about the default model's Hub repo. A
    local checkpoint is compared by content once resolved (CacheState.open), so another spelling
    of its path, or a copy of the folder, is the same model."""
    from .state import same_model_name

    check_model_spec(options.model)  # a typo is named as one, not as "another model"
    recorded = None if options.overwrite else recorded_model(root)
    if recorded is None or same_model_name(recorded, {"id": options.model, "revision": options.revision}):
        return
    if recorded.get("weights_fingerprint") and Path(options.model).expanduser().exists():
        return  # a local checkpoint: its weights decide
    shown = untrusted(recorded.get("id"))
    raise CacheError(
        f"{root} was built with --model {shown}; this run asks for {options.model}"
        + (" (the default --model)" if options.model == DEFAULT_MODEL else ""),
        f"pass --model {shown} to add to it (the checkpoint the cache was built with, or a copy of it), "
        "another --out for the other model, or --overwrite to rebuild it",
    )


def _check_same_source(state: CacheState, source: str, options: ExtractOptions) -> None:
    """Keys are paths relative to the source: images of two folders with the same relative paths
    would silently replace each other. A cache stays with the source it was built from."""
    recorded = recorded_source({"runs": state.runs})
    if recorded is None or recorded == source or options.new_source or not (len(state.table) or state.failures):
        return
    raise CacheError(
        f"{state.root} was built from {untrusted(recorded)}, and this run reads {source}: keys are paths relative "
        "to the source, so images of the two would replace each other",
        "use another --out for another dataset; if the same images moved, pass --new-source",
    )


def _note_missing_sources(
    state: CacheState, sources: list[SourceFile], options: ExtractOptions, result: ExtractResult
) -> None:
    present = [s.key for s in sources]  # sorted, like the table's keys
    gone_failed = keys_not_in(sorted(state.failures), present)
    gone = keys_not_in(state.table.iter_keys(), present) + gone_failed
    if options.prune and gone:
        state.dropped.update(gone)
        for key in gone:
            state.failures.pop(key, None)
        result.pruned = len(gone)
    else:
        result.missing_sources, result.missing_failed = gone, len(gone_failed)


def keys_not_in(sorted_keys, sorted_present: list[str]) -> list[str]:
    """Keys of the first sorted sequence that the second (sorted) lacks: a merge, no big sets."""
    gone, j = [], 0
    for key in sorted_keys:
        while j < len(sorted_present) and sorted_present[j] < key:
            j += 1
        if j >= len(sorted_present) or sorted_present[j] != key:
            gone.append(key)
    return gone


class StopSignals:
    """SIGINT/SIGTERM while extracting: the first asks the run to stop after the batch in flight
    (then everything done is written and committed); a second exits at once (what was committed
    stays: every write is atomic). Installed only in the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            print(
                f"\n{signal.Signals(signum).name} again: exiting now; everything committed so far is kept",
                file=sys.stderr,
                flush=True,
            )
            import os

            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after the batch in flight and committing "
            "(send it again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _extract_work(
    input_dir: str,
    work: list[WorkItem],
    buckets: list[Bucket],
    loaded: LoadedModel | None,
    state: CacheState,
    options: ExtractOptions,
    result: ExtractResult,
    ctx: RankContext,
) -> None:
    commits = not ctx.multi  # ranks leave the manifest alone and report instead; rank 0 merges
    device = loaded.device if loaded is not None else torch.device("cpu")
    run = RunRecord(
        started=now(),
        input_dir=input_dir,
        planned=len(work),
        device=str(device),
        tool_version=__version__,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    timer = StageTimer()
    run.failed = result.failed_this_run
    if not work:
        _finish(state, run, timer, result, commits, ctx, [], None)
        return
    sizes = BatchSizes(options.batch_size or options.buckets.batch_size, device.type)
    loader = _decode_loader(work, buckets, state, options, sizes, ctx)
    model = state.settings["model"]
    writer = ShardWriter(
        state.root,
        state.layout,
        state.settings,
        model["hidden_size"],
        model["num_registers"],
        options.shard_max_bytes,
        upload=state.store.upload,
    )
    forward = Forward(loaded, state.layout, sizes, run, timer)
    batches = _Batches(work, buckets, forward, writer, state, options, result, commits)
    try:
        with StopSignals() as stop:
            batches.run_all(loader, stop)
    finally:
        _finish(state, run, timer, result, commits, ctx, batches.written, writer.run_id)
    if run.interrupted:
        raise Interrupted(stop.signum, result.processed, result)


def _decode_loader(
    work: list[WorkItem], buckets: list[Bucket], state: CacheState, options: ExtractOptions, sizes, ctx: RankContext
) -> DataLoader:
    """Decoded batches of one bucket each, from worker processes (in this one with --workers 0)."""
    device_type = sizes.device_type
    prep = Preprocessing.from_record(state.settings["preprocessing"])
    crop_only = device_type == "cuda" if options.resize_on_device is None else options.resize_on_device
    crop_only = crop_only and prep.is_processor_resize  # a recipe's own resize runs in the workers
    dataset = DecodeDataset(work, buckets, prep, options.max_pixels, crop_only)
    workers = ctx.default_workers() if options.workers is None else options.workers
    return DataLoader(
        dataset,
        batch_sampler=BucketBatches(work, buckets, sizes),
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=device_type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=(cpu_worker_init if device_type == "cpu" else gpu_worker_init) if workers else None,
    )


def _progress_bar(total: int, shown: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        disable=not shown,
        mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not 10 a second
        dynamic_ncols=True,
        desc="extract",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
    )


class _Batches:
    """One run's decoded batches, each in turn: its decode failures recorded, its features computed
    (`Forward`), rows that are not finite recorded as failures, the rest written; shards that
    landed indexed, the manifest committed at the pacer's pace, the failure budget checked."""

    def __init__(self, work, buckets, forward: Forward, writer: ShardWriter, state, options, result, commits: bool):
        self.work, self.buckets, self.forward, self.writer = work, buckets, forward, writer
        self.state, self.options, self.result, self.commits = state, options, result, commits
        self.run, self.timer = forward.run, forward.timer
        self.failures = RunFailures(state, result)
        self.pacer = CommitPacer(options.commit_every_s)
        self.written: list[dict] = []  # this run's shard records, for the rank report
        self.current_bucket: int | None = None
        self.header_failed = result.failed_this_run  # known before the first batch
        self.total = len(work) + result.failed_this_run

    def run_all(self, loader: DataLoader, stop: StopSignals) -> None:
        """Every batch until the loader ends or a stop signal; then the writer closes (also on a
        stop: what is done gets written) and every shard that reached the disk is indexed."""
        writer, timer = self.writer, self.timer
        bar = _progress_bar(len(self.work), self.options.progress)
        try:
            self.check_budget()
            batches = iter(loader)
            while stop.signum is None:
                began = time.perf_counter()
                try:
                    indices, hashes, pixels, failed = next(batches)
                except StopIteration:
                    break
                timer.add("decode_wait", time.perf_counter() - began)
                self.one(indices, hashes, pixels, failed, bar)
                self.check_budget()
            del batches
            closing = writer.close()  # also on a stop signal: what is done gets written
        except BaseException:
            self.landed(writer.close_quietly())  # index every shard that did reach the disk, then fail
            raise
        finally:
            bar.close()
        self.landed(closing)
        timer.add("write_wait", writer.take_wait_seconds())
        if stop.signum is not None:
            self.run.interrupted = signal.Signals(stop.signum).name

    def one(self, indices: list[int], hashes: list[str], pixels, failed: list, bar) -> None:
        work, result, timer = self.work, self.result, self.timer
        for i, (reason, detail) in failed:
            self.failures.of_work(work[i], reason, detail)
        batch_bucket = work[(indices or [failed[0][0]])[0]].bucket
        if self.current_bucket is not None and batch_bucket != self.current_bucket:
            self.writer.flush(self.current_bucket)  # a bucket is done: its last shard need not wait
        self.current_bucket = batch_bucket
        attempted = len(indices) + len(failed)
        if pixels is not None:
            bucket = self.buckets[batch_bucket]
            tensors = self.forward.features(pixels, bucket)
            tensors, indices, hashes = self.drop_nonfinite(tensors, indices, hashes)
        if pixels is not None and indices:
            began = time.perf_counter()
            self.writer.add(bucket, tensors, [work[i].record(h) for i, h in zip(indices, hashes)])
            waited = self.writer.take_wait_seconds()
            timer.add("write_wait", waited)
            timer.add("download", time.perf_counter() - began - waited)
        self.landed(self.writer.completed())
        result.processed += len(indices)
        self.run.processed, self.run.failed = result.processed, result.failed_this_run
        bar.update(attempted)
        fault_point("batch_done")
        if self.commits and self.pacer.due():
            began = time.monotonic()
            self.state.commit()
            self.pacer.committed(time.monotonic() - began)
            timer.add("commit", time.monotonic() - began)

    def drop_nonfinite(self, tensors: dict, indices: list, hashes: list):
        """Rows whose features hold NaN or Inf (float16 overflow, a broken checkpoint) become
        recorded failures instead of poisoning the cache."""
        bad_rows = nonfinite_rows(tensors)
        if not bad_rows:
            return tensors, indices, hashes
        for row in bad_rows:
            self.failures.of_work(
                self.work[indices[row]],
                "nonfinite",
                "the model produced NaN or Inf for this image (float16 overflow? try --dtype bfloat16)",
            )
        bad = set(bad_rows)
        kept = [r for r in range(len(indices)) if r not in bad]
        keep = torch.tensor(kept, dtype=torch.long)
        return (
            {k: v[keep.to(v.device)] for k, v in tensors.items()},
            [indices[r] for r in kept],
            [hashes[r] for r in kept],
        )

    def landed(self, shards: list[tuple[dict, list[dict]]]) -> None:
        for record, samples in shards:
            self.state.add_shard(record, samples)
            self.written.append(record)
            self.result.shards_written += 1

    def check_budget(self) -> None:
        _check_failure_budget(self.options, self.result, self.header_failed, self.total)


def _finish(
    state: CacheState,
    run: RunRecord,
    timer: StageTimer,
    result: ExtractResult,
    commits: bool,
    ctx: RankContext,
    written: list[dict],
    run_id: str | None,
) -> None:
    """Record the run (when it did anything) and make it durable: a commit, or (a rank of a
    multi-process run) a report."""
    run.processed, run.failed = result.processed, result.failed_this_run
    record = run.as_dict(timer, now())
    did_something = run.planned or run.failed or run.interrupted
    if did_something:
        state.runs.append(record)
    # the same frozen figures as the manifest's run record, so the summary and `stats` agree
    result.seconds, result.images_per_second = record["seconds"], record["images_per_second"]
    result.stage_seconds = timer.rounded()
    if commits:
        began = time.monotonic()
        state.commit()
        timer.add("commit", time.monotonic() - began)
        if state.index_info:
            sha = state.index_info["sha256"]
            result.stale_statistics = sorted({str(e.get("flavour")) for e in state.statistics if not is_fresh(e, sha)})
    elif did_something:
        write_rank_report(state, record, ctx.rank, ctx.world_size, written, run_id)
