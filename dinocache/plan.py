"""`dinocache plan`: what an extraction would do, before loading any model.

Reads only image headers: bucket counts and shares, aspect distortion, upscaling, the projected
cache size for a model / dtype / storage options, a time estimate, and whether it fits on disk.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .buckets import make_buckets
from .config import BucketConfig
from .errors import ConfigError, DinocacheError
from .families import FAMILIES, Shape
from .layout import Layout, encode_json, rows_per_shard, shard_file_bytes, shard_metadata
from .model import ARCHITECTURES, RANDOM_PREFIX, ModelSpec, check_layers, check_registers, resolve_model
from .placement import place, probe_source
from .presets import build_preprocessing
from .sources import open_source
from .stats import human_bytes

ASSUMED_GPU_FLOPS = 0.5 * 989e12  # 50% MFU on one H100/H200, dense bf16 (what `extract --compile` targets)
DEFAULT_SHARD_BYTES = 512 * 1024**2
_PLACEHOLDER_SHA = "0" * 64


def plan_model(spec: str) -> ModelSpec:
    """The model as extract will see it, without loading weights: random:<arch> and local
    folders exactly (config + final norm), a Hub id or .pth file by the architecture its name
    names."""
    if spec.startswith(RANDOM_PREFIX) or (Path(spec) / "config.json").is_file():
        return resolve_model(spec, device="cpu", dtype="auto")
    names = {a: a for a in ARCHITECTURES} | {alias: a for f in FAMILIES for alias, a in f.name_aliases.items()}
    arch = next(
        (names[n] for n in sorted(names, key=len, reverse=True) if n in Path(spec).name.lower() or n in spec.lower()),
        "",
    )
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"cannot tell the architecture of {spec!r} without loading it",
            "pass --model random:<arch> with the same shape (e.g. random:vitl16) or a local folder",
        )
    plain = resolve_model(RANDOM_PREFIX + arch, device="cpu", dtype="auto")
    plain.id = spec
    return plain


def model_shape(spec: str) -> Shape:
    """The model's shape without loading weights: random:<arch>, a local config.json, or the
    architecture named in a Hub id (facebook/dinov3-vitl16-...)."""
    return model_shape_of(plan_model(spec))


def forward_flops(shape: Shape, grid: tuple[int, int]) -> float:
    """Forward FLOPs (2 per multiply-add) for one image: blocks (projections, MLP, attention)
    plus the patch embedding. ViT-L/16 at 1024x1024: 4.14 TFLOP."""
    patches = grid[0] * grid[1]
    tokens = shape.num_prefix_tokens + patches
    d, inner = shape.hidden_size, shape.intermediate_size
    mats = 3 if shape.gated else 2
    blocks = shape.num_hidden_layers * (2 * tokens * (4 * d * d + mats * d * inner) + 4 * tokens * tokens * d)
    return blocks + 2 * patches * 3 * shape.patch_size**2 * d


@dataclass
class PlanReport:
    images: int = 0
    unreadable: dict[str, int] = field(default_factory=dict)
    unreadable_files: list[dict] = field(default_factory=list)  # {"key", "reason", "detail"}
    buckets: list[dict] = field(default_factory=list)
    mean_distortion: float = 0.0  # stretch: aspect change; crop: share of the picture cut away
    worst_distortion: float = 0.0
    worst_key: str | None = None
    by_crops: int = 0  # images placed by a --crops box: their distortion is the share outside it
    upscaled: int = 0
    upscaled_files: list[str] = field(default_factory=list)
    projected_bytes: int = 0  # the shard files extract would write (safetensors headers included)
    shards: int = 0
    estimated_gpu_seconds: float = 0.0
    disk_free_bytes: int | None = None
    disk_checked_at: str | None = None
    already_cached: int | None = None  # of the usable images, keys the cache at `out` holds already
    warnings: list[str] = field(default_factory=list)
    resize: str = "stretch"  # the crop rule used (the config's, or a --preset's)


def plan_extraction(
    input_dir: str | Path,
    config: BucketConfig,
    model: str,
    layout: Layout | None = None,
    out: str | Path | None = None,
    max_pixels: int = 178_956_970,
    shard_max_bytes: int = DEFAULT_SHARD_BYTES,
    jpeg_draft: bool = False,
    crops=None,
    follow_symlinks: bool = False,
    preset: str | None = None,
    token_pixels: int | None = None,
) -> PlanReport:
    """What `extract` would do with the same options, from the headers alone: the same scan,
    the same placement (placement.place), the same layout and shard split, so the projected
    bytes are what extract writes."""
    import dataclasses

    from .extract import cache_settings

    layout = layout or Layout()
    mspec = plan_model(model)
    layout = dataclasses.replace(layout, summary=mspec.family.summary)
    check_layers(layout.layers, mspec)
    check_registers(layout.registers, mspec)
    prep = build_preprocessing(mspec, config.resize, jpeg_draft, preset, token_pixels)
    buckets = make_buckets(config.sizes, mspec.patch_size, prep.token_pixels)
    settings = cache_settings(mspec, prep, layout, buckets)
    report = PlanReport(resize=prep.resize)
    placer = _Placer(buckets, prep.resize, crops, max_pixels, report)
    sources = open_source(str(input_dir), exclude=[out] if out else [], follow_symlinks=follow_symlinks).scan()
    for src in sources:
        placer.add(src)
    placer.finish()
    _project(report, placer, settings, layout, mspec, shard_max_bytes)
    if out is not None:
        report.already_cached = _keys_cached(out, placer.per_bucket, settings, report)
        _check_disk(out, report)
    if report.upscaled > 0.2 * max(1, report.images):
        report.warnings.append(
            f"{report.upscaled} of {report.images} images are smaller than their bucket and "
            "will be upscaled: consider smaller buckets"
        )
    return report


class _Placer:
    """Each image placed as extract places it (placement.place): its row record in its bucket,
    and the report's unusable, distortion and upscaling figures."""

    def __init__(self, buckets: list, resize: str, crops, max_pixels: int, report: PlanReport):
        self.buckets, self.resize, self.crops, self.max_pixels, self.report = buckets, resize, crops, max_pixels, report
        self.per_bucket: list[list[dict]] = [[] for _ in buckets]
        self.distortions: list[float] = []

    def add(self, src) -> None:
        report = self.report
        status, a, b = probe_source(src, self.max_pixels)
        try:
            if status != "ok":
                raise _Unusable(a, b)
            width, height = a, b
            where = place(width, height, self.buckets, self.resize, (self.crops or {}).get(src.key))
        except _Unusable as exc:
            report.unreadable[exc.reason] = report.unreadable.get(exc.reason, 0) + 1
            report.unreadable_files.append({"key": src.key, "reason": exc.reason, "detail": exc.detail})
            return
        except Exception as exc:  # DecodeError: a crop that does not fit
            reason = getattr(exc, "reason", "crop_outside")
            report.unreadable[reason] = report.unreadable.get(reason, 0) + 1
            report.unreadable_files.append(
                {"key": src.key, "reason": reason, "detail": getattr(exc, "detail", str(exc))}
            )
            return
        self._placed(src, width, height, where)

    def _placed(self, src, width: int, height: int, where) -> None:
        report = self.report
        bucket = self.buckets[where.bucket]
        left, top, right, bottom = where.box
        self.per_bucket[bucket.index].append(
            {
                "key": src.key,
                "bucket": bucket.index,
                "source_bytes": src.size,
                "source_mtime_ns": str(src.mtime_ns),
                "source_sha256": _PLACEHOLDER_SHA,
                "source_size": [width, height],
                "box": list(where.box),
                "placement": where.placement,
            }
        )
        report.by_crops += bool(where.placement)
        if self.resize in ("crop", "adm") or where.placement:
            distortion = 1 - (right - left) * (bottom - top) / (width * height)
        else:
            distortion = math.exp(abs(math.log(width / height) - bucket.log_aspect)) - 1
        self.distortions.append(distortion)
        if distortion > report.worst_distortion or report.worst_key is None:
            report.worst_distortion, report.worst_key = distortion, src.key
        if right - left < bucket.input_width or bottom - top < bucket.input_height:
            report.upscaled += 1
            report.upscaled_files.append(src.key)

    def finish(self) -> None:
        report, distortions = self.report, self.distortions
        report.images = sum(len(r) for r in self.per_bucket)
        report.mean_distortion = sum(distortions) / len(distortions) if distortions else 0.0


def _project(
    report: PlanReport, placer: _Placer, settings: dict, layout: Layout, mspec: ModelSpec, shard_max_bytes: int
) -> None:
    """Bytes, shards and GPU time per bucket: the shards extract would write, headers included."""
    for bucket, records in zip(placer.buckets, placer.per_bucket):
        records.sort(key=lambda r: r["key"])  # the order extract writes them in
        grid = tuple(settings["buckets"][bucket.index]["stored_grid"])
        specs = layout.tensors(mspec.hidden_size, mspec.num_registers, grid)
        per_shard = rows_per_shard(layout.row_bytes(mspec.hidden_size, mspec.num_registers, grid), shard_max_bytes)
        nbytes = 0
        for start in range(0, len(records), per_shard):
            rows = records[start : start + per_shard]
            metadata = shard_metadata(settings, settings["buckets"][bucket.index], encode_json(rows), layout.pool)
            nbytes += shard_file_bytes(specs, len(rows), metadata)
            report.shards += 1
        report.projected_bytes += nbytes
        report.estimated_gpu_seconds += (
            len(records) * forward_flops(model_shape_of(mspec), bucket.grid) * len(layout.views()) / ASSUMED_GPU_FLOPS
        )
        report.buckets.append(
            {
                "name": bucket.name,
                "input": f"{bucket.input_width}x{bucket.input_height}",
                "grid": f"{bucket.grid[0]}x{bucket.grid[1]}",  # the model's, as stats shows it
                "stored_grid": f"{grid[0]}x{grid[1]}",  # after --pool
                "images": len(records),
                "share": len(records) / report.images if report.images else 0.0,
                "bytes": nbytes,
            }
        )


def _check_disk(out: str | Path, report: PlanReport) -> None:
    """Free space where the cache would be created, and a warning when the projection exceeds it."""
    target = Path(out)
    while not target.exists() and target != target.parent:
        target = target.parent  # the folder the cache would be created in (as the user wrote it)
    report.disk_free_bytes = shutil.disk_usage(target).free
    report.disk_checked_at = str(target)
    if report.projected_bytes > report.disk_free_bytes:
        report.warnings.append(
            f"the cache would need {human_bytes(report.projected_bytes)} but only "
            f"{human_bytes(report.disk_free_bytes)} are free under {target}"
        )


def _keys_cached(out: str | Path, per_bucket: list[list[dict]], settings: dict, report: PlanReport) -> int | None:
    """How many of the planned keys an existing cache at `out` holds (None: no readable cache,
    or one with another model, buckets or storage, which extract would refuse: a warning says so)."""
    from .manifest import MANIFEST_NAME, load_samples, read_manifest, settings_of
    from .state import settings_differences

    if not (Path(out) / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(out)
        recorded = settings_of(manifest)
        diffs = [d for k in ("buckets", "storage") for d in settings_differences(recorded[k], settings[k], k)]
        if recorded["model"]["id"] != settings["model"]["id"]:
            diffs.insert(0, f"model: cache has {recorded['model']['id']}, this plan has {settings['model']['id']}")
        if diffs:
            report.warnings.append(
                f"the cache at {out} was built with other settings ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}): extract would refuse these options "
                "(use the same ones, another --out, or --overwrite to rebuild it)"
            )
            return None
        cached = set(load_samples(Path(out), manifest).iter_keys())
    except DinocacheError:
        return None
    return sum(r["key"] in cached for records in per_bucket for r in records)


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def model_shape_of(mspec: ModelSpec) -> Shape:
    return mspec.family.shape(mspec.config)


def human_seconds(s: float) -> str:
    if s < 0.01:
        return "<0.01 s"
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_plan(report: PlanReport, config: BucketConfig, model: str, storage_dtype: str, listed: int = 5) -> str:
    pooled = any(b["grid"] != b["stored_grid"] for b in report.buckets)  # the same columns as stats
    lines = [
        f"{'bucket':>11} {'input':>11} {'grid':>7}"
        + (f" {'stored':>7}" if pooled else "")
        + f" {'images':>8} {'share':>7} {'projected':>10}"
    ]
    for b in report.buckets:
        lines.append(
            f"{b['name']:>11} {b['input']:>11} {b['grid']:>7}"
            + (f" {b['stored_grid']:>7}" if pooled else "")
            + f" {b['images']:>8} {b['share'] * 100:>6.1f}% {human_bytes(b['bytes']):>10}"
        )
    if report.by_crops:
        kind = "share of the picture outside its --crops box" + (
            ", else aspect ratio change" if report.by_crops < report.images else ""
        )
    else:
        kind = "share of the picture cropped away" if report.resize in ("crop", "adm") else "aspect ratio change"
    lines += [
        "",
        f"images        {report.images} usable"
        + (
            f", {sum(report.unreadable.values())} unusable "
            f"({', '.join(f'{k}={v}' for k, v in sorted(report.unreadable.items()))})"
            if report.unreadable
            else ""
        ),
    ]
    for f in report.unreadable_files[:listed]:
        lines.append(f"              - {f['key']}: {f['reason']} ({f['detail']})")
    if len(report.unreadable_files) > listed:
        lines.append(f"              ... {len(report.unreadable_files) - listed} more (--json lists all)")
    lines += [
        f"distortion    mean {report.mean_distortion * 100:.1f}%, worst {report.worst_distortion * 100:.1f}% "
        f"({report.worst_key}) [{kind}, resize: {report.resize}]",
        f"upscaled      {report.upscaled} image(s) smaller than their bucket"
        + (
            f": {', '.join(report.upscaled_files[:listed])}{', ...' if report.upscaled > listed else ''}"
            if report.upscaled
            else ""
        ),
        f"cache size    {human_bytes(report.projected_bytes)} in {report.shards} shard(s) ({model}, {storage_dtype})",
        f"time          ~{human_seconds(report.estimated_gpu_seconds)} of one H100/H200 at 50% MFU "
        "(extract --compile); CPU runs are 100-1000x slower",
    ]
    if report.already_cached is not None:
        lines.append(
            f"cached        {report.already_cached} of the {report.images} already in the cache there "
            "(extract computes only new or changed images; the figures above are for the whole cache)"
        )
    if report.disk_free_bytes is not None:
        lines.append(f"disk          {human_bytes(report.disk_free_bytes)} free under {report.disk_checked_at}")
    lines += [f"WARNING: {w}" for w in report.warnings]
    return "\n".join(lines)
