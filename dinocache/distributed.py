"""Several processes, one cache: rank discovery (torchrun or explicit flags), deterministic work
split balanced by compute, and the few collectives extract needs.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) a process group is formed
(NCCL on GPUs, gloo on CPUs) and rank 0 merges the manifest once every rank has finished. With
explicit `--rank/--world-size` (e.g. SLURM array tasks, no process group) every rank works
alone and `dinocache merge OUT` writes the manifest afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass
class RankContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # a torch.distributed process group is up

    @property
    def multi(self) -> bool:
        return self.world_size > 1

    @classmethod
    def create(cls, rank: int | None, world_size: int | None, device: str) -> "RankContext":
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if rank is not None or world_size is not None:  # explicit: no process group
            if rank is None or world_size is None or not 0 <= rank < world_size:
                raise ConfigError(f"--rank {rank} --world-size {world_size} is not a valid pair",
                                  "pass both, with 0 <= rank < world size")
            return cls(rank, world_size, 0, False)
        if env_world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank, env_world, local_rank, True)

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
