"""verify's throughput against a raw read of the same files, side by side in one run.

Builds a cache of synthetic shards (bf16, real layout and metadata, written by dinocache's own
ShardWriter), then times, on a warm page cache and again after dropping it where possible:

  raw       read every shard file sequentially in 16 MB chunks, nothing else
  verify    `verify_cache` with value checks (sha256 + finite scan, one pass)
  skip      `verify_cache(check_values=False)` (sha256 only)

and prints GB/s and the ratios verify/raw. Peak RSS is reported to show memory stays bounded
(one chunk per shard, whatever the shard size).

    python scripts/bench_verify.py --gb 2 --shard-mb 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_cache(root: Path, gb: float, shard_mb: float, hidden: int = 1024, side: int = 512) -> None:
    """A cache of `gb` GB of random bf16 features in the real format (no model run: speed only)."""
    import torch

    from dinocache.buckets import make_buckets
    from dinocache.imaging import Preprocessing
    from dinocache.layout import Layout
    from dinocache.model import resolve_model
    from dinocache.state import CacheState
    from dinocache.writer import ShardWriter

    mspec = resolve_model("random:vitl16", device="cpu", dtype="bfloat16")
    buckets = make_buckets([(side, side)], 16)
    layout = Layout()
    from dinocache.extract import cache_settings

    settings = cache_settings(mspec, Preprocessing(), layout, buckets)
    state = CacheState.open(root, settings, overwrite=True, extras={"final_norm.safetensors": mspec.norm_file()})
    writer = ShardWriter(root, layout, settings, hidden, 4, int(shard_mb * 1024**2))
    bucket = buckets[0]
    row_bytes = layout.row_bytes(hidden, 4, bucket.grid)
    rows = int(gb * 1e9 // row_bytes)
    batch = 64
    tokens = bucket.grid[0] * bucket.grid[1]
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        tensors = {
            "cls": torch.randn(n, hidden),
            "patches": torch.randn(n, tokens, hidden),
            "cls_lnstats": torch.rand(n, 2),
            "patches_lnstats": torch.rand(n, tokens, 2),
        }
        samples = [
            {
                "key": f"img/{start + i:08d}.jpg",
                "bucket": 0,
                "source_bytes": 1000,
                "source_mtime_ns": 1,
                "source_sha256": "0" * 64,
                "source_size": [side, side],
                "box": [0, 0, side, side],
                "placement": 0,
            }
            for i in range(n)
        ]
        writer.add(bucket, tensors, samples)
        for record, recs in writer.completed():
            state.add_shard(record, recs)
    for record, recs in writer.close():
        state.add_shard(record, recs)
    state.commit()


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_read(root: Path) -> tuple[float, int]:
    buffer = bytearray(16 * 1024 * 1024)
    total = 0
    began = time.perf_counter()
    for path in sorted((root / "shards").iterdir()):
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buffer):
                total += n
    return time.perf_counter() - began, total


def timed_verify(root: Path, check_values: bool) -> tuple[float, int, bool]:
    from dinocache.verify import verify_cache

    began = time.perf_counter()
    report = verify_cache(root, check_values=check_values)
    return time.perf_counter() - began, report.bytes_read, report.ok


def measure(root: Path, repeats: int) -> dict:
    """Warm and cold rows, each figure the best of `repeats` (the page cache primed for warm,
    dropped before every read for cold). Runs in a fresh process so its peak RSS is verify's."""
    rows = []
    for cache_state in ("warm", "cold"):
        if cache_state == "cold" and not drop_caches():
            print("cold: cannot drop the page cache here (needs root); skipped")
            continue
        if cache_state == "warm":
            raw_read(root)  # prime
        best = {"raw": 0.0, "verify": 0.0, "skip": 0.0}
        total = 0
        for _ in range(repeats):
            for name in best:
                if cache_state == "cold":
                    drop_caches()
                if name == "raw":
                    seconds, total = raw_read(root)
                else:
                    seconds, total, ok = timed_verify(root, name == "verify")
                    assert ok
                best[name] = max(best[name], total / seconds / 1e9)
        row = {
            "page_cache": cache_state,
            "bytes": total,
            "raw_gbps": best["raw"],
            "verify_gbps": best["verify"],
            "skip_values_gbps": best["skip"],
            "verify_vs_raw": best["verify"] / best["raw"],
            "skip_values_vs_raw": best["skip"] / best["raw"],
        }
        rows.append(row)
    return {"rows": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--shard-mb", type=float, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dinocache-bench-verify")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats)))
        return
    root = args.work / f"cache-{args.gb}gb-{args.shard_mb}mb"
    if not (root / "manifest.json").exists():
        print(f"building a {args.gb} GB cache in {root} ...", flush=True)
        build_cache(root, args.gb, args.shard_mb)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.gb} GB in shards of {args.shard_mb} MB; best of {args.repeats}")
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", str(root), "--repeats", str(args.repeats)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in result["rows"]:
        print(
            f"{row['page_cache']:>5}: raw {row['raw_gbps']:.2f} GB/s | verify {row['verify_gbps']:.2f} GB/s "
            f"({row['verify_vs_raw']:.2f}x) | --skip-values {row['skip_values_gbps']:.2f} GB/s "
            f"({row['skip_values_vs_raw']:.2f}x)"
        )
    print(f"verify's process: peak RSS {result['peak_rss_mb']:.0f} MB (torch and numpy included)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "gb": args.gb, "shard_mb": args.shard_mb, **result}, indent=2))


if __name__ == "__main__":
    main()
