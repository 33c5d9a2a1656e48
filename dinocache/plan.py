"""`dinocache plan`: what an extraction would do, before loading any model.

Reads only image headers: bucket counts and shares, aspect distortion, upscaling, the projected
cache size for a model / dtype / storage options, a time estimate, and whether it fits on disk.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .buckets import assign_bucket, crop_box, make_buckets
from .config import BucketConfig
from .errors import ConfigError, DecodeError
from .model import ARCHITECTURES, RANDOM_PREFIX
from .scan import probe, scan_folder
from .stats import human_bytes

STORAGE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
ASSUMED_GPU_FLOPS = 0.5 * 989e12  # 50% MFU on one H100/H200, dense bf16 (what `extract --compile` targets)


@dataclass
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    gated: bool
    num_registers: int = 4
    patch_size: int = 16


def model_shape(spec: str) -> ModelShape:
    """The model's shape without loading weights: random:<arch>, a local config.json, or the
    architecture named in a Hub id (facebook/dinov3-vitl16-...)."""
    if spec.startswith(RANDOM_PREFIX):
        arch = spec[len(RANDOM_PREFIX):]
    elif (Path(spec) / "config.json").is_file():
        c = json.loads((Path(spec) / "config.json").read_text())
        return ModelShape(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], bool(c.get("use_gated_mlp")),
                          c.get("num_register_tokens", 0), c.get("patch_size", 16))
    else:
        arch = next((a for a in sorted(ARCHITECTURES, key=len, reverse=True) if a in spec.lower()), "")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"cannot tell the architecture of {spec!r} without loading it",
                          "pass --model random:<arch> with the same shape (e.g. random:vitl16) or a local folder")
    a = ARCHITECTURES[arch]
    return ModelShape(a["hidden_size"], a["num_hidden_layers"], a["intermediate_size"], bool(a.get("use_gated_mlp")))


def forward_flops(shape: ModelShape, grid: tuple[int, int]) -> float:
    """Forward FLOPs (2 per multiply-add) for one image: blocks (projections, MLP, attention)
    plus the patch embedding. ViT-L/16 at 1024x1024: 4.14 TFLOP."""
    patches = grid[0] * grid[1]
    tokens = 1 + shape.num_registers + patches
    d, inner = shape.hidden_size, shape.intermediate_size
    mats = 3 if shape.gated else 2
    blocks = shape.num_hidden_layers * (2 * tokens * (4 * d * d + mats * d * inner) + 4 * tokens * tokens * d)
    return blocks + 2 * patches * 3 * shape.patch_size**2 * d


@dataclass
class PlanReport:
    images: int = 0
    unreadable: dict[str, int] = field(default_factory=dict)
    buckets: list[dict] = field(default_factory=list)
    mean_distortion: float = 0.0  # stretch: aspect change; crop: share of the picture cut away
    worst_distortion: float = 0.0
    worst_key: str | None = None
    upscaled: int = 0
    projected_bytes: int = 0
    estimated_gpu_seconds: float = 0.0
    disk_free_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)


def plan_extraction(input_dir: str | Path, config: BucketConfig, model: str, storage_dtype: str = "bfloat16",
                    keep_registers: bool = False, pool: int = 1, layers: tuple[int, ...] = (),
                    out: str | Path | None = None, max_pixels: int = 178_956_970) -> PlanReport:
    shape = model_shape(model)
    if storage_dtype not in STORAGE_BYTES:
        raise ConfigError(f"unknown storage dtype {storage_dtype!r}", f"use one of {', '.join(STORAGE_BYTES)}")
    buckets = make_buckets(config.sizes, shape.patch_size)
    report = PlanReport()
    counts = [0] * len(buckets)
    distortions = []
    for src in scan_folder(input_dir):
        try:
            width, height = probe(src.path, max_pixels)
        except DecodeError as exc:
            report.unreadable[exc.reason] = report.unreadable.get(exc.reason, 0) + 1
            continue
        bucket = assign_bucket(width, height, buckets)
        counts[bucket.index] += 1
        left, top, right, bottom = crop_box(width, height, bucket, config.resize)
        if config.resize == "crop":
            distortion = 1 - (right - left) * (bottom - top) / (width * height)
        else:
            distortion = math.exp(abs(math.log(width / height) - bucket.log_aspect)) - 1
        distortions.append(distortion)
        if distortion > report.worst_distortion or report.worst_key is None:
            report.worst_distortion, report.worst_key = distortion, src.key
        if right - left < bucket.input_width or bottom - top < bucket.input_height:
            report.upscaled += 1
    report.images = sum(counts)
    report.mean_distortion = sum(distortions) / len(distortions) if distortions else 0.0
    element = STORAGE_BYTES[storage_dtype]
    for bucket, n in zip(buckets, counts):
        rows, cols = bucket.grid
        stored_patches = math.ceil(rows / pool) * math.ceil(cols / pool)
        tokens = (1 + stored_patches + (shape.num_registers if keep_registers else 0)) * (1 + len(layers))
        row_bytes = tokens * shape.hidden_size * element + (4 * (1 + len(layers)) if storage_dtype.startswith("float8") else 0)
        report.projected_bytes += n * row_bytes
        report.estimated_gpu_seconds += n * forward_flops(shape, bucket.grid) / ASSUMED_GPU_FLOPS
        report.buckets.append({"name": bucket.name, "input": f"{bucket.input_width}x{bucket.input_height}",
                               "grid": f"{rows}x{cols}", "images": n,
                               "share": n / report.images if report.images else 0.0, "bytes": n * row_bytes})
    if out is not None:
        target = Path(out)
        while not target.exists() and target != target.parent:
            target = target.parent
        report.disk_free_bytes = shutil.disk_usage(target).free
        if report.projected_bytes > report.disk_free_bytes:
            report.warnings.append(f"the cache would need {human_bytes(report.projected_bytes)} but only "
                                   f"{human_bytes(report.disk_free_bytes)} are free under {target}")
    if report.upscaled > 0.2 * max(1, report.images):
        report.warnings.append(f"{report.upscaled} of {report.images} images are smaller than their bucket and "
                               "will be upscaled: consider smaller buckets")
    return report


def human_seconds(s: float) -> str:
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_plan(report: PlanReport, config: BucketConfig, model: str, storage_dtype: str) -> str:
    lines = [f"{'bucket':>11} {'input':>11} {'grid':>7} {'images':>8} {'share':>7} {'projected':>10}"]
    for b in report.buckets:
        lines.append(f"{b['name']:>11} {b['input']:>11} {b['grid']:>7} {b['images']:>8} {b['share'] * 100:>6.1f}% "
                     f"{human_bytes(b['bytes']):>10}")
    kind = "share of the picture cropped away" if config.resize == "crop" else "aspect ratio change"
    lines += [
        "",
        f"images        {report.images} usable" + (f", {sum(report.unreadable.values())} unusable "
                                                   f"({', '.join(f'{k}={v}' for k, v in sorted(report.unreadable.items()))})"
                                                   if report.unreadable else ""),
        f"distortion    mean {report.mean_distortion * 100:.1f}%, worst {report.worst_distortion * 100:.1f}% "
        f"({report.worst_key}) [{kind}, resize: {config.resize}]",
        f"upscaled      {report.upscaled} image(s) smaller than their bucket",
        f"cache size    {human_bytes(report.projected_bytes)} ({model}, {storage_dtype})",
        f"time          ~{human_seconds(report.estimated_gpu_seconds)} of one H100/H200 at 50% MFU "
        "(extract --compile); CPU runs are 100-1000x slower",
    ]
    if report.disk_free_bytes is not None:
        lines.append(f"disk          {human_bytes(report.disk_free_bytes)} free")
    lines += [f"WARNING: {w}" for w in report.warnings]
    return "\n".join(lines)
