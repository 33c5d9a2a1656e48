"""Web-scale sources and object storage, each against its baseline in one run:

tars     extract from N tars of M small images vs the same images as a folder (img/s ratio)
s3       read a cache through an S3 API server on 127.0.0.1 (moto) with a cold shard cache,
         then a warm one, vs a raw read of the same shard files on local disk (GB/s)
plan     plan from a list file with width/height columns vs a header scan of the same files

  python scripts/bench_sources.py --tars 100 --per-tar 200 --list 100000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from moto_server import moto_server  # noqa: E402


def small_jpeg(seed: int, size=(96, 72)) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_sources(work: Path, tars: int, per_tar: int) -> tuple[Path, str]:
    folder, tar_dir = work / "folder", work / "tars"
    if not (tar_dir / f"{tars - 1:05d}.tar").exists():
        folder.mkdir(parents=True, exist_ok=True)
        tar_dir.mkdir(parents=True, exist_ok=True)
        for t in range(tars):
            with tarfile.open(tar_dir / f"{t:05d}.tar", "w") as tar:
                for i in range(per_tar):
                    data = small_jpeg(t * per_tar + i)
                    (folder / f"{t:05d}").mkdir(exist_ok=True)
                    (folder / f"{t:05d}" / f"{i:06d}.jpg").write_bytes(data)
                    info = tarfile.TarInfo(f"{i:06d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder, str(tar_dir / f"{{00000..{tars - 1:05d}}}.tar")


def timed_extract(source: str, out: Path, model: str) -> float:
    from dinocache.config import ExtractOptions, parse_bucket_config
    from dinocache.extract import extract

    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config({"buckets": [[64, 64], [96, 64]]}),
        model=model,
        progress=False,
        overwrite=True,
    )
    return extract(source, options).images_per_second


def bench_tars(work: Path, tars: int, per_tar: int, model: str) -> dict:
    folder, pattern = make_sources(work, tars, per_tar)
    timed_extract(str(folder), work / "warm", model)  # page cache and imports warm for both
    folder_rate = timed_extract(str(folder), work / "out-folder", model)
    tar_rate = timed_extract(pattern, work / "out-tars", model)
    return {
        "images": tars * per_tar,
        "folder_img_s": folder_rate,
        "tars_img_s": tar_rate,
        "tars_vs_folder": tar_rate / folder_rate,
    }


def bench_s3(work: Path, cache: Path) -> dict:
    import s3fs

    with moto_server() as endpoint:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="x",
            AWS_SECRET_ACCESS_KEY="x",
            AWS_DEFAULT_REGION="us-east-1",
            DINOCACHE_REMOTE_CACHE=str(work / "mirror"),
        )
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(cache), "bench/cache", recursive=True)
        from dinocache import FeatureCache

        total = sum(p.stat().st_size for p in (cache / "shards").iterdir())

        def read_all(root) -> float:
            fc = FeatureCache(root)
            began = time.perf_counter()
            for start in range(0, len(fc), 64):
                fc.__getitems__(list(range(start, min(len(fc), start + 64))))
            return time.perf_counter() - began

        raw_began = time.perf_counter()
        for p in (cache / "shards").iterdir():
            p.read_bytes()
        raw = total / (time.perf_counter() - raw_began) / 1e9
        cold = total / read_all("s3://bench/cache") / 1e9
        warm = total / read_all("s3://bench/cache") / 1e9
        return {"shard_bytes": total, "raw_local_gbps": raw, "s3_cold_gbps": cold, "s3_warm_gbps": warm}


def bench_plan(work: Path, entries: int) -> dict:
    from dinocache.config import parse_bucket_config
    from dinocache.plan import plan_extraction

    folder = work / "plan-files"
    if not (folder / f"{entries - 1:07d}.jpg").exists():
        folder.mkdir(parents=True, exist_ok=True)
        data = small_jpeg(0)
        for i in range(entries):
            (folder / f"{i:07d}.jpg").write_bytes(data)
    rows = [
        json.dumps(
            {
                "key": f"{i:07d}.jpg",
                "path": str(folder / f"{i:07d}.jpg"),
                "width": 96,
                "height": 72,
                "size": 1,
                "mtime_ns": 1,
            }
        )
        for i in range(entries)
    ]
    listing = work / "plan.jsonl"
    listing.write_text("\n".join(rows) + "\n")
    config = parse_bucket_config({"buckets": [[64, 64], [96, 64]]})
    began = time.perf_counter()
    scan = plan_extraction(folder, config, "random:vits16")
    scan_s = time.perf_counter() - began
    began = time.perf_counter()
    listed = plan_extraction(listing, config, "random:vits16")
    list_s = time.perf_counter() - began
    assert scan.images == listed.images == entries
    return {"entries": entries, "header_scan_s": scan_s, "list_s": list_s, "speedup": scan_s / list_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dinocache-bench-sources")
    parser.add_argument("--tars", type=int, default=100)
    parser.add_argument("--per-tar", type=int, default=200)
    parser.add_argument("--list", type=int, default=100_000)
    parser.add_argument("--model", default="random:vits16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(f"CPU: {cpu}, {os.cpu_count()} cores")
    tars = bench_tars(args.work, args.tars, args.per_tar, args.model)
    print(
        f"tars: {tars['images']} images: folder {tars['folder_img_s']:.0f} img/s, {args.tars} tars "
        f"{tars['tars_img_s']:.0f} img/s ({tars['tars_vs_folder']:.2f}x)",
        flush=True,
    )
    s3 = bench_s3(args.work, args.work / "out-folder")
    print(
        f"s3: {s3['shard_bytes'] / 1e9:.2f} GB of shards: raw local read {s3['raw_local_gbps']:.2f} GB/s, through "
        f"S3 cold {s3['s3_cold_gbps']:.2f} GB/s, warm shard cache {s3['s3_warm_gbps']:.2f} GB/s",
        flush=True,
    )
    plan = bench_plan(args.work, args.list)
    print(
        f"plan: {plan['entries']} entries: header scan {plan['header_scan_s']:.1f} s, list with sizes "
        f"{plan['list_s']:.1f} s ({plan['speedup']:.1f}x faster)"
    )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "tars": tars, "s3": s3, "plan": plan}, indent=2))


if __name__ == "__main__":
    main()
