"""The statistics file: what `dinocache norm-stats` writes into a cache (a safetensors file in
stats/, named by the manifest), its one check, and loading it for `normalize`. Below the reader
(which applies it) and norm-stats (which computes it); verify and stats read it too.

A statistics entry records the sample table it was computed from: when the cache changes it is
stale (`is_fresh`, the one rule).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CacheError
from .fileio import atomic_write_bytes, is_link, read_limited
from .location import CacheLocation
from .lock import CacheLock
from .manifest import STATS_DIR, cache_path, delete_owned, read_manifest, write_manifest
from .stfile import SafetensorsError, SafetensorsFile

NORMALIZE_EPS = 1e-6  # (x - mean) / sqrt(var + eps) on read, unless a recipe's eps is recorded


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


def store_statistics(root: Path, result: StatsResult, table_sha: str) -> None:
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
    if CacheLocation(name).is_remote:  # norm-stats needs a local cache
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
