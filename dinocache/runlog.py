"""Small pieces of a run's bookkeeping: the run record the manifest keeps, the stage timer, and
the pacing of manifest commits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STAGES = ("decode_wait", "upload", "forward", "download", "write_wait", "commit")


@dataclass
class StageTimer:
    """Where the time goes: waiting for decoded batches (decode-bound), the upload and resize on
    the device, the forward, the device-to-host copy, waiting for the writer (disk-bound), and
    manifest commits. On a GPU the stages are timed at synchronisation points, so a stage
    includes device work queued before it."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


@dataclass
class RunRecord:
    """One entry of manifest["runs"]: what a run (one rank of it) did, when and how fast.
    `images_per_second` counts extracted images over the run's wall time from the first
    decode to the last commit (model loading excluded) -- the one throughput figure reported."""

    started: str
    input_dir: str
    planned: int
    device: str
    tool_version: str
    rank: int = 0
    world_size: int = 1
    processed: int = 0
    failed: int = 0
    interrupted: str | None = None
    batch_sizes: dict[str, int] = field(default_factory=dict)  # bucket -> batch size after any OOM halving
    oom_retries: int = 0
    _began: float = field(default_factory=time.perf_counter, repr=False)

    def seconds(self) -> float:
        return time.perf_counter() - self._began

    def images_per_second(self) -> float:
        seconds = self.seconds()
        return self.processed / seconds if seconds > 0 else 0.0

    def as_dict(self, stages: StageTimer, finished: str) -> dict:
        out = {
            "started": self.started,
            "input_dir": self.input_dir,
            "planned": self.planned,
            "device": self.device,
            "tool_version": self.tool_version,
            "rank": self.rank,
            "world_size": self.world_size,
            "finished": finished,
            "processed": self.processed,
            "failed": self.failed,
            "seconds": round(self.seconds(), 3),
            "stage_seconds": stages.rounded(),
            "images_per_second": round(self.images_per_second(), 3),
        }
        if self.interrupted:
            out["interrupted"] = self.interrupted
        if self.oom_retries:
            out["oom_retries"] = self.oom_retries
            out["batch_sizes"] = dict(self.batch_sizes)
        return out


class CommitPacer:
    """When to rewrite the manifest: every `interval` seconds, but a commit rewrites the whole
    sample table (4 s at 10M samples), so the interval grows to keep commits under ~10% of the
    run. Shards are self-describing: a crash between commits loses nothing."""

    def __init__(self, interval: float):
        self.base = self.interval = interval
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def committed(self, took: float) -> None:
        self.last = time.monotonic()
        self.interval = max(self.base, 10 * took)
