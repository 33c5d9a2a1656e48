"""The Ray engine: `extract --engine ray` runs the extraction on a Ray cluster with Ray Data.

The driver (the process that runs `extract`) does everything a single run does before its first
batch: scan, the settings and cache checks, the lock, selection, header failures committed.
Then it cuts the work into fixed units: consecutive items of the sorted scan, `unit_size` of
them, a unit never splitting one file (a tar shard) in two. The units come from the scan, not
from what is left to do, so a retried unit redoes exactly the same images, and a rerun over the
same data has the same units (those whose images are all cached are not sent again).

A pool of actors (`Dataset.map_batches`, one unit per call) loads the model once per actor and
extracts each unit with dinocache's own pipeline (`extract._extract_work`: bucket batches, exact
preprocessing, decode workers), as a worker that writes its shards and a report straight to the
cache (reports.py) and never commits. Ray restarts a dead actor and retries its unit. The driver
is the one committer: it folds the reports into the manifest every --commit-every seconds and
at the end, so a driver crash loses at most reports not yet folded, never shards (`dinocache
merge OUT` or a rerun folds them).

Only this module imports ray (pip install 'dinocache[ray]').
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import pickle
import re
import signal
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DinocacheError, untrusted

log = logging.getLogger("dinocache")

# What the actors take from the driver's environment: dinocache's own settings and the object
# store's endpoint and credentials (a cluster's nodes may have their own: those win there).
FORWARDED_ENV = ("DINOCACHE_", "AWS_", "GOOGLE_", "AZURE_", "FSSPEC_")


@dataclass
class RayOptions:
    """How `extract` runs on Ray (ExtractOptions.engine)."""

    address: str | None = None  # None: the Ray this process is connected to, or a local one started for the run
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    workers_max: int = 1  # actors at most (each loads the model once)
    unit_size: int = 1000  # images per work unit; a tar shard is never split
    unit_retries: int = 3  # a unit whose actor died is redone at most this many times

    def runner(self, sources: list, mspec) -> "RayRunner":
        if self.unit_size < 1 or self.workers_max < 1:
            raise ConfigError("--unit-size and --workers-max must be at least 1", "e.g. --workers-max 8")
        return RayRunner(self, unit_starts(sources, self.unit_size), mspec)


def unit_starts(sources: list, unit_size: int) -> list[str]:
    """The first key of each unit of the sorted scan: a unit is closed once it holds `unit_size`
    items and the next item is read from another file (so a tar shard stays in one unit)."""
    starts: list[str] = []
    count, last_file = 0, None
    for item in sources:
        if not starts or (count >= unit_size and item.path != last_file):
            starts.append(item.key)
            count = 0
        count += 1
        last_file = item.path
    return starts


def group_units(work: list, starts: list[str]) -> list[tuple[int, list]]:
    """(unit index, its work items in the work list's order) for every unit with work left."""
    units: dict[int, list] = {}
    for item in work:
        units.setdefault(bisect.bisect_right(starts, item.key) - 1, []).append(item)
    return sorted(units.items())


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--engine ray needs Ray, which is not installed", "pip install 'dinocache[ray]' (ray[data])"
        ) from None
    return ray


class RayRunner:
    """Runs a selection's work on Ray in place of `extract._extract_work` (same arguments)."""

    def __init__(self, options: RayOptions, starts: list[str], mspec):
        self.options, self.starts, self.mspec = options, starts, mspec

    def __call__(self, input_dir, work, buckets, loaded, state, options, result, ctx) -> None:
        from .extract import Interrupted, _extract_work

        if not work:  # nothing to send: commit and record, as a plain run does
            _extract_work(input_dir, work, buckets, loaded, state, options, result, ctx)
            return
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            _join(ray, self.options.address)
        try:
            # after ray.init, which sets its own SIGTERM handler: from here Ctrl-C commits what finished
            with _StopSignals():
                try:
                    _check_fits(ray, self.options)
                    self._run(ray, input_dir, group_units(work, self.starts), buckets, state, options, result)
                except _Stop as stop:  # before the first unit was waited on: nothing of the job to fold
                    raise Interrupted(stop.signum, result.processed, result) from None
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, input_dir, units, buckets, state, options, result) -> None:
        job = {
            "out": str(options.out),
            "input_dir": input_dir,
            "buckets": buckets,
            "settings": state.settings,
            "extras": state.extras,
            # each actor decodes with its own CPUs (DataLoader workers), as a torchrun rank does
            "options": dataclasses.replace(
                options,
                progress=False,
                engine=None,
                workers=max(0, int(self.options.cpus_per_worker) - 1) if options.workers is None else options.workers,
            ),
            "cwd": os.getcwd(),  # relative input paths and --out mean what they meant here
            "mspec": self.mspec,
            "units": len(self.starts),
            "env": {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)},
        }
        # compressed: keys and paths share long prefixes (about 150 bytes a work item pickled)
        rows = [{"unit": index, "work": zlib.compress(pickle.dumps(items), 1)} for index, items in units]
        log.info(
            "%d unit(s) on Ray, the largest of %d image(s) (--unit-size %d; an archive is never split)",
            len(rows),
            max(len(items) for _, items in units),
            self.options.unit_size,
        )
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for max_task_retries (only **ray_remote_args, which
            # it warns about); without it a unit that kills every actor would be retried forever
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=Warning)
            # a dead actor is always replaced (Ray Data's default max_restarts=-1: a preempted node,
            # an OOM kill), but a unit that kills every actor fails the job
            done = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                UnitWorker,
                batch_size=1,
                fn_constructor_kwargs={"job": pickle.dumps(job)},
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(self.options.workers_max, len(rows))),
                num_cpus=self.options.cpus_per_worker,
                num_gpus=self.options.gpus_per_worker,
                max_task_retries=self.options.unit_retries,
            )
        run = _job_run(input_dir, sum(len(items) for _, items in units), len(rows), result.failed_this_run)
        state.runs.append(run)  # one record for the job; the units' reports add to it as they are folded
        _collect(done, state, run, options, result)


def _collect(done, state, run: dict, options, result) -> None:
    """The driver's loop: count the units as they finish, fold their reports in now and then,
    and at the end; on Ctrl-C or a unit's error, fold what finished first."""
    from .extract import Interrupted
    from .reports import ReportFolder
    from .runlog import CommitPacer

    remote = state.store.remote
    folder = ReportFolder(state.root, remote)
    pacer = CommitPacer(options.commit_every_s)
    began = time.monotonic()
    rows = iter(done.iter_rows())
    try:
        for row in rows:
            result.processed += int(row["processed"])
            result.failed_this_run += int(row["failed"])
            result.shards_written += int(row["shards"])
            if pacer.due():
                commit_began = time.monotonic()
                _fold(state, folder, remote, run, began)
                pacer.committed(time.monotonic() - commit_began)
    except KeyboardInterrupt as stop:
        _close(rows)  # the actors stop first: no report lands after the fold
        _fold(state, folder, remote, run, began)
        result.processed = max(result.processed, int(run["processed"]))  # units done but not yet seen
        result.seconds, result.images_per_second = run["seconds"], run["images_per_second"]
        signum = stop.signum if isinstance(stop, _Stop) else signal.SIGINT
        raise Interrupted(signum, result.processed, result) from None
    except Exception as exc:  # a unit raised (an actor's death is retried by Ray, never seen here)
        _fold(state, folder, remote, run, began)
        raise DinocacheError(
            f"a work unit failed on Ray: {_first_cause(exc)}",
            "everything finished so far is committed; fix the cause and rerun the same command",
        ) from None
    _fold(state, folder, remote, run, began)
    result.seconds, result.images_per_second = run["seconds"], run["images_per_second"]


def _join(ray, address: str | None) -> None:
    """ray.init, every failure of it a DinocacheError that names the address (no traceback)."""
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a Ray cluster (none given: a local one)"
        if address and address.startswith("ray://"):
            fix = (
                "a ray:// address needs Ray Client: pip install 'ray[client]', or pass the head's GCS "
                "address instead (--ray-address HEAD_IP:6379, on a machine of the cluster)"
            )
        else:
            fix = "check --ray-address (the head's HOST:6379: `ray status` there) and that the cluster is up"
        raise DinocacheError(f"cannot join {where}: {untrusted(f'{type(exc).__name__}: {exc}')}", fix) from None


def _check_fits(ray, options: RayOptions) -> None:
    """One actor needs --gpus-per-worker GPUs and --cpus-per-worker CPUs: on a cluster that has
    fewer, Ray would wait forever for it ("pending: 1 CPU, 1 GPU")."""
    has = ray.cluster_resources()
    short = [
        f"{asked:g} {name}" + f" (the cluster has {has.get(name, 0):g})"
        for name, asked in (("GPU", options.gpus_per_worker), ("CPU", options.cpus_per_worker))
        if asked > has.get(name, 0)
    ]
    if short:
        raise ConfigError(
            f"a Ray worker can never start: it asks for {' and '.join(short)}",
            "ask for less (--gpus-per-worker 0 on a CPU cluster, fewer --cpus-per-worker) "
            "or run on a cluster with the GPUs",
        )


class _Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM while the driver waits on Ray: stop and commit what finished."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """The driver's SIGINT/SIGTERM while the job runs: the first raises _Stop in the main thread
    (the driver stops the actors, folds every finished unit's report, exits 128+N); a second exits
    at once. Without it, the CLI's quick handler (interrupt.py) would exit before any fold."""

    def __init__(self):
        self._saved: dict[int, object] = {}
        self._stopping = False

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            os.write(2, f"\n{name} again: exiting now; everything committed so far is kept\n".encode())
            os._exit(128 + signum)
        self._stopping = True
        os.write(
            2, f"\n{name}: stopping the Ray job and committing what finished (send it again to quit at once)\n".encode()
        )
        raise _Stop(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _close(rows) -> None:
    """End the Ray Data execution (its actors with it); a failure to is not the user's problem."""
    try:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    except Exception as exc:  # noqa: BLE001
        log.debug("closing the Ray Data iterator: %s", exc)


def _first_cause(exc: BaseException) -> str:
    """The unit's own error message: Ray passes it on as text, inside its own tracebacks."""
    text = str(exc)
    ours = re.search(r"dinocache\.errors\.\w+: (.+)", text)  # dinocache's own error, as the actor raised it
    raised = ours or re.search(r"^\w+(?:Error|Exception): (.+)$", text, re.MULTILINE)
    return untrusted(raised.group(1) if raised else text.strip().splitlines()[-1] if text.strip() else repr(exc))


def _job_run(input_dir: str, planned: int, units: int, header_failed: int) -> dict:
    from ._version import __version__
    from .runlog import STAGES
    from .state import now

    return {
        "started": now(),
        "input_dir": input_dir,
        "planned": planned,
        "device": "ray",
        "tool_version": __version__,
        "engine": "ray",
        "units": units,
        "failed": header_failed,
        "processed": 0,
        "stage_seconds": dict.fromkeys(STAGES, 0.0),
    }


def _fold(state, folder, remote, run: dict, began: float) -> None:
    """The driver's commit: every report so far, and every shard no manifest names yet."""
    from .reports import fold_reports, read_rank_reports
    from .state import now
    from .store import RemoteShards

    if remote is not None:
        state.store = RemoteShards(remote, state.root)  # a fresh listing: the actors keep adding
    reports = read_rank_reports(folder)[0]
    processed = run["processed"] + sum(int(report["run"].get("processed", 0)) for _, report in reports)
    run["finished"], run["seconds"] = now(), round(time.monotonic() - began, 3)
    run["images_per_second"] = round(processed / run["seconds"], 3) if run["seconds"] else 0.0
    fold_reports(state, folder, reports, into=run)


class UnitWorker:
    """A Ray actor: loads the model once, then extracts one unit per call as a worker (shards and
    a report to the cache, no commit)."""

    def __init__(self, job: bytes):
        self.job = pickle.loads(job)
        os.environ.update(self.job["env"])
        if os.path.isdir(self.job["cwd"]):  # a node that shares the driver's filesystem
            os.chdir(self.job["cwd"])
        from .model import load_weights

        options = self.job["options"]
        self.loaded = load_weights(self.job["mspec"], options.compile, options.sdpa_backend)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out = {"unit": [], "processed": [], "failed": [], "shards": []}
        for unit, blob in zip(batch["unit"], batch["work"]):
            result = self._unit(int(unit), pickle.loads(zlib.decompress(blob)))
            for name, value in (
                ("unit", int(unit)),
                ("processed", result.processed),
                ("failed", result.failed_this_run),
                ("shards", result.shards_written),
            ):
                out[name].append(value)
        return {name: np.asarray(values, dtype=np.int64) for name, values in out.items()}

    def _unit(self, unit: int, work: list):
        from .distributed import RankContext
        from .extract import ExtractResult, _extract_work
        from .lock import WriterLease

        job = self.job
        result = ExtractResult(out=job["out"])
        ctx = RankContext(rank=unit, world_size=job["units"], worker=True)
        state = _worker_state(job)
        with WriterLease(state.root, state.store.remote):
            _extract_work(job["input_dir"], work, job["buckets"], self.loaded, state, job["options"], result, ctx)
        return result


def _worker_state(job: dict):
    """What a worker writes into: the cache folder, or the local mirror of a remote cache (each
    shard uploaded once durable, then dropped)."""
    from .location import CacheLocation
    from .state import CacheState

    location = CacheLocation(job["out"])
    root = location.remote.mirror() if location.is_remote else Path(job["out"])
    return CacheState(root, job["settings"], job["extras"], location.shards(root))
