"""End-to-end benchmark: the model's forward alone vs `dinocache extract`, side by side in one run.

For each row (a model at a bucket size, from JPEGs on local disk), in one fresh process:

  forward   the model alone on pre-decoded pixels, in extract's batch size and dtype
  extract   `dinocache extract` end to end (read, decode, resize, forward, copy to host, write
            shards, commit), once per variant: default options, then each fast option alone,
            then all together. Each variant first warms up on a few images (compilation,
            cuDNN autotuning), then the timed run extracts the whole set anew.
  recipe    (CPU presets) the integration guide's recipe: one image at a time, fp32

and reports img/s, ratios to the forward, MFU (GPU), the stage breakdown, peak GPU memory, compile
time, model load time, and the per-token cosine of each variant's stored features against an
fp32 eager forward of the same pixels on the same device. Prints one table; writes it as JSON.

    python scripts/bench.py --preset smoke               # tiny sizes on CPU: CI runs it
    python scripts/bench.py --preset cpu                 # the CPU pipeline against the forward alone
    PYTHONPATH=. python scripts/bench.py --preset gpu --out results/     # ViT-L at 1024/512/224, ~4 min on one H100
    PYTHONPATH=. python scripts/bench.py --preset gpu-big --out results/ # ViT-H+ and ViT-7B at 512/1024

Needs only what dinocache needs (torch, transformers, safetensors, pillow, typer, tqdm): the
models are random and built here, the JPEGs are synthetic and made here with all cores.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity
COSINE_SAMPLES = 4


@dataclass
class Row:
    arch: str
    side: int
    images: int  # timed images per extract variant
    variants: list[list[str]]  # extract option lists; [] is the defaults
    source: tuple[int, int] = (2048, 1536)  # 3 MP JPEGs
    recipe_images: int = 0  # the guide's recipe, one image at a time (0: not measured)
    warmup_images: int = 0  # 0: two batches
    saved: bool = True  # save the random model and load it (cosine references need the same weights)
    extra: dict = field(default_factory=dict)


FAST = [["--sdpa-backend", "cudnn"], ["--jpeg-draft"], ["--compile"]]  # compile last: it takes longest
PRESETS: dict[str, list[Row]] = {
    "smoke": [
        Row(
            "vits16",
            64,
            8,
            [[], ["--jpeg-draft"], ["--sdpa-backend", "math"]],
            source=(320, 240),
            recipe_images=2,
            warmup_images=2,
        )
    ],
    "cpu": [Row("vits16", 448, 48, [[], ["--jpeg-draft"]], source=(1200, 900), recipe_images=16, warmup_images=4)],
    "gpu": [
        Row("vitl16", 1024, 384, [[], *FAST]),
        Row("vitl16", 512, 1536, [[], *FAST]),
        Row("vitl16", 224, 3072, [[], ["--jpeg-draft"], ["--compile", "--jpeg-draft"]]),
    ],
    "gpu-big": [
        Row("vith16plus", 512, 512, [[]], saved=False),
        Row("vith16plus", 1024, 192, [[]], saved=False),
        Row("vit7b16", 512, 192, [[]], saved=False),
        Row("vit7b16", 1024, 64, [[]], saved=False),
    ],
}


# ---- data and models ------------------------------------------------------------------------------


def _write_jpeg(args):
    path, size, seed = args
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "scripts"))
    from make_sample_images import scene

    img = scene(size[0], size[1], seed)
    noise = np.random.default_rng(seed).integers(-12, 12, (size[1], size[0], 3))
    Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """`count` synthetic JPEGs, made with every core; kept between runs."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"{i:06d}.jpg", size, i) for i in range(count) if not (folder / f"{i:06d}.jpg").exists()]
    if todo:
        with ProcessPoolExecutor(max(1, os.cpu_count() or 2)) as pool:
            list(pool.map(_write_jpeg, todo, chunksize=max(1, len(todo) // (8 * (os.cpu_count() or 1)))))


def subset(pool: Path, folder: Path, count: int) -> Path:
    """A folder of the first `count` JPEGs of the pool (hard links: no copy, no symlink out)."""
    if folder.exists() and len(list(folder.iterdir())) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(pool.glob("*.jpg"))[:count]:
        if not (folder / p.name).exists():
            os.link(p, folder / p.name)
    return folder


def save_model(arch: str, folder: Path, device: str) -> None:
    """A random model saved in bfloat16, so that a float32 load is its exact upcast."""
    import torch
    from transformers import DINOv3ViTModel

    from dinocache.model import random_config

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device(device):
        model = DINOv3ViTModel._from_config(random_config(arch), dtype=torch.bfloat16)
    model.save_pretrained(folder)


def flops_per_image(arch: str, side: int) -> float:
    """Forward FLOPs (the formula `plan` uses: ViT-L/16 at 1024x1024 is 4.14 TFLOP)."""
    from dinocache.plan import forward_flops, model_shape

    return forward_flops(model_shape(f"random:{arch}"), (side // 16, side // 16))


# ---- one row, in its own process ------------------------------------------------------------------


def measure_row(row: Row, work: Path, device: str, deadline: float) -> dict:
    import torch

    from dinocache.config import ExtractOptions, parse_bucket_config
    from dinocache.decoding import default_batch_size
    from dinocache.extract import extract
    from dinocache.model import load_model
    from dinocache.plan import plan_extraction

    cuda = device == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else None
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if gpu and k in gpu), None)
    flops = flops_per_image(row.arch, row.side)
    pool = work / f"jpeg-{row.source[0]}x{row.source[1]}"
    warm = subset(
        pool,
        work / f"warm-{row.source[0]}x{row.source[1]}-{row.warmup_images or 'auto'}",
        row.warmup_images or 2 * default_batch_size(_bucket(row.side), device),
    )
    timed = subset(pool, work / f"set-{row.source[0]}x{row.source[1]}-{row.images}", row.images)
    spec = str(work / f"model-{row.arch}") if row.saved else f"random:{row.arch}"
    out: dict = {
        "arch": row.arch,
        "side": row.side,
        "device": gpu or "cpu",
        "images": row.images,
        "gflop_per_image": flops / 1e9,
        "variants": [],
    }

    began = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = load_model(spec, device=device, dtype="auto")
    if cuda:
        torch.cuda.synchronize()
    out["load_seconds"] = time.perf_counter() - began
    out["load_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if cuda:
        out["load_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["dtype"] = str(loaded.dtype).removeprefix("torch.")
    batch = min(row.images, default_batch_size(_bucket(row.side), device))  # what extract's batches hold
    out["forward"] = forward_alone(loaded, row.side, batch, cuda, peak, flops, deadline)
    if row.recipe_images:
        out["recipe"] = recipe(spec, sorted(timed.iterdir())[: row.recipe_images], row.side, device)
    config = parse_bucket_config({"buckets": [[row.side, row.side]]})
    reference = load_model(spec, device=device, dtype="float32") if row.saved else None
    for options in row.variants:
        name = " ".join(options) or "default"
        if time.time() > deadline:
            out["variants"].append({"options": name, "skipped": "out of time"})
            continue
        try:
            result = extract_variant(
                row, options, loaded, config, warm, timed, work, cuda, peak, flops, reference, extract, ExtractOptions
            )
        except Exception as exc:  # one broken variant must not lose the others
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        result["options"] = name
        out["variants"].append(result)
    out["plan_gpu_seconds"] = plan_extraction(timed, config, spec).estimated_gpu_seconds
    return out


def _bucket(side: int):
    from dinocache.buckets import make_buckets

    return make_buckets([(side, side)], 16)[0]


def forward_alone(loaded, side: int, batch: int, cuda: bool, peak, flops: float, deadline: float) -> dict:
    """The model by itself on random pixels already on the device: extract's ceiling."""
    import torch

    x = torch.randn(batch, 3, side, side, device=loaded.device)
    with torch.inference_mode():
        for _ in range(2):
            loaded.forward(x)
        if cuda:
            torch.cuda.synchronize()
        iterations, began = 0, time.perf_counter()
        while iterations < 3 or (time.perf_counter() - began < 3.0 and time.time() < deadline):
            loaded.forward(x)
            iterations += 1
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    rate = iterations * batch / seconds
    result = {"batch": batch, "img_per_s": rate}
    if peak:
        result["mfu"] = rate * flops / peak
    return result


def extract_variant(
    row, options, loaded, config, warm, timed, work, cuda, peak, flops, reference, extract, ExtractOptions
) -> dict:
    import torch

    from dinocache.model import load_model

    kwargs = {
        "compile": "--compile" in options,
        "jpeg_draft": "--jpeg-draft" in options,
        "sdpa_backend": options[options.index("--sdpa-backend") + 1] if "--sdpa-backend" in options else "auto",
    }
    model = loaded
    compile_seconds = None
    if kwargs["compile"] or kwargs["sdpa_backend"] != "auto":
        model = load_model(
            str(loaded.model_id),
            device=str(loaded.device),
            dtype=str(loaded.dtype).split(".")[-1],
            sdpa_backend=kwargs["sdpa_backend"],
        )
        if kwargs["compile"]:
            model.enable_compile()
    out_dir = work / f"out-{row.arch}-{row.side}-{'-'.join(o.strip('-') for o in options) or 'default'}"
    common = dict(
        buckets=config,
        model=str(loaded.model_id),
        progress=False,
        overwrite=True,
        jpeg_draft=kwargs["jpeg_draft"],
        sdpa_backend=kwargs["sdpa_backend"],
        compile=False,
    )
    began = time.perf_counter()
    extract(warm, ExtractOptions(out=out_dir, **common), loaded=model)  # compile, autotune, workers warm
    if kwargs["compile"]:
        compile_seconds = time.perf_counter() - began
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = extract(timed, ExtractOptions(out=out_dir, **common), loaded=model)
    rate = result.images_per_second
    out = {
        "img_per_s": rate,
        "seconds": result.seconds,
        "stages": result.stage_seconds,
        "processed": result.processed,
        "failed": result.failed_this_run,
    }
    if peak:
        out["mfu"] = rate * flops / peak
    if cuda:
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if compile_seconds is not None:
        out["compile_seconds"] = compile_seconds
    if reference is not None:
        out["cosine_min"] = cosine_against(reference, out_dir, timed)
    return out


def cosine_against(reference, cache_dir: Path, source: Path) -> float:
    """The worst per-token cosine between stored features and an fp32 eager forward of the same
    pixels (the cache's own decode path, so --jpeg-draft is compared on its own pixels)."""
    import torch

    from dinocache import FeatureCache
    from dinocache.features import stored_features
    from dinocache.imaging import Preprocessing, model_input, read_source
    from dinocache.layout import Layout

    cache = FeatureCache(cache_dir)
    prep = Preprocessing.from_record(cache.manifest["preprocessing"])
    layout = Layout.from_record(cache.manifest["storage"])
    worst = 1.0
    for i in range(min(COSINE_SAMPLES, len(cache))):
        record = cache.record(i)
        b = cache.manifest["buckets"][record["bucket"]]
        pixels = model_input(
            read_source(str(source / record["key"])),
            tuple(record["source_size"]),
            tuple(record["box"]),
            (b["input_width"], b["input_height"]),
            prep,
            1 << 40,
        )
        fresh = stored_features(reference, pixels[None], tuple(b["grid"]), layout)
        item = cache[i]
        for name in ("cls", "patches"):
            got = item[name].reshape(fresh[name][0].shape).float().to(fresh[name].device)
            cos = torch.nn.functional.cosine_similarity(got, fresh[name][0].float(), dim=-1)
            worst = min(worst, float(cos.min()))
    return worst


def recipe(spec: str, images: list[Path], side: int, device: str) -> dict:
    """The integration guide's recipe: fp32, one image at a time, processor-equivalent pixels."""
    import torch

    from dinocache.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, preprocess
    from dinocache.model import load_model

    model = load_model(spec, device=device, dtype="float32")
    began = time.perf_counter()
    for path in images:
        x = decode_image(str(path), 1 << 40)
        pixels = preprocess(x, (0, 0, x.shape[2], x.shape[1]), (side, side), IMAGENET_MEAN, IMAGENET_STD)
        with torch.inference_mode():
            out = model.forward(pixels[None])
        _cls, _patches = out[0, 0].cpu(), out[0, 5:].cpu()
    return {"img_per_s": len(images) / (time.perf_counter() - began), "images": len(images)}


# ---- driver ------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':>10} {'size':>5} {'options':<44} {'img/s':>8} {'vs fwd':>7} {'MFU':>6} "
        f"{'cos min':>8} {'GPU GB':>7}  stages (s: decode upload forward download write commit)"
    )
    print("\n" + head)
    for r in rows:
        fwd = r["forward"]["img_per_s"]
        mfu = f"{r['forward']['mfu'] * 100:5.1f}%" if "mfu" in r["forward"] else "     -"
        print(
            f"{r['arch']:>10} {r['side']:>5} {'forward alone (batch ' + str(r['forward']['batch']) + ')':<44} "
            f"{fwd:>8.1f} {'1.00':>7} {mfu:>6} {'-':>8} {'-':>7}"
        )
        if "recipe" in r:
            print(
                f"{'':>10} {'':>5} {'guide recipe (fp32, one at a time)':<44} {r['recipe']['img_per_s']:>8.1f} "
                f"{r['recipe']['img_per_s'] / fwd:>7.2f}"
            )
        for v in r["variants"]:
            if "img_per_s" not in v:
                print(f"{'':>10} {'':>5} {v['options']:<44} {v.get('error') or v.get('skipped')}")
                continue
            mfu = f"{v['mfu'] * 100:5.1f}%" if "mfu" in v else "     -"
            cos = f"{v['cosine_min']:.5f}" if "cosine_min" in v else "-"
            gpu = f"{v['peak_gpu_gb']:.1f}" if "peak_gpu_gb" in v else "-"
            stages = " ".join(
                f"{v['stages'].get(k, 0):.1f}"
                for k in ("decode_wait", "upload", "forward", "download", "write_wait", "commit")
            )
            extra = f"  compile {v['compile_seconds']:.0f} s" if "compile_seconds" in v else ""
            print(
                f"{'':>10} {'':>5} {'extract ' + v['options']:<44} {v['img_per_s']:>8.1f} "
                f"{v['img_per_s'] / fwd:>7.2f} {mfu:>6} {cos:>8} {gpu:>7}  {stages}{extra}"
            )
        load = f"load {r['load_seconds']:.1f} s, host peak {r['load_peak_rss_gb']:.1f} GB"
        if "load_peak_gpu_gb" in r:
            load += f", GPU after load {r['load_peak_gpu_gb']:.1f} GB"
        if "plan_gpu_seconds" in r and r["device"] != "cpu":
            best = max((v["img_per_s"] for v in r["variants"] if "img_per_s" in v), default=0)
            measured = r["images"] / best if best else float("nan")
            load += f"; plan's estimate {r['plan_gpu_seconds']:.1f} s vs measured {measured:.1f} s"
        print(f"{'':>10} {'':>5} {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dinocache-bench")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json (default: WORK)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting variants after this long")
    parser.add_argument("--device", default=None)
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # a child measuring one row
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = PRESETS[args.preset]
    if args.row is not None:
        result = measure_row(rows[args.row], args.work, device, args.deadline or float("inf"))
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print("RESULT " + json.dumps(result))
        return
    started = time.time()
    budget = args.budget_s or {"gpu": 220.0, "gpu-big": 280.0}.get(args.preset, 3600.0)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(
        f"preset {args.preset}: {gpu or 'CPU'}; CPU {cpu}, {os.cpu_count()} cores; torch {torch.__version__}",
        flush=True,
    )
    args.work.mkdir(parents=True, exist_ok=True)
    for row in rows:  # data and models first, with every core
        make_jpegs(args.work / f"jpeg-{row.source[0]}x{row.source[1]}", max(row.images, 64), row.source)
        if row.saved:
            save_model(row.arch, args.work / f"model-{row.arch}", device)
    print(f"data and models ready in {time.time() - started:.0f} s", flush=True)
    results = []
    for index, row in enumerate(rows):
        deadline = started + budget
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--preset",
                args.preset,
                "--work",
                str(args.work),
                "--device",
                device,
                "--row",
                str(index),
                "--deadline",
                str(deadline),
            ],
            capture_output=True,
            text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{row.arch} at {row.side}: failed\n{proc.stderr[-3000:]}", flush=True)
            results.append({"arch": row.arch, "side": row.side, "error": proc.stderr[-3000:]})
            continue
        results.append(json.loads(line[len("RESULT ") :]))
        print(f"{row.arch} at {row.side}: done ({time.time() - started:.0f} s so far)", flush=True)
    print_table([r for r in results if "forward" in r])
    out = (args.out or args.work) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "preset": args.preset,
                "device": gpu or "cpu",
                "cpu": cpu,
                "torch": torch.__version__,
                "seconds": time.time() - started,
                "rows": results,
                "presets": {args.preset: [asdict(r) for r in rows]},
            },
            indent=2,
        )
    )
    print(f"\n{time.time() - started:.0f} s in all; results: {out}")


if __name__ == "__main__":
    main()
