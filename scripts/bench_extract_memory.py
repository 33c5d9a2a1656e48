"""Peak memory of `dinocache extract` as the dataset grows: it should stay flat.

Writes N small pictures, runs a real `dinocache extract` (random ViT-S/16, one 64x64 bucket,
CPU) in a fresh process per size, and reports the peak RSS of the main process and of its decode
workers, and the throughput. Shards are capped at 16 MB so that both sizes write several (the
buffer of one shard is the only thing that grows with the data, up to the shard size).

    python scripts/bench_extract_memory.py 1000 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARD_MB = 16  # memory is bounded by the shard size (a shard is buffered, then written), not the dataset

CHILD = r"""
import resource, sys
from dinocache.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"PEAK_RSS_MB {me:.1f} {kids:.1f}", file=sys.stderr)
"""


def write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def run(n: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", n)
        (tmp / "buckets.yaml").write_text("buckets: [[64, 64]]\nbatch_size: 64\n")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                "extract",
                str(tmp / "images"),
                "--buckets",
                str(tmp / "buckets.yaml"),
                "--out",
                str(tmp / "out"),
                "--model",
                "random:vits16",
                "--workers",
                str(workers),
                "--shard-size-mb",
                str(SHARD_MB),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        main_mb, workers_mb = (float(v) for v in proc.stderr.split("PEAK_RSS_MB")[1].split()[:2])
        return {
            "images": n,
            "peak_rss_main_mb": main_mb,
            "peak_rss_worker_mb": workers_mb,
            "seconds": round(seconds, 1),
            "images_per_s": round(n / seconds, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        row = run(n, args.workers)
        rows.append(row)
        print(
            f"{n:>7} images: peak RSS main {row['peak_rss_main_mb']:.0f} MB, "
            f"worker {row['peak_rss_worker_mb']:.0f} MB, "
            f"{row['seconds']} s incl. start-up ({row['images_per_s']} img/s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
