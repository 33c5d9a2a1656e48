"""The Ray engine against a plain `extract` of the same images, in one run (docs/SCALING.md):

plain     one process, `extract` as usual
ray       --engine ray: one actor vs two, and unit sizes (one actor): Ray's fixed cost (start,
          actor, model load) and its cost per unit, fitted from the unit-size sweep. Each figure
          is the best of --repeats runs; the plain run uses one torch thread, as an actor does
commits   the driver's commits (folds of reports into the manifest): seconds each
s3        the same job to an S3 API server on 127.0.0.1 (moto): the driver's object-store
          requests by kind (the actors' are counted per unit in docs/SCALING.md, from the code)

  python scripts/bench_ray.py --images 96 --model random:vits16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from make_sample_images import scene  # noqa: E402
from moto_server import moto_server  # noqa: E402

BUCKETS = {"buckets": [[128, 128], [160, 96]]}


def make_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene(128 if i % 2 else 160, 128 if i % 2 else 96, i).save(folder / f"img{i:05d}.png")
    return folder


def options(out, model: str, engine=None):
    from dinocache.config import ExtractOptions, parse_bucket_config

    return ExtractOptions(
        out=out,
        buckets=parse_bucket_config(BUCKETS),
        model=model,
        workers=0,
        progress=False,
        dtype="float32",
        storage_dtype="bfloat16",
        batch_size=8,
        commit_every_s=0,  # the driver commits after every unit: the commit cost is measured per fold
        engine=engine,
    )


def timed_extract(images: Path, opts) -> tuple[float, object]:
    from dinocache.extract import extract

    began = time.perf_counter()
    result = extract(images, opts)
    return time.perf_counter() - began, result


def count_requests(counter: Counter):
    """Every object-store call this process makes, by kind (s3fs's coroutines; a multipart upload
    of a big file counts as one PUT)."""
    import s3fs

    for name, kind in (
        ("_cat_file", "GET"),
        ("_info", "HEAD"),
        ("_ls", "LIST"),
        ("_put_file", "PUT"),
        ("_pipe_file", "PUT"),
        ("_rm_file", "DELETE"),
    ):
        original = getattr(s3fs.S3FileSystem, name)

        async def wrapped(self, *args, _original=original, _kind=kind, **kwargs):
            counter[_kind] += 1
            return await _original(self, *args, **kwargs)

        setattr(s3fs.S3FileSystem, name, wrapped)


def best_of(repeats: int, run) -> tuple[float, object]:
    """The fastest of `repeats` runs (the machine is shared: the minimum is the least disturbed)."""
    return min((run(i) for i in range(repeats)), key=lambda pair: pair[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--model", default="random:vits16")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="each configuration's best of this many runs")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    import ray

    from dinocache import ray_engine
    from dinocache.ray_engine import RayOptions

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    images = make_images(work / "images", args.images)
    n = args.images
    figures: dict = {"images": n, "model": args.model, "cpu": cpu_model(), "cores": os.cpu_count()}
    import torch

    torch.set_num_threads(1)  # what one Ray actor with one CPU gets (Ray sets OMP_NUM_THREADS=1)
    timed_extract(images, options(work / "warm-up", args.model))  # imports and first-call costs, not timed
    seconds, result = best_of(args.repeats, lambda i: timed_extract(images, options(work / f"plain{i}", args.model)))
    figures["plain"] = {"seconds": round(seconds, 2), "processed": result.processed, "torch_threads": 1}
    print(f"plain extract: {seconds:.2f} s for {result.processed} images")

    began = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    figures["ray_init_seconds"] = round(time.perf_counter() - began, 2)
    folds: list[float] = []
    fold = ray_engine._fold

    def timed_fold(*a, **k):
        began = time.perf_counter()
        fold(*a, **k)
        folds.append(time.perf_counter() - began)

    ray_engine._fold = timed_fold
    runs = {}
    sweep = (("1 actor, 1 unit", 1, n), ("1 actor, 8 units", 1, n // 8), ("1 actor, 48 units", 1, max(1, n // 48)))
    for label, workers, unit in (("2 actors, 8 units", 2, n // 8),) + sweep:

        def run(i, workers=workers, unit=unit):
            folds.clear()
            out = work / f"ray-{workers}-{unit}-{i}"
            return timed_extract(images, options(out, args.model, RayOptions(workers_max=workers, unit_size=unit)))

        seconds, result = best_of(args.repeats, run)
        runs[label] = {
            "seconds": round(seconds, 2),
            "vs_plain": round(seconds / figures["plain"]["seconds"], 2),
            "units": -(-n // unit),
            "processed": result.processed,
            "commits": len(folds),
            "commit_seconds_mean": round(sum(folds) / len(folds), 4) if folds else 0.0,
        }
        print(
            f"{label}: {seconds:.2f} s, {runs[label]['vs_plain']}x plain, "
            f"commits {runs[label]['commit_seconds_mean']} s each"
        )
    figures["ray"] = runs
    one, many = runs["1 actor, 1 unit"], runs["1 actor, 48 units"]
    figures["per_unit_seconds"] = round((many["seconds"] - one["seconds"]) / (many["units"] - one["units"]), 3)
    figures["fixed_seconds"] = round(one["seconds"] - figures["plain"]["seconds"], 2)
    print(
        f"Ray's cost per unit: {figures['per_unit_seconds']} s; "
        f"fixed (actor start, model load): {figures['fixed_seconds']} s"
    )

    with moto_server() as endpoint:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1",
            DINOCACHE_REMOTE_CACHE=str(work / "mirror"),
        )
        import s3fs

        requests: Counter = Counter()
        count_requests(requests)  # before any instance exists: s3fs binds its methods per instance
        s3fs.S3FileSystem().mkdir("bench")
        requests.clear()
        folds.clear()
        seconds, result = timed_extract(
            images, options("s3://bench/cache", args.model, RayOptions(workers_max=1, unit_size=n // 8))
        )
        figures["s3"] = {
            "seconds": round(seconds, 2),
            "units": 8,
            "commits": len(folds),
            "commit_seconds_mean": round(sum(folds) / len(folds), 4),
            "driver_requests": dict(requests),
        }
        print(f"to S3 (moto): {seconds:.2f} s; driver requests {dict(requests)}")
    ray.shutdown()
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
