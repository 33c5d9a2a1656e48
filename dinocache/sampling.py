"""Batches for training: a bucket-aware, resumable, rank-aware batch sampler (optionally
shard-local, optionally picking a flipped view per sample), and the collate that pads."""

from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list]):
    """Batches of sample indices that all come from one bucket.

    Shuffled by (seed, epoch): the same seed and epoch give the same batches on every restart.
    With `world_size` > 1 every rank gets its slice of the same global batch list and the same
    number of batches, so no rank waits at a collective for one that ran out: the list is padded
    by repeating batches from its start (a few samples are then seen twice in the epoch, as with
    DistributedSampler), or cut with drop_last (strictly disjoint). To resume mid-epoch after a restart,
    `set_epoch(epoch, start_step=steps_done)` skips the batches this rank already trained on.

    `flip=True` (a --flip cache): each sample is read as its plain or its mirrored view, chosen
    per sample by (seed, epoch) -- SVG's augmentation, deterministic and resumable. Batches then
    hold (index, flipped) pairs, which FeatureCache understands.

    `shard_window=K`: locality-aware shuffle for network filesystems and object stores. Shards
    are shuffled, then taken K at a time; batches are drawn only from the samples of the K
    shards in the window (still shuffled within it, one bucket per batch). Each shard is then
    read in one window instead of throughout the epoch. None: a global shuffle.
    """

    def __init__(
        self,
        cache,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = False,
        shard_window: int | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shard_window is not None and shard_window <= 0:
            raise ValueError(f"shard_window must be positive, got {shard_window}")
        if flip and not cache.layout.flip:
            raise ValueError(f"flip=True needs a cache extracted with --flip; {cache.root} has no flipped view")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.flip, self.shard_window = flip, shard_window
        self.epoch = 0
        self.start_step = 0
        self._buckets = np.asarray(cache.bucket_indices())
        shard_col = np.asarray(cache.shard_indices())
        self._shards = shard_col if shard_window else None
        # Each batch is yielded in file order (shard, then row): the reader gathers a shard's rows
        # straight into the batch, and storage sees forward reads. Which samples form a batch is
        # still the shuffle's choice.
        order = np.lexsort((np.asarray(cache.table.columns["row"]), shard_col))
        self._file_rank = np.empty(len(order), dtype=np.int64)
        self._file_rank[order] = np.arange(len(order))
        if drop_last and len(self._buckets) and not self._global_batches():
            # Legal (every rank gets the same 0 batches), but an epoch that trains on nothing is
            # never what was meant: say so, loudly.
            import warnings

            largest = int(np.bincount(self._buckets).max())
            warnings.warn(
                f"drop_last=True leaves no batch: the largest bucket holds {largest} sample(s), fewer than "
                f"batch_size={batch_size}"
                + (f" (or too few batches for {world_size} ranks)" if world_size > 1 else "")
                + "; every epoch is empty. Use a smaller batch_size or drop_last=False",
                stacklevel=2,
            )

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's shuffle; `start_step` skips that many of this rank's batches (resume)."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.set_epoch(state["epoch"], state.get("start_step", 0))

    def _batches_of(self, indices: np.ndarray, rng: random.Random) -> list[list[int]]:
        batches = []
        buckets = self._buckets[indices]
        for bucket in np.unique(buckets):
            members = indices[buckets == bucket].tolist()
            if self.shuffle:
                rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(sorted(batch, key=self._file_rank.__getitem__))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _global_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self._shards is None:
            batches = self._batches_of(np.arange(len(self._buckets)), rng)
        else:
            order = np.argsort(self._shards, kind="stable")
            shard_ids, starts = np.unique(self._shards[order], return_index=True)
            groups = np.split(order, starts[1:])  # sample indices of each shard, in index order
            window_order = list(range(len(groups)))
            if self.shuffle:
                rng.shuffle(window_order)
            batches = []
            for start in range(0, len(window_order), self.shard_window):
                members = np.concatenate([groups[g] for g in window_order[start : start + self.shard_window]])
                batches += self._batches_of(np.sort(members), rng)
        if self.world_size > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            else:
                # cycle, not slice: with more ranks than batches one pass of the list is too short
                extra = math.ceil(len(batches) / self.world_size) * self.world_size - len(batches)
                batches += [batches[i % len(batches)] for i in range(extra)]
        return batches

    def _views(self) -> np.ndarray:
        return (
            np.random.default_rng([self.seed, self.epoch, 0x466C6970]).integers(0, 2, len(self._buckets)).astype(bool)
        )

    def __iter__(self) -> Iterator[list]:
        batches = self._global_batches()[self.rank :: self.world_size][self.start_step :]
        if not self.flip:
            yield from batches
            return
        views = self._views()
        for batch in batches:
            yield [(i, bool(views[i])) for i in batch]

    def __len__(self) -> int:
        return len(self._global_batches()[self.rank :: self.world_size][self.start_step :])


def _shared_batch(items: list[dict]) -> dict | None:
    """The batch tensors `items` are consecutive views of (read by one __getitems__ call)."""
    batch = getattr(items[0], "_batch", None)
    if batch is None:
        return None
    for j, item in enumerate(items):
        if getattr(item, "_batch", None) is not batch or item._slot != j:
            return None
    if any(len(value) != len(items) for value in batch.values()):
        return None
    return batch


def collate_features(items: list[dict]) -> dict:
    """Stack samples: one bucket's samples stack as they are; samples of several buckets are
    padded to the longest patch sequence, with a mask.

    The batch uses the item's names, one value per sample: "cls" [B, D], "patches" [B, L, D]
    (row-major flattened grid), "mask" [B, L] bool (True = a real patch; key_padding_mask =
    ~mask), "grid" [B, 2] (rows, cols), "key" and "bucket" (lists), "flipped" (list, when
    the sampler picked views), and any other tensor of the items ("registers", "layer8_patches",
    "patches_flip", ...) stacked the same way.
    """
    if not items:
        raise ValueError("collate_features got no samples: a batch needs at least one (check the sampler)")
    first = items[0]
    out: dict = {
        "key": [it["key"] for it in items],
        "bucket": [it["bucket"] for it in items],
        "grid": torch.tensor([it["grid"] for it in items], dtype=torch.long),
    }
    if "flipped" in first:
        out["flipped"] = [it["flipped"] for it in items]
    same_grid = all(it["grid"] == first["grid"] for it in items)
    shared = _shared_batch(items) if same_grid else None
    if shared is not None:  # one bucket, read in one call: the batch tensors are the answer
        out.update(shared)
        lengths = torch.full((len(items),), first["grid"][0] * first["grid"][1])
        out["mask"] = torch.ones(len(items), int(lengths[0]), dtype=torch.bool)
        return out
    for name, value in first.items():
        if not isinstance(value, torch.Tensor):
            continue
        values = [it[name] for it in items]
        if name.endswith("patches") or name.endswith("patches_flip"):
            flat = [v.reshape(-1, v.shape[-1]) for v in values]
            if same_grid:
                out[name] = torch.stack(flat)
            else:
                longest = max(p.shape[0] for p in flat)
                padded = flat[0].new_zeros(len(items), longest, flat[0].shape[1])
                for b, p in enumerate(flat):
                    padded[b, : p.shape[0]] = p
                out[name] = padded
        else:
            out[name] = torch.stack(values)
    lengths = torch.tensor([it["grid"][0] * it["grid"][1] for it in items])
    longest = int(lengths.max())
    out["mask"] = torch.arange(longest)[None, :] < lengths[:, None]
    return out
