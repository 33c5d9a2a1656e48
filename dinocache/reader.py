"""Read a cache back in a training loop.

    cache = FeatureCache("dinocache_out")
    sampler = BucketBatchSampler(cache, batch_size=32, seed=0, rank=rank, world_size=world)
    loader = DataLoader(cache, batch_sampler=sampler, collate_fn=collate_features, num_workers=4)

Rows are read lazily through memory-mapped safetensors (never torch.load: no pickle).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import CacheError
from .manifest import DEFAULT_OUT, load_samples, read_manifest, shard_path


class FeatureCache(Dataset):
    """A read-only view of a cache: `cache[key]` or `cache[i]` -> dict with
    "cls" [D], "patches" [rows, cols, D], optionally "registers" [R, D] and, with --layers k,
    "layer{k}_cls" / "layer{k}_patches" (not normed), and "key", "bucket", "grid" (the stored
    grid: halved by --pool 2). float8 caches are dequantized (float32) on read."""

    def __init__(self, root: str | Path = DEFAULT_OUT, dtype: torch.dtype | None = None, max_open_shards: int = 64):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.dtype = dtype
        self.table = load_samples(self.root, self.manifest)  # memory-mapped, sorted by key
        self._shard = self.table.columns["shard"]
        self._row = self.table.columns["row"]
        self._bucket = self.table.columns["bucket"]
        self.buckets = self.manifest["buckets"]
        self.shards = self.manifest["shards"]
        self._open: OrderedDict[int, object] = OrderedDict()
        self._max_open = max_open_shards

    def __len__(self) -> int:
        return len(self.table)

    def keys(self) -> list[str]:
        """All keys, sorted (index i of this list is sample i)."""
        return self.table.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.table.find(key) >= 0

    def bucket_of(self, i: int) -> int:
        return int(self._bucket[i])

    def bucket_indices(self) -> np.ndarray:
        """The bucket of every sample, as an array (for samplers)."""
        return np.asarray(self._bucket)

    def record(self, item: int | str) -> dict:
        """The sample's bookkeeping: source size/mtime/sha256, upright size, crop box, shard, row, bucket."""
        return self.table.record(self.index_of(item) if isinstance(item, str) else int(item))

    def index_of(self, key: str) -> int:
        i = self.table.find(key)
        if i < 0:
            raise KeyError(f"{key!r} is not in the cache at {self.root}")
        return i

    def __getitem__(self, item: int | str) -> dict:
        i = self.index_of(item) if isinstance(item, str) else int(item)
        if not 0 <= i < len(self.table):
            raise IndexError(f"index {i} out of range for a cache of {len(self.table)} samples")
        shard_index, row, bucket_index = int(self._shard[i]), int(self._row[i]), int(self._bucket[i])
        if not 0 <= bucket_index < len(self.buckets):
            raise CacheError(f"{self.root}: sample {i} names bucket {bucket_index}, which does not exist",
                             "run `dinocache verify` for details")
        bucket = self.buckets[bucket_index]
        rows, cols = bucket.get("stored_grid", bucket["grid"])  # --pool stores a smaller grid
        handle = self._handle(shard_index)
        if not 0 <= row < self.shards[shard_index]["rows"]:
            raise CacheError(f"{self.root}: sample {i} points past the end of its shard", "run `dinocache verify`")
        out = {"key": self.table.key(i), "bucket": bucket["name"], "bucket_index": bucket_index, "grid": (rows, cols)}
        try:
            for name in handle.keys():
                if name.endswith("_scale"):
                    continue
                value = handle.get_slice(name)[row]
                if name + "_scale" in handle.keys():  # float8 storage: one scale per row
                    value = value.float() * handle.get_slice(name + "_scale")[row : row + 1]
                if name.endswith("patches"):
                    value = value.reshape(rows, cols, -1)
                out[name] = value
        except Exception as exc:  # a shard that does not match its manifest entry
            raise CacheError(f"cannot read row {row} of {self.shards[shard_index]['file']} as a {rows}x{cols} grid: "
                             f"{str(exc).splitlines()[0]}", "run `dinocache verify` for details") from None
        if self.dtype is not None:
            for name, value in out.items():
                if isinstance(value, torch.Tensor):
                    out[name] = value.to(self.dtype)
        return out

    def _handle(self, shard_index: int):
        from safetensors import safe_open

        handle = self._open.get(shard_index)
        if handle is None:
            if not 0 <= shard_index < len(self.shards):
                raise CacheError(f"{self.root}: a sample points at shard #{shard_index}, which does not exist",
                                 "run `dinocache verify` for details")
            path = shard_path(self.root, self.shards[shard_index]["file"])
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise CacheError(f"cannot open shard {self.shards[shard_index]['file']}: {exc}",
                                 "run `dinocache verify`, then rerun extract to rebuild missing shards") from None
            self._open[shard_index] = handle
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard_index)
        return handle

    def __getstate__(self):  # DataLoader workers reopen their own memory maps
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        for name in ("table", "_shard", "_row", "_bucket"):
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.table = load_samples(self.root, self.manifest)
        self._shard, self._row, self._bucket = (self.table.columns[n] for n in ("shard", "row", "bucket"))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of sample indices that all come from one bucket.

    Shuffled by (seed, epoch): the same seed and epoch give the same batches on every restart.
    With `world_size` > 1 every rank gets a disjoint slice of the same global batch list and the
    same number of batches (the list is padded by repeating its start, or cut with drop_last), so
    no rank waits at a collective for one that ran out. To resume mid-epoch after a restart,
    `set_epoch(epoch, start_step=steps_done)` skips the batches this rank already trained on.
    """

    def __init__(self, cache: FeatureCache, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        self.start_step = 0
        buckets = cache.bucket_indices()
        self._by_bucket = {int(b): np.flatnonzero(buckets == b).tolist() for b in np.unique(buckets)}

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

    def _global_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = []
        for bucket in sorted(self._by_bucket):
            indices = list(self._by_bucket[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            else:
                total = math.ceil(len(batches) / self.world_size) * self.world_size
                batches += batches[: total - len(batches)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._global_batches()[self.rank::self.world_size][self.start_step:]

    def __len__(self) -> int:
        return len(self._global_batches()[self.rank::self.world_size][self.start_step:])


def collate_features(items: list[dict]) -> dict:
    """Stack samples of any buckets: patches padded to the longest sequence, with a mask.

    Returns "cls" [B, D], "patches" [B, L, D] (row-major flattened grid, zero-padded),
    "mask" [B, L] bool (True = real patch, the `context_mask` convention of the DiT block),
    "grid" [B, 2] (rows, cols), "keys" and "buckets".
    """
    flat = [it["patches"].reshape(-1, it["patches"].shape[-1]) for it in items]
    longest = max(p.shape[0] for p in flat)
    dim = flat[0].shape[1]
    patches = flat[0].new_zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for b, p in enumerate(flat):
        patches[b, : p.shape[0]] = p
        mask[b, : p.shape[0]] = True
    out = {
        "cls": torch.stack([it["cls"] for it in items]),
        "patches": patches,
        "mask": mask,
        "grid": torch.tensor([it["grid"] for it in items], dtype=torch.long),
        "keys": [it["key"] for it in items],
        "buckets": [it["bucket"] for it in items],
    }
    if all("registers" in it for it in items):
        out["registers"] = torch.stack([it["registers"] for it in items])
    return out
