"""Several processes, one cache: rank discovery (torchrun or explicit flags), deterministic work
split balanced by compute, and the few collectives extract needs.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) a process group is formed
(NCCL on GPUs, gloo on CPUs) and rank 0 merges the manifest once every rank has finished. With
explicit `--rank/--world-size` (e.g. SLURM array tasks, no process group) every rank works
alone and `dinocache merge OUT` writes the manifest afterwards. Either way a rank writes its
shards and its report (reports.py) straight to OUT, a folder or object storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class LauncherEnv:
    """What torchrun (or SLURM via torchrun) put in the environment; read here and nowhere else."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def read(cls) -> "LauncherEnv":
        def number(name: str, default: int) -> int:
            try:
                return int(os.environ.get(name, default))
            except ValueError:
                raise ConfigError(
                    f"the environment variable {name}={os.environ[name]!r} is not a number",
                    "unset it, or launch with torchrun",
                ) from None

        return cls(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", 1))


@dataclass
class RankContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a torch.distributed process group is up
    local_world_size: int = 1  # ranks on this node (they share its cores)
    worker: bool = False  # one of many writers that only report, never commit (a Ray actor's unit)

    @property
    def multi(self) -> bool:
        return self.world_size > 1 or self.worker

    @property
    def leader(self) -> bool:
        """The one process that commits: rank 0 of a process group, or a lone process."""
        return self.rank == 0 and (self.group or not self.multi)

    @classmethod
    def create(cls, rank: int | None, world_size: int | None, device: str) -> "RankContext":
        env = LauncherEnv.read()
        if rank is not None or world_size is not None:  # explicit: no process group
            if rank is None or world_size is None:
                given, missing = ("--rank", "--world-size") if world_size is None else ("--world-size", "--rank")
                raise ConfigError(
                    f"{given} needs {missing} too",
                    "pass both, with 0 <= rank < world size, e.g. --rank 0 --world-size 4",
                )
            if not 0 <= rank < world_size:
                raise ConfigError(
                    f"--rank {rank} --world-size {world_size} is not a valid pair",
                    "pass both, with 0 <= rank < world size",
                )
            return cls(rank, world_size, 0, False, env.local_world_size)
        if env.world_size <= 1:
            return cls(local_world_size=env.local_world_size)
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(env.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(env.rank, env.world_size, env.local_rank, True, env.local_world_size)

    def default_workers(self) -> int:
        """One decode process per spare core, at most 8; the node's cores are shared by its ranks."""
        cores = (os.cpu_count() or 1) // max(1, self.local_world_size)
        return max(0, min(8, cores - 1))

    def device(self, requested: str) -> str:
        """One GPU per rank: `auto`/`cuda` become cuda:LOCAL_RANK under torchrun."""
        if self.group and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj):
        """Every rank's `obj`, in rank order (just [obj] without a process group)."""
        if not self.group:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def split_by_cost(bucket_of: list[int], tokens_of_bucket: list[int], world_size: int) -> list[list[int]]:
    """Assign items (already sorted by bucket) to ranks: within each bucket contiguous slices of
    near-equal size (one shape, so equal cost), the remainders to the least-loaded ranks, so the
    total patch tokens per rank differ by at most one image's worth per bucket. Deterministic."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    start = 0
    while start < len(bucket_of):
        bucket = bucket_of[start]
        end = start
        while end < len(bucket_of) and bucket_of[end] == bucket:
            end += 1
        base, extra = divmod(end - start, world_size)
        counts = [base] * world_size
        for r in sorted(range(world_size), key=lambda r: (load[r], r))[:extra]:
            counts[r] += 1
        at = start
        for r in range(world_size):
            shares[r].extend(range(at, at + counts[r]))
            at += counts[r]
            load[r] += counts[r] * tokens_of_bucket[bucket]
        start = end
    return shares
