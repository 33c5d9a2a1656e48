"""The reader side by side with a raw read of the same files, in one run.

For each sample size (a cache of random bf16 features in the real format, written by
dinocache's own ShardWriter; no model run: this measures reading only), on a warm page cache:

  raw          read every shard file sequentially into one reused 16 MB buffer (it stays in
               the CPU cache: a memcpy ceiling no loader can reach, since each batch is new memory)
  raw/batches  read the files sequentially into batch-sized buffers, recycled like the loader's:
               the ceiling for producing batches
  item         FeatureCache[i] one sample at a time, shuffled order
  loader       the README's loader: DataLoader(cache, batch_sampler=BucketBatchSampler(...),
               collate_fn=collate_features), in this process (num_workers=0), then with workers

GB/s counts the feature bytes a batch holds. Then, for network storage, bytes fetched per epoch
by a simulated object-store reader that caches 4 whole shards locally (LRU), for a global
shuffle vs BucketBatchSampler(shard_window=4).

    python scripts/bench_reader.py                 # 1.5 MB and 0.4 MB samples
    python scripts/bench_reader.py --cases 1.5MB --samples 600 --flavour ln_noaffine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (arch, side, samples, hidden): ViT-B/16 at 512 = 1024 patches x 768 x 2 B = 1.5 MB; at 256: 0.4 MB
CASES = {"1.5MB": ("vitb16", 512, 2000, 768), "0.4MB": ("vitb16", 256, 8000, 768)}


def build_cache(root: Path, arch: str, side: int, samples: int, shard_mb: float = 64) -> None:
    import torch

    from dinocache.buckets import make_buckets
    from dinocache.extract import cache_settings
    from dinocache.imaging import Preprocessing
    from dinocache.layout import Layout
    from dinocache.model import resolve_model
    from dinocache.state import CacheState
    from dinocache.writer import ShardWriter

    mspec = resolve_model(f"random:{arch}", device="cpu", dtype="bfloat16")
    buckets = make_buckets([(side, side), (side, side * 3 // 4)], 16)
    layout = Layout()
    settings = cache_settings(mspec, Preprocessing(), layout, buckets)
    state = CacheState.open(root, settings, overwrite=True, extras={"final_norm.safetensors": mspec.norm_file()})
    hidden = mspec.hidden_size
    writer = ShardWriter(root, layout, settings, hidden, 4, int(shard_mb * 1024**2))
    for bucket in buckets:
        tokens = bucket.grid[0] * bucket.grid[1]
        count = samples * 3 // 4 if bucket.index == 0 else samples // 4
        for start in range(0, count, 64):
            n = min(64, count - start)
            tensors = {
                "cls": torch.randn(n, hidden),
                "patches": torch.randn(n, tokens, hidden),
                "cls_lnstats": torch.rand(n, 2),
                "patches_lnstats": torch.rand(n, tokens, 2),
            }
            records = [
                {
                    "key": f"b{bucket.index}/{start + i:07d}.jpg",
                    "bucket": bucket.index,
                    "source_bytes": 1,
                    "source_mtime_ns": 1,
                    "source_sha256": "0" * 64,
                    "source_size": [side, side],
                    "box": [0, 0, side, side],
                    "placement": 0,
                }
                for i in range(n)
            ]
            writer.add(bucket, tensors, records)
            for record, recs in writer.completed():
                state.add_shard(record, recs)
        writer.flush(bucket.index)
    for record, recs in writer.close():
        state.add_shard(record, recs)
    state.commit()


def sample_bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for k, v in batch.items() if k in ("cls", "patches"))


def raw_read(root: Path) -> tuple[float, int]:
    buffer = bytearray(16 * 1024 * 1024)
    total = 0
    began = time.perf_counter()
    for path in sorted((root / "shards").iterdir()):
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buffer):
                total += n
    return time.perf_counter() - began, total


def raw_read_batches(root: Path, batch_bytes: int, buffers: int = 4) -> tuple[float, int]:
    pool = [bytearray(batch_bytes) for _ in range(buffers)]
    for buf in pool:  # fault them in once, as a recycled pool is
        memoryview(buf)[::4096] = b"\0" * len(range(0, batch_bytes, 4096))
    total, k = 0, 0
    began = time.perf_counter()
    for path in sorted((root / "shards").iterdir()):
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(pool[k % buffers]):
                total += n
                k += 1
    return time.perf_counter() - began, total


def per_item(root: Path, limit: int, flavour: str = "normed") -> tuple[float, int, int]:
    import random

    from dinocache import FeatureCache

    cache = FeatureCache(root, flavour=flavour)
    order = list(range(len(cache)))
    random.Random(0).shuffle(order)
    order = order[:limit]
    total = 0
    began = time.perf_counter()
    for i in order:
        item = cache[i]
        total += sample_bytes(item)
    return time.perf_counter() - began, total, len(order)


def loader(root: Path, workers: int, batch_size: int, limit: int, flavour: str = "normed") -> tuple[float, int, int]:
    from torch.utils.data import DataLoader

    from dinocache import BucketBatchSampler, FeatureCache, collate_features

    cache = FeatureCache(root, flavour=flavour)
    sampler = BucketBatchSampler(cache, batch_size=batch_size, seed=0)
    dl = DataLoader(
        cache,
        batch_sampler=sampler,
        collate_fn=collate_features,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    total = samples = 0
    began = None
    for batch in dl:
        if began is None:  # worker start-up is not what we measure
            began = time.perf_counter()
            continue
        total += sample_bytes(batch)
        samples += len(batch["key"])
        if samples >= limit:
            break
    return time.perf_counter() - began, total, samples


def remote_bytes(root: Path, shard_window: int | None, local_shards: int = 4) -> int:
    """Bytes fetched from an object store in one epoch by a reader that keeps whole shards in a
    local cache of `local_shards` shards, evicting the least recently used (mosaicml/streaming's
    design, and issue 16's): every miss downloads a whole shard."""
    import numpy as np

    from dinocache import BucketBatchSampler, FeatureCache

    cache = FeatureCache(root)
    sampler = BucketBatchSampler(cache, batch_size=32, seed=0, shard_window=shard_window)
    sizes = [s["bytes"] for s in cache.shards]
    shard_col = np.asarray(cache.shard_indices())
    lru: OrderedDict = OrderedDict()
    fetched = 0
    for batch in sampler:
        for i in batch:
            s = int(shard_col[i])
            if s in lru:
                lru.move_to_end(s)
                continue
            lru[s] = True
            fetched += sizes[s]
            while len(lru) > local_shards:
                lru.popitem(last=False)
    return fetched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dinocache-bench-reader")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=None, help="samples per case (default: the case's)")
    parser.add_argument("--flavour", default="normed", help="what the item and loader rows read")
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(
        f"CPU: {cpu}, {os.cpu_count()} cores; batch {args.batch_size}; warm page cache; best of {args.repeats}; "
        f"flavour {args.flavour}"
    )
    rows = []
    for name in args.cases:
        arch, side, samples, _ = CASES[name]
        samples = args.samples or samples
        root = args.work / f"cache-{name}-{samples}"
        if not (root / "manifest.json").exists():
            print(f"building {root} ...", flush=True)
            build_cache(root, arch, side, samples)
        raw_read(root)  # warm the page cache
        row = {"case": name, "raw_gbps": 0.0, "raw_batches_gbps": 0.0, "item_gbps": 0.0, "item_samples_s": 0.0}
        batch_bytes = args.batch_size * CASES[name][3] * 2 * (side // 16) ** 2
        for workers in (0, 1, 2):
            row[f"loader{workers}_gbps"] = row[f"loader{workers}_samples_s"] = 0.0
        # Interleaved repeats, best of each: this kind of machine's memory bandwidth is noisy.
        for _ in range(args.repeats):
            seconds, total = raw_read(root)
            row["raw_gbps"] = max(row["raw_gbps"], total / seconds / 1e9)
            seconds, total = raw_read_batches(root, batch_bytes)
            row["raw_batches_gbps"] = max(row["raw_batches_gbps"], total / seconds / 1e9)
            seconds, total, n = per_item(root, 2000, args.flavour)
            row["item_gbps"] = max(row["item_gbps"], total / seconds / 1e9)
            row["item_samples_s"] = max(row["item_samples_s"], n / seconds)
            for workers in (0, 1, 2):
                seconds, total, n = loader(root, workers, args.batch_size, samples, args.flavour)
                row[f"loader{workers}_gbps"] = max(row[f"loader{workers}_gbps"], total / seconds / 1e9)
                row[f"loader{workers}_samples_s"] = max(row[f"loader{workers}_samples_s"], n / seconds)
        row["loader0_vs_raw"] = row["loader0_gbps"] / row["raw_gbps"]
        row["loader0_vs_raw_batches"] = row["loader0_gbps"] / row["raw_batches_gbps"]
        row["remote_bytes_global"] = remote_bytes(root, None)
        row["remote_bytes_window4"] = remote_bytes(root, 4)
        shard_bytes = sum(p.stat().st_size for p in (root / "shards").iterdir())
        row["shard_bytes"] = shard_bytes
        rows.append(row)
        print(f"\n{name} samples ({samples}, {arch} at {side}):")
        print(f"  raw read            {row['raw_gbps']:6.2f} GB/s  (16 MB buffer, cache-resident)")
        print(f"  raw read, batches   {row['raw_batches_gbps']:6.2f} GB/s  (into recycled batch-sized buffers)")
        print(f"  FeatureCache[i]     {row['item_gbps']:6.2f} GB/s  {row['item_samples_s']:8.0f} samples/s (shuffled)")
        for workers in (0, 1, 2):
            print(
                f"  loader, {workers} worker(s) {row[f'loader{workers}_gbps']:6.2f} GB/s  "
                f"{row[f'loader{workers}_samples_s']:8.0f} samples/s"
            )
        print(
            f"  loader in-process / raw: {row['loader0_vs_raw']:.2f}x, / raw into batches: "
            f"{row['loader0_vs_raw_batches']:.2f}x"
        )
        shards = len(list((root / "shards").iterdir()))
        print(
            f"  object store, 4 shards cached locally: an epoch fetches {row['remote_bytes_global'] / 1e9:.1f} GB "
            f"with a global shuffle, {row['remote_bytes_window4'] / 1e9:.1f} GB with shard_window=4 "
            f"({shards} shards, {shard_bytes / 1e9:.2f} GB)"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
