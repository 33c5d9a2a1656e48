"""Bookkeeping at scale: open time, memory and key lookup of caches with millions of samples.

Builds a synthetic cache (manifest + sample index, no shards) of N samples, then in a fresh
process measures FeatureCache open time, RSS after open, random-key lookup time, and the cost
of one periodic commit (merging 6,000 new samples, about 30 s of a fast GPU run).

    python scripts/bench_index.py 1000000 10000000 [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinocache.index import COLUMNS, SampleTable  # noqa: E402
from dinocache.layout import Layout  # noqa: E402
from dinocache.manifest import FORMAT_NAME, FORMAT_VERSION, write_manifest  # noqa: E402

ROWS_PER_SHARD = 60  # ViT-L/16 at 1024x1024 in a 512 MB shard


def synthetic_cache(root: Path, n: int) -> None:
    """Keys like 'part00042/000123456.jpg' (24 bytes), built with numpy so 10M take seconds."""
    width = 24
    digits = np.array(list(b"0123456789"), dtype=np.uint8)
    ids = np.arange(n, dtype=np.int64)
    keys = np.empty((n, width), dtype=np.uint8)
    keys[:, :4] = np.frombuffer(b"part", dtype=np.uint8)
    part = ids // 10000
    for j in range(5):
        keys[:, 4 + j] = digits[(part // 10 ** (4 - j)) % 10]
    keys[:, 9] = ord("/")
    for j in range(9):
        keys[:, 10 + j] = digits[(ids // 10 ** (8 - j)) % 10]
    keys[:, 19:] = np.frombuffer(b".jpg\x00", dtype=np.uint8)[:5]
    keys = keys[:, :23]  # 'part00042/000123456.jpg'
    offsets = np.arange(n + 1, dtype=np.int64) * keys.shape[1]
    rng = np.random.default_rng(0)
    columns = {
        "shard": (ids // ROWS_PER_SHARD).astype(np.int32),
        "row": (ids % ROWS_PER_SHARD).astype(np.int32),
        "bucket": rng.integers(0, 7, n, dtype=np.int32),
        "source_bytes": rng.integers(10**5, 10**7, n, dtype=np.int64),
        "source_mtime_ns": 1_795_000_000_000_000_000 + ids,
        "source_sha256": np.zeros((n, 32), np.uint8),
        "source_size": np.tile(np.array([[3024, 4032]], np.int32), (n, 1)),
        "box": np.tile(np.array([[0, 0, 3024, 4032]], np.int32), (n, 1)),
        "placement": np.zeros(n, np.uint8),
    }
    assert set(columns) == set(COLUMNS)
    table = SampleTable(keys.reshape(-1), offsets, columns)
    data = table.to_bytes()
    (root / "index").mkdir(parents=True)
    (root / "index" / "samples-synthetic.safetensors").write_bytes(data)
    shards = n // ROWS_PER_SHARD + 1
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {
            "id": "random:vitl16",
            "revision": None,
            "patch_size": 16,
            "hidden_size": 1024,
            "num_registers": 4,
            "compute_dtype": "bfloat16",
            "config": {},
        },
        "preprocessing": {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resize": "stretch"},
        "storage": Layout().record(),
        "buckets": [
            {
                "index": i,
                "name": f"{1024 - 16 * i}x1024",
                "width": 1024 - 16 * i,
                "height": 1024,
                "input_width": 1024 - 16 * i,
                "input_height": 1024,
                "grid": [64, 64 - i],
            }
            for i in range(7)
        ],
        "shards": [
            {
                "file": f"shards/s{i:07d}.safetensors",
                "bucket": 0,
                "rows": ROWS_PER_SHARD,
                "bytes": 512 * 1024**2,
                "sha256": "0" * 64,
            }
            for i in range(shards)
        ],
        "samples": {
            "file": "index/samples-synthetic.safetensors",
            "count": n,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
        "failures": [],
        "runs": [],
    }
    write_manifest(root, manifest)


def measure(root: str) -> dict:
    """Run in a fresh process: open, RSS, lookups, one commit-sized merge."""
    import random
    import resource

    from dinocache import FeatureCache

    def rss_mb() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = rss_mb()
    t0 = time.perf_counter()
    cache = FeatureCache(root)
    open_s = time.perf_counter() - t0
    after_open = rss_mb()
    n = len(cache)
    rng = random.Random(0)
    keys = [cache.table.key(rng.randrange(n)) for _ in range(20000)]
    t0 = time.perf_counter()
    for key in keys:
        i = cache.index_of(key)
        _ = (int(cache._shard_col[i]), int(cache._row_col[i]))  # what a read needs: shard and row
    lookup_us = (time.perf_counter() - t0) / len(keys) * 1e6
    new = [cache.record(rng.randrange(n)) | {"key": f"new/{j:06d}.jpg"} for j in range(6000)]
    t0 = time.perf_counter()
    merged = cache.table.merged(new)
    data = merged.to_bytes()
    commit_s = time.perf_counter() - t0
    return {
        "samples": n,
        "open_s": round(open_s, 4),
        "rss_after_open_mb": round(after_open, 1),
        "rss_growth_mb": round(after_open - base, 1),
        "lookup_us": round(lookup_us, 2),
        "commit_6000_new_s": round(commit_s, 3),
        "index_mb": round(len(data) / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            synthetic_cache(Path(tmp), n)
            build_s = time.perf_counter() - t0
            out = subprocess.run(
                [sys.executable, __file__, "--measure", tmp], capture_output=True, text=True, check=True
            )
            row = json.loads(out.stdout) | {"build_s": round(build_s, 1)}
            rows.append(row)
            print(
                f"{n:>11,} samples: open {row['open_s'] * 1000:8.1f} ms   "
                f"RSS after open {row['rss_after_open_mb']:7.1f} MB "
                f"(+{row['rss_growth_mb']:.1f})   lookup {row['lookup_us']:6.2f} us   "
                f"commit of 6000 new {row['commit_6000_new_s']:6.2f} s   index {row['index_mb']} MB",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
