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

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CacheError, ConfigError
from .fileio import atomic_write_bytes, is_link
from .flavours import FLAVOURS
from .layout import Layout
from .lock import CacheLock
from .manifest import STATS_DIR, cache_path, delete_owned, read_manifest, write_manifest
from .names import statistics_name
from .stfile import SafetensorsFile

VIEWS = ("plain", "flip", "both")
STYLES = ("rae", "svg", "json")
NORMALIZE_EPS = 1e-6  # (x - mean) / sqrt(var + eps) on read, unless a recipe's eps is recorded
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


@dataclass
class StatsResult:
    file: str
    flavour: str
    views: str
    per_position: bool
    samples: int
    patch_tokens: int
    tensors: dict[str, torch.Tensor]
    eps: float = NORMALIZE_EPS


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
    from .reader import FeatureCache

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
    layout = cache.layout
    wanted = _views_of(layout, views)
    grids = {tuple(cache.buckets[b]["stored_grid"]) for b in np.unique(cache.bucket_indices()).tolist()}
    if per_position and len(grids) > 1:
        raise ConfigError(
            f"per-position statistics (--per-position; RAE's [C, H, W], the --style rae default) need one "
            f"grid, and this cache has {len(grids)} ({', '.join(f'{r}x{c}' for r, c in sorted(grids))})",
            "pass --per-channel (statistics per channel: [C, 1, 1] for RAE), or extract into one bucket",
        )
    dim = cache.hidden_size
    grid = next(iter(grids)) if grids else (1, 1)
    patch_shape = (grid[0] * grid[1], dim) if per_position else (dim,)
    patches, cls = Moments(patch_shape), Moments((dim,))
    shard_col, row_col = np.asarray(cache.shard_indices()), np.asarray(cache.table.columns["row"])
    order = np.argsort(shard_col, kind="stable")
    bounds = np.flatnonzero(np.diff(shard_col[order])) + 1
    from tqdm import tqdm

    groups = np.split(order, bounds) if len(order) else []
    for members in tqdm(groups, desc="norm-stats", unit="shard", disable=not progress):
        shard_index = int(shard_col[members[0]])
        rows = np.sort(row_col[members].astype(np.int64))
        shard = cache._handle(shard_index)
        tokens = shard.grid[0] * shard.grid[1]
        per_chunk = max(1, CHUNK_BYTES // (8 * (tokens + 1) * dim))
        for start in range(0, len(rows), per_chunk):
            chunk = rows[start : start + per_chunk]
            batch = cache._read(shard, shard_index, chunk, set(wanted), only={layout.summary, "patches"})
            for view in wanted:
                p = batch["patches" + view].reshape(len(chunk), tokens, dim)
                patches.add(p if per_position else p.reshape(-1, dim))
                cls.add(batch[layout.summary + view])  # a SigLIP cache's cls_* hold its pooled feature's
    tensors = {"patches_mean": patches.mean, "patches_var": patches.var, "cls_mean": cls.mean, "cls_var": cls.var}
    if per_position:
        tensors = {k: v.reshape(grid[0], grid[1], dim) if k.startswith("patches") else v for k, v in tensors.items()}
    samples = len(cache)
    kind = "position" if per_position else "channel"
    file = statistics_name(flavour, kind, uuid.uuid4().hex[:12])
    patch_tokens = patches.count * (grid[0] * grid[1] if per_position else 1)
    result = StatsResult(file, flavour, views, per_position, samples, patch_tokens, tensors, eps)
    _store(root, result, cache.manifest["samples"]["sha256"])
    return result


def _store(root: Path, result: StatsResult, table_sha: str) -> None:
    """Write the statistics file, then record it in the manifest, under the cache's lock; an
    older entry for the same flavour, views and kind is replaced (and its file deleted)."""
    from safetensors.torch import save

    metadata = {
        "format": "dinocache-statistics",
        "flavour": result.flavour,
        "views": result.views,
        "per_position": str(result.per_position).lower(),
        "samples": str(result.samples),
        "patch_tokens": str(result.patch_tokens),
        "samples_sha256": table_sha,
        "variance": "population (ddof=0)",
        "dtype": "float64",
        "eps": repr(result.eps),
    }
    data = save({k: v.contiguous() for k, v in result.tensors.items()}, metadata=metadata)
    with CacheLock(root):
        manifest = read_manifest(root)
        if manifest["samples"]["sha256"] != table_sha:
            raise CacheError("the cache changed while its statistics were computed", "run norm-stats again")
        folder = root / STATS_DIR
        if is_link(folder):
            raise CacheError(f"{folder} is a symbolic link", "replace it with a real folder")
        folder.mkdir(exist_ok=True)
        atomic_write_bytes(root / result.file, data)
        kept, replaced = [], []
        for entry in manifest.get("statistics", []):
            same = (entry.get("flavour"), entry.get("views"), entry.get("per_position")) == (
                result.flavour,
                result.views,
                result.per_position,
            )
            (replaced if same else kept).append(entry)
        kept.append(
            {
                "file": result.file,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "flavour": result.flavour,
                "views": result.views,
                "per_position": result.per_position,
                "samples": result.samples,
                "samples_sha256": table_sha,
                "eps": result.eps,
            }
        )
        manifest["statistics"] = kept
        write_manifest(root, manifest)
        for entry in replaced:
            delete_owned(root, entry["file"])


@dataclass
class Statistics:
    """Loaded statistics, applied on read: (x - mean) / sqrt(var + eps), eps as recorded by
    norm-stats (a recipe's own: 1e-5 for RAE, 0 for SVG) unless the reader overrides it."""

    entry: dict
    tensors: dict[str, torch.Tensor]
    eps: float = NORMALIZE_EPS

    def apply(self, feature, value: torch.Tensor) -> torch.Tensor:
        base = "cls" if feature.name == "cls" else "patches" if feature.name == "patches" else None
        if base is None:
            return value  # registers and layer outputs have no statistics
        mean, var = self.tensors[f"{base}_mean"], self.tensors[f"{base}_var"]
        if base == "patches" and self.entry.get("per_position"):
            mean, var = mean.reshape(-1, mean.shape[-1]), var.reshape(-1, var.shape[-1])
        return ((value.double() - mean) / torch.sqrt(var + self.eps)).float()


def is_fresh(entry: dict, samples_sha256: str) -> bool:
    """Whether a statistics entry covers the cache's current sample table (the one rule for
    stale statistics: extract's note, stats, verify, norm-stats and normalize=True ask it)."""
    return entry.get("samples_sha256") == samples_sha256


def recorded_eps(entry: dict) -> float:
    """The eps normalize applies for a statistics entry (entries before eps was recorded: 1e-6)."""
    eps = entry.get("eps", NORMALIZE_EPS)
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else NORMALIZE_EPS


STATISTICS_TENSORS = ("patches_mean", "patches_var", "cls_mean", "cls_var")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # no feature is larger, so no mean; no variance past its square


def read_statistics_file(root: Path, manifest: dict, entry: dict) -> dict[str, torch.Tensor]:
    """The one check of a statistics file (`verify` and `FeatureCache(normalize=True)` both use
    it), as strict as a shard's: inside the cache, no link, its recorded size and sha256, exactly
    the four float64 tensors, shaped [D] (or [rows, cols, D] per position, a stored grid of the
    cache), and values a dataset can have: finite, |mean| <= float32 max, 0 <= var <= its square.
    CacheError says what is wrong."""
    from .fileio import read_limited
    from .stfile import SafetensorsError

    name = entry["file"]
    fix = f"rerun `dinocache norm-stats --recompute{' --per-position' if entry.get('per_position') else ''}`"
    path = cache_path(root, name, STATS_DIR)
    try:
        data = read_limited(path, entry["bytes"])
    except FileNotFoundError:
        raise CacheError(f"the statistics file {name} is missing", fix) from None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise CacheError(f"cannot read the statistics file {name}: {why}", fix) from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CacheError(f"the statistics file {name} fails its size or sha256 checksum", fix)
    try:
        file = SafetensorsFile(path)
    except SafetensorsError as exc:
        raise CacheError(f"the statistics file {name} is not a safetensors file: {exc}", fix) from None
    problems = []
    if set(file.entries) != set(STATISTICS_TENSORS):
        problems.append(f"it holds {sorted(file.entries)}, not {list(STATISTICS_TENSORS)}")
    meta = file.metadata
    if meta.get("format") != "dinocache-statistics" or meta.get("flavour") != entry.get("flavour"):
        problems.append("its metadata does not say dinocache-statistics of the flavour the manifest names")
    dim = manifest["model"]["hidden_size"]
    grids = {tuple(b.get("stored_grid", b["grid"])) for b in manifest["buckets"]}
    tensors = {}
    for tensor in STATISTICS_TENSORS:
        info = file.entries.get(tensor)
        if info is None:
            continue
        shape = tuple(info.shape)
        per_position = tensor.startswith("patches") and entry.get("per_position")
        if info.dtype != "F64":
            problems.append(f"{tensor} is {info.dtype}, not F64")
        elif shape[-1:] != (dim,) or (shape[:-1] not in grids if per_position else len(shape) != 1):
            wanted = "[rows, cols, D] of a bucket's stored grid" if per_position else f"[{dim}]"
            problems.append(f"{tensor} has shape {list(shape)}, not {wanted}")
        else:
            value = file.tensor(tensor)
            bad = not bool(torch.isfinite(value).all())
            if tensor.endswith("_var"):
                bad = bad or bool((value < 0).any()) or bool((value > FLOAT32_MAX**2).any())
            else:
                bad = bad or bool((value.abs() > FLOAT32_MAX).any())
            if bad:
                kind = "variances (NaN, negative or past float32's square)" if tensor.endswith("_var") else "means"
                problems.append(f"{tensor} holds impossible {kind}")
            tensors[tensor] = value
    if problems:
        raise CacheError(f"the statistics file {name} is not valid: " + "; ".join(problems[:3]), fix)
    return tensors


def load_statistics(
    root: Path,
    manifest: dict,
    flavour: str,
    per_position: bool = False,
    views: str | None = None,
    eps: float | None = None,
    name: str | None = None,
) -> Statistics:
    """The statistics `normalize` applies, checked; `views` None prefers those over both views,
    `eps` None applies the recorded one. `name` is the cache as the user named it (a URL for a
    cache in object storage, whose `root` is the local mirror)."""
    from .sources import is_url

    name = name or str(root)
    entries = [
        e
        for e in manifest.get("statistics", [])
        if e.get("flavour") == flavour
        and bool(e.get("per_position")) == per_position
        and (views is None or e.get("views") == views)
    ]
    kind = "per-position" if per_position else "per-channel"
    flags = f"{' --per-position' if per_position else ''}{f' --views {views}' if views else ''}"
    command = f"dinocache norm-stats {name} --flavour {flavour}{flags}"
    if is_url(name):  # norm-stats needs a local cache
        command = (
            f"copy {name} to this machine, run `{command.replace(name, 'LOCAL_COPY')}`, "
            "then copy its stats/ and manifest.json back"
        )
    else:
        command = f"run `{command}`"
    if not entries:
        other = [
            e
            for e in manifest.get("statistics", [])
            if e.get("flavour") == flavour and bool(e.get("per_position")) != per_position
        ]
        if other and views is None:  # e.g. RAE's per-position statistics, read with normalize=True
            have, use = ("per-position", '"position"') if not per_position else ("per-channel", "True")
            raise CacheError(
                f"{name} has {have} statistics for the {flavour} flavour, not {kind} ones",
                f"read them with normalize={use}, or {command}",
            )
        which = f" over the {views} view(s)" if views else ""
        raise CacheError(f"{name} has no {kind} statistics{which} for the {flavour} flavour", command)
    entry = next((e for e in entries if e.get("views") == "both"), entries[0])
    if not is_fresh(entry, manifest["samples"]["sha256"]):
        raise CacheError(
            f"the {flavour} statistics of {name} are stale: the cache changed since they were computed",
            command.replace("norm-stats", "norm-stats --recompute", 1),
        )
    tensors = read_statistics_file(root, manifest, entry)
    return Statistics(entry, tensors, recorded_eps(entry) if eps is None else float(eps))


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
    from .sources import is_url

    if is_url(str(root)):
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


__all__ = ["Moments", "compute_statistics", "export_statistics", "load_statistics"]
