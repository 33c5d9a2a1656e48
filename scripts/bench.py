"""End-to-end benchmark: the guide's recipe vs the HF batched forward vs `dinocache extract`.

Builds a synthetic JPEG dataset, saves a random-weight DINOv3 with `save_pretrained` (so every
contender loads the same checkpoint through plain transformers), then times, each in a fresh
process and side by side in one run:

  (a) recipe   the integration guide's recipe: HF image processor + fp32 model, one image at a time
  (b) forward  the HF model alone, bf16 (GPU) / auto dtype (CPU), batched, on pre-decoded pixels
  (c) extract  `dinocache extract` end to end: read JPEGs, decode, resize, forward, split, copy
               to host, write bf16 shards and the manifest

and prints img/s, ratios, MFU (GPU), peak GPU memory, peak host RSS and extract's per-stage
breakdown, plus a JSON file.

    python scripts/bench.py --preset smoke   # seconds; CI runs it
    python scripts/bench.py --preset cpu     # issue 4's CPU target: 48 JPEGs, 448x448, ViT-S/16
    python scripts/bench.py --preset gpu     # the GPU table (fits in 8 minutes on one H100/H200)
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity

# case: (arch, bucket side, source size, images for recipe, forward, extract, extract options)
PRESETS = {
    "smoke": [("vits16", 224, (640, 480), 4, 8, 8, [])],
    "cpu": [("vits16", 448, (2048, 1536), 48, 48, 48, []), ("vits16", 448, (2048, 1536), 0, 0, 48, ["--jpeg-draft"])],
    "gpu": [
        ("vitl16", 1024, (2048, 1536), 24, 512, 1536, ["--compile", "--sdpa-backend", "cudnn"]),
        ("vitl16", 512, (2048, 1536), 0, 1024, 3072, ["--compile", "--sdpa-backend", "cudnn", "--jpeg-draft"]),
        ("vitl16", 224, (2048, 1536), 0, 2048, 4096, ["--compile", "--jpeg-draft"]),
        ("vitb16", 512, (2048, 1536), 0, 1024, 3072, ["--compile", "--jpeg-draft"]),
        ("vits16", 512, (2048, 1536), 0, 1024, 3072, ["--compile", "--jpeg-draft"]),
    ],
}


def flops_per_image(arch: str, side: int) -> float:
    """Forward FLOPs of a random:<arch> DINOv3 ViT at side x side (the formula `plan` uses)."""
    from dinocache.plan import forward_flops, model_shape

    return forward_flops(model_shape(f"random:{arch}"), (side // 16, side // 16))


def _write_jpeg(args):
    path, size, seed = args
    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    from make_sample_images import scene

    img = scene(size[0], size[1], seed)
    noise = np.random.default_rng(seed).integers(-12, 12, (size[1], size[0], 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(arr).save(path, quality=90)


def make_dataset(folder: Path, count: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"{i:06d}.jpg", size, i) for i in range(count) if not (folder / f"{i:06d}.jpg").exists()]
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2))) as pool:
        list(pool.map(_write_jpeg, todo, chunksize=8))


def save_model(arch: str, folder: Path) -> None:
    import torch
    from transformers import DINOv3ViTModel

    from dinocache.model import random_config

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    DINOv3ViTModel(random_config(arch)).save_pretrained(folder)


# ---------------------------------------------------------------------------------- children
def child_recipe(model_dir: str, images: list[str], side: int, device: str) -> dict:
    """The guide's recipe: AutoImageProcessor + fp32 AutoModel, one image at a time."""
    import torch
    from PIL import Image
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    try:
        from transformers import DINOv3ViTImageProcessor

        processor = DINOv3ViTImageProcessor()
        prep = "transformers DINOv3ViTImageProcessor"

        def pixels(path):
            return processor(
                images=Image.open(path), size={"height": side, "width": side}, do_center_crop=False, return_tensors="pt"
            )["pixel_values"]
    except (ImportError, RuntimeError):  # no torchvision: the processor's own algorithm, in torch
        from dinocache.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, preprocess

        prep = "torch equivalent of the processor (torchvision missing)"

        def pixels(path):
            x = decode_image(path, 10**10)
            return preprocess(x, (0, 0, x.shape[2], x.shape[1]), (side, side), IMAGENET_MEAN, IMAGENET_STD)[None]

    began = time.perf_counter()
    for path in images:
        with torch.no_grad():
            out = model(pixel_values=pixels(path).to(device)).last_hidden_state
        _cls, _patches = out[0, 0].cpu(), out[0, 5:].cpu()  # the recipe's token split and host copy
    seconds = time.perf_counter() - began
    return {"images": len(images), "seconds": seconds, "preprocessing": prep}


def child_forward(model_dir: str, images: list[str], side: int, device: str, batch: int) -> dict:
    """The HF model alone: batched, pre-decoded pixels, bf16 on GPU (auto dtype on CPU)."""
    import torch
    from transformers import DINOv3ViTModel

    from dinocache.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, preprocess
    from dinocache.model import resolve_dtype

    dtype = resolve_dtype("auto", torch.device(device))
    model = DINOv3ViTModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    distinct = [
        preprocess(x, (0, 0, x.shape[2], x.shape[1]), (side, side), IMAGENET_MEAN, IMAGENET_STD)
        for x in (decode_image(p, 10**10) for p in images[:batch])
    ]
    x = torch.stack(distinct).to(device, dtype)
    batches = max(1, len(images) // batch)
    with torch.inference_mode():
        model(pixel_values=x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(batches):
            _ = model(pixel_values=x).last_hidden_state
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    out = {"images": batches * len(x), "seconds": seconds, "dtype": str(dtype), "batch": len(x)}
    if device == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def run_child(kind: str, **kwargs) -> dict:
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(kwargs)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - began
    return result


def run_extract(model_dir: Path, images: Path, side: int, out: Path, device: str, extra: list[str]) -> dict:
    buckets = out.parent / f"buckets-{side}.yaml"
    buckets.write_text(f"buckets: [[{side}, {side}]]\n")
    code = (
        "import resource, sys, json\nfrom dinocache.cli import app\n"
        "try:\n    app(sys.argv[1:], standalone_mode=False)\nfinally:\n"
        "    print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, file=sys.stderr)\n"
    )
    cmd = [
        sys.executable,
        "-c",
        code,
        "extract",
        str(images),
        "--buckets",
        str(buckets),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--device",
        device,
        "--no-progress",
        "--overwrite",
        *extra,
    ]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"extract failed:\n{proc.stderr[-4000:]}")
    rss_main, rss_workers = (float(v) for v in proc.stderr.split("PEAK_RSS_MB")[1].split()[:2])
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    return {
        "images": run["processed"],
        "seconds": run["seconds"],
        "process_seconds": wall,
        "stage_seconds": run.get("stage_seconds", {}),
        "peak_rss_mb": rss_main,
        "peak_rss_workers_mb": rss_workers,
        "options": extra,
    }


# ---------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dinocache-bench")
    parser.add_argument(
        "--json", type=Path, default=None, help="where to write the results (default: WORK/results.json)"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, kwargs = args.child[0], json.loads(args.child[1])
        result = {"recipe": child_recipe, "forward": child_forward}[kind](**kwargs)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if gpu and k in gpu), None)
    rows = []
    print(
        f"device: {gpu or 'CPU'} ({os.cpu_count()} cores), torch {torch.__version__}, preset {args.preset}", flush=True
    )
    for arch, side, source, n_recipe, n_forward, n_extract, extra in PRESETS[args.preset]:
        images_dir = args.work / f"jpeg-{source[0]}x{source[1]}"
        began = time.perf_counter()
        make_dataset(images_dir, max(n_recipe, n_forward, n_extract), source)
        model_dir = args.work / f"model-{arch}"
        save_model(arch, model_dir)
        subset = images_dir.parent / f"subset-{source[0]}x{source[1]}-{n_extract}"
        if not subset.exists():
            subset.mkdir()
            for p in sorted(images_dir.glob("*.jpg"))[:n_extract]:
                os.link(p, subset / p.name)  # hard links: a symlink out of the folder is refused by default
        paths = [str(p) for p in sorted(images_dir.glob("*.jpg"))]
        print(
            f"\n{arch} at {side}x{side} from {source[0]}x{source[1]} JPEGs (dataset ready in "
            f"{time.perf_counter() - began:.0f} s)",
            flush=True,
        )
        row = {
            "arch": arch,
            "side": side,
            "source": list(source),
            "device": gpu or "cpu",
            "gflop_per_image": flops_per_image(arch, side) / 1e9,
        }
        if n_recipe:
            row["recipe"] = run_child(
                "recipe", model_dir=str(model_dir), images=paths[:n_recipe], side=side, device=device
            )
        if n_forward:
            batch = max(1, min(64, 65536 // (side // 16) ** 2)) if device == "cuda" else 8
            row["forward"] = run_child(
                "forward", model_dir=str(model_dir), images=paths[:n_forward], side=side, device=device, batch=batch
            )
        row["extract"] = run_extract(model_dir, subset, side, args.work / f"out-{arch}-{side}", device, extra)
        for name in ("recipe", "forward", "extract"):
            if name in row:
                r = row[name]
                r["img_per_s"] = r["images"] / r["seconds"]
                r["img_per_s_process"] = r["images"] / r["process_seconds"]
                if peak:
                    r["mfu"] = r["img_per_s"] * flops_per_image(arch, side) / peak
        for base in ("recipe", "forward"):
            # Rows without their own baseline compare with the last one measured for the same model and size.
            ref = next(
                (r[base] for r in [row, *reversed(rows)] if base in r and (r["arch"], r["side"]) == (arch, side)), None
            )
            if ref:
                row[f"extract_vs_{base}"] = row["extract"]["img_per_s"] / ref["img_per_s"]
                row[f"extract_vs_{base}_process"] = row["extract"]["img_per_s_process"] / ref["img_per_s_process"]
        rows.append(row)
        for name in ("recipe", "forward", "extract"):
            if name in row:
                r = row[name]
                mfu = f"  MFU {r['mfu'] * 100:5.1f}%" if "mfu" in r else ""
                gpu_mem = f"  peak GPU {r['peak_gpu_gb']:.1f} GB" if "peak_gpu_gb" in r else ""
                print(
                    f"  ({name[0]}) {name:<8} {r['img_per_s']:9.1f} img/s steady, {r['img_per_s_process']:9.1f} img/s "
                    f"incl. process start ({r['images']} images){mfu}{gpu_mem}  RSS {r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        if row["extract"]["options"]:
            print(f"  extract options: {' '.join(row['extract']['options'])}")
        for base in ("recipe", "forward"):
            if f"extract_vs_{base}" in row:
                print(
                    f"  extract / {base}: {row[f'extract_vs_{base}']:.2f}x steady, "
                    f"{row[f'extract_vs_{base}_process']:.2f}x as whole processes"
                )
        stages = row["extract"]["stage_seconds"]
        if stages:
            total = row["extract"]["seconds"]
            print(
                "  extract stages: " + ", ".join(f"{k} {v:.1f} s ({v / total * 100:.0f}%)" for k, v in stages.items())
            )
    out = args.json or args.work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"preset": args.preset, "device": gpu or "cpu", "torch": torch.__version__, "rows": rows}, indent=2)
    )
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
