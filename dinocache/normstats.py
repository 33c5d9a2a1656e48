"""`dinocache norm-stats`: per-channel (or per-position) dataset statistics of the cached
tokens, in one streaming pass, stored in the cache, and exported in the shapes RAE and SVG load.

    mean, var   over every patch token of every live sample (and, separately, over CLS), for a
                flavour (normed / ln_noaffine / prenorm) and the views chosen (plain, flip, both)

Accumulated in float64 with Chan's parallel merge of per-chunk (count, mean, M2), so shards,
chunks and ranks combine exactly like one pass; variance is the population variance (numpy's
default, ddof=0). Only live rows count (a superseded row is skipped). The file records the
sample table it was computed from; when the cache changes it is stale, and verify, stats and
FeatureCache(normalize=True) say so.

The exports are what each recipe's own loading code reads, unchanged (checked against the
recipes' code; tests/test_recipe_statistics.py runs their loading lines):
    rae   torch.save {"mean", "var"}, per position [C, H, W] (bytetriper/RAE@a4d18c4,
          src/calculate_stat.py:337-341; read by src/stage1/rae.py:70-74, applied as
          (z - mean) / sqrt(var + 1e-5) at rae.py:91-94)
    svg   torch.save {"dinov3_sp_mean", "dinov3_sp_std"} [1, 1, C] (shiml20/SVG@fd69855,
          train_svg.py:72-74, applied as (x - mean) / std at train_svg.py:105)
    json  the lists, the counts, the views and the eps
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from .errors import CacheError, ConfigError
from .flavours import FLAVOURS
from .layout import Layout
from .location import CacheLocation
from .lock import CacheLock
from .manifest import read_manifest, write_manifest
from .names import statistics_name
from .reader import FeatureCache
from .statsfile import (
    NORMALIZE_EPS,
    StatsResult,
    is_fresh,
    load_statistics,
    read_statistics_file,
    recorded_eps,
    store_statistics,
)

VIEWS = ("plain", "flip", "both")
STYLES = ("rae", "svg", "json")
# What normalize=True applies for statistics made for a recipe: RAE's eps (rae.py:32, 94); SVG
# divides by the std itself (train_svg.py:105).
STYLE_EPS = {"rae": 1e-5, "svg": 0.0, "json": NORMALIZE_EPS}
# RAE's calculate_stat.py makes per-position statistics ([C, H, W]); SVG's are per channel.
STYLE_PER_POSITION = {"rae": True, "svg": False, "json": False}
TORCH_SUFFIXES = (".pt", ".pth")
CHUNK_BYTES = 64 * 1024 * 1024  # float64 working set per chunk


class Moments:
    """Running count, mean and M2 (sum of squared deviations) over a leading axis, float64.
    `add` takes a batch [n, *shape]; `merge` combines two (Chan et al.), so any split of the
    data gives the same result as one pass, up to rounding."""

    def __init__(self, shape: tuple[int, ...]):
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        x = x.double()
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        self._combine(n, mean, m2)

    def merge(self, other: "Moments") -> None:
        if other.count:
            self._combine(other.count, other.mean, other.m2)

    def _combine(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(1, self.count)


def _views_of(layout: Layout, views: str) -> tuple[str, ...]:
    if views not in VIEWS:
        raise ConfigError(f"unknown --views {views!r}", f"use one of {', '.join(VIEWS)}")
    if views != "plain" and not layout.flip:
        if views == "flip":
            raise ConfigError("this cache holds no flipped view", "extract with --flip, or use --views plain")
        return ("",)
    return {"plain": ("",), "flip": ("_flip",), "both": ("", "_flip")}[views]


def compute_statistics(
    root: str | Path,
    flavour: str = "normed",
    views: str = "both",
    per_position: bool = False,
    progress: bool = False,
    eps: float = NORMALIZE_EPS,
) -> StatsResult:
    """One streaming pass over the live rows of every shard; writes the statistics into the
    cache (stats/, named by the manifest) and returns them."""
    require_local(root)
    root = Path(root)
    if flavour not in FLAVOURS:
        raise ConfigError(f"unknown flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    cache = FeatureCache(root, flavour=flavour)
    if len(cache) == 0:
        raise CacheError(
            f"{root} holds no samples: there is nothing to compute statistics over",
            "extract some images first (`dinocache stats` says what the cache holds)",
        )
    wanted = _views_of(cache.layout, views)
    grid = _one_grid(cache, per_position)
    dim = cache.hidden_size
    patches, cls = _moments(cache, wanted, grid if per_position else None, progress)
    tensors = {"patches_mean": patches.mean, "patches_var": patches.var, "cls_mean": cls.mean, "cls_var": cls.var}
    if per_position:
        tensors = {k: v.reshape(grid[0], grid[1], dim) if k.startswith("patches") else v for k, v in tensors.items()}
    samples = len(cache)
    kind = "position" if per_position else "channel"
    file = statistics_name(flavour, kind, uuid.uuid4().hex[:12])
    patch_tokens = patches.count * (grid[0] * grid[1] if per_position else 1)
    result = StatsResult(file, flavour, views, per_position, samples, patch_tokens, tensors, eps)
    store_statistics(root, result, cache.manifest["samples"]["sha256"])
    return result


def _one_grid(cache: FeatureCache, per_position: bool) -> tuple[int, int]:
    """The stored grid of the cache's samples (per-position statistics need exactly one)."""
    grids = {tuple(cache.buckets[b]["stored_grid"]) for b in np.unique(cache.bucket_indices()).tolist()}
    if per_position and len(grids) > 1:
        raise ConfigError(
            f"per-position statistics (--per-position; RAE's [C, H, W], the --style rae default) need one "
            f"grid, and this cache has {len(grids)} ({', '.join(f'{r}x{c}' for r, c in sorted(grids))})",
            "pass --per-channel (statistics per channel: [C, 1, 1] for RAE), or extract into one bucket",
        )
    return next(iter(grids)) if grids else (1, 1)


def _moments(
    cache: FeatureCache, wanted: tuple[str, ...], grid: tuple[int, int] | None, progress: bool
) -> tuple[Moments, Moments]:
    """Patch and CLS moments over the wanted views of every live row; per position of `grid`
    when one is given, else per channel."""
    from tqdm import tqdm

    dim, summary = cache.hidden_size, cache.layout.summary  # a SigLIP cache's cls_* hold its pooled feature's
    patches, cls = Moments((grid[0] * grid[1], dim) if grid else (dim,)), Moments((dim,))
    shards = cache.iter_shard_rows(
        wanted, {summary, "patches"}, lambda g: max(1, CHUNK_BYTES // (8 * (g[0] * g[1] + 1) * dim))
    )
    total = len(np.unique(cache.shard_indices()))
    for shard_grid, chunks in tqdm(shards, total=total, desc="norm-stats", unit="shard", disable=not progress):
        tokens = shard_grid[0] * shard_grid[1]
        for batch in chunks:
            for view in wanted:
                p = batch["patches" + view].reshape(-1, tokens, dim)
                patches.add(p if grid else p.reshape(-1, dim))
                cls.add(batch[summary + view])
    return patches, cls


def check_export_target(output: Path, style: str) -> None:
    """--style and --export are checked before any statistics are computed."""
    if style not in STYLES:
        raise ConfigError(f"unknown --style {style!r}", f"use one of {', '.join(STYLES)}")
    if output.is_dir() or not output.parent.is_dir():
        raise ConfigError(
            f"cannot write {output}: "
            + ("it is a folder" if output.is_dir() else f"the folder {output.parent} does not exist"),
            "pass --export with a file path in an existing folder, e.g. stat.pt",
        )
    if style in ("rae", "svg") and output.suffix not in TORCH_SUFFIXES:
        name = {"rae": "stat.pt", "svg": "dinov3_sp_stats.pt"}[style]
        raise ConfigError(
            f"--style {style}{' (the default)' if style == 'rae' else ''} writes what {style.upper()}'s code "
            f"reads with torch.load, and {output.name} does not end in .pt",
            f"name the export like the recipe does, e.g. --export {output.with_name(name)}; "
            "for the numbers as JSON, pass --style json",
        )
    if style == "json" and output.suffix != ".json":
        raise ConfigError(
            f"--style json writes JSON, and {output.name} does not end in .json",
            f"pass --export {output.with_suffix('.json')}, or --style rae / svg for a torch.load file",
        )


def resolve_style_defaults(style: str | None, per_position: bool | None, eps: float | None) -> tuple[bool, float]:
    """--per-position and --eps as given, else the recipe's own for --style (RAE: per position,
    eps 1e-5; SVG: per channel, no eps), else per channel and 1e-6."""
    style_known = style in STYLES
    if per_position is None:
        per_position = STYLE_PER_POSITION[style] if style_known else False
    if eps is None:
        eps = STYLE_EPS[style] if style_known else NORMALIZE_EPS
    if style == "svg" and per_position:
        raise ConfigError("SVG's statistics are per channel ([1, 1, C])", "export without --per-position")
    if not (eps >= 0 and eps < 1):  # NaN fails both
        raise ConfigError(
            f"--eps {eps} must be a number in [0, 1)", "e.g. --eps 1e-5 (RAE's), or 0 (SVG divides by std)"
        )
    return per_position, eps


def export_statistics(
    root: str | Path,
    output: str | Path,
    style: str,
    flavour: str = "normed",
    per_position: bool = False,
    views: str | None = None,
) -> Path:
    """Write the cache's statistics (over `views`; None: both views where stored) as a recipe's
    code loads them:
    rae   torch.save {"mean", "var"}: [C, H, W] per position, [C, 1, 1] per channel, float32
    svg   torch.save {"dinov3_sp_mean", "dinov3_sp_std"}: [1, 1, C], float32, std = sqrt(var)
    json  the lists, the counts, the views and the eps
    """
    require_local(root)
    root, output = Path(root), Path(output)
    check_export_target(output, style)
    manifest = read_manifest(root)
    stats = load_statistics(root, manifest, flavour, per_position, views)
    t = stats.tensors
    mean, var = t["patches_mean"].float(), t["patches_var"].float()
    if style == "rae":
        if per_position:
            out = {"mean": mean.permute(2, 0, 1).contiguous(), "var": var.permute(2, 0, 1).contiguous()}
        else:
            out = {"mean": mean.view(-1, 1, 1).contiguous(), "var": var.view(-1, 1, 1).contiguous()}
        _save_tensors(out, output)
    elif style == "svg":
        if per_position:
            raise ConfigError("SVG's statistics are per channel", "export without --per-position")
        std = t["patches_var"].sqrt().float()  # the square root in float64, then rounded once
        _save_tensors(
            {"dinov3_sp_mean": mean.view(1, 1, -1).contiguous(), "dinov3_sp_std": std.view(1, 1, -1).contiguous()},
            output,
        )
    else:
        doc = {
            "flavour": flavour,
            "views": stats.entry.get("views"),
            "per_position": per_position,
            "samples": stats.entry.get("samples"),
            "variance": "population (ddof=0)",
            "eps": stats.eps,
            "patches": {"mean": t["patches_mean"].tolist(), "var": t["patches_var"].tolist()},
            "cls": {"mean": t["cls_mean"].tolist(), "var": t["cls_var"].tolist()},
        }
        try:
            output.write_text(json.dumps(doc))
        except OSError as exc:
            raise ConfigError(f"cannot write {output}: {exc.strerror}", "pass a writable --export path") from None
    return output


def fresh_statistics(manifest: dict, flavour: str, views: str, per_position: bool) -> dict | None:
    """The manifest's statistics entry for these settings that covers the current sample table."""
    fresh = [
        e
        for e in manifest.get("statistics", [])
        if e.get("flavour") == flavour
        and e.get("views") == views
        and bool(e.get("per_position")) == per_position
        and is_fresh(e, manifest["samples"]["sha256"])
    ]
    return fresh[0] if fresh else None


def set_recorded_eps(root: str | Path, file: str, eps: float) -> None:
    """Record another eps for stored statistics (no recomputation: eps is applied on read)."""
    root = Path(root)
    with CacheLock(root):
        manifest = read_manifest(root)
        for entry in manifest.get("statistics", []):
            if entry.get("file") == file:
                entry["eps"] = eps
        write_manifest(root, manifest)


def require_local(root) -> None:
    if CacheLocation(root).is_remote:
        raise ConfigError(
            f"{root}: norm-stats works on a cache on this machine's filesystem",
            "copy the cache here first (e.g. `aws s3 sync`), run norm-stats, then copy stats/ and manifest.json back",
        )


def _save_tensors(tensors: dict[str, torch.Tensor], output: Path) -> None:
    from .fileio import file_mode

    try:
        torch.save(tensors, output)  # plain tensors only: loads with torch.load(weights_only=True)
        os.chmod(output, file_mode())
    except Exception as exc:  # safetensors and torch wrap OSError in their own exception types
        raise ConfigError(
            f"cannot write {output}: {str(exc).splitlines()[0]}", "pass --export with a writable file path"
        ) from None


# The statistics file's own functions (statsfile.py) are named here too, for norm-stats' callers.
__all__ = [
    "Moments",
    "compute_statistics",
    "export_statistics",
    "load_statistics",
    "is_fresh",
    "read_statistics_file",
    "recorded_eps",
]
