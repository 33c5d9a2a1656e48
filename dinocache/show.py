"""`dinocache show`: a cached image beside an RGB picture of its features.

The first three principal components of the patch tokens (computed over this image's grid),
each stretched to [0, 1] between its 2nd and 98th percentile, become red, green and blue; the
grid is upsampled to the picture's size so patch (r, c) sits over the pixels it describes.
PIL only (no matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import CacheError, DecodeError
from .imaging import decode_image
from .reader import FeatureCache

DISPLAY_HEIGHT = 512
GAP = 8


def pca_rgb(patches: torch.Tensor) -> np.ndarray:
    """[rows, cols, D] -> [rows, cols, 3] uint8: the top-3 principal components as colours."""
    rows, cols, dim = patches.shape
    x = patches.reshape(-1, dim).float()
    x = x - x.mean(0, keepdim=True)
    if x.shape[0] < 2:
        return np.full((rows, cols, 3), 128, np.uint8)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = x @ v[:3].T  # [rows*cols, <=3]
    if comps.shape[1] < 3:
        comps = torch.cat([comps, torch.zeros(comps.shape[0], 3 - comps.shape[1])], 1)
    lo, hi = torch.quantile(comps, 0.02, dim=0), torch.quantile(comps, 0.98, dim=0)
    scaled = ((comps - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (scaled.reshape(rows, cols, 3).numpy() * 255).round().astype(np.uint8)


def render(cache_dir: str | Path, key: str, source_dir: str | Path | None = None) -> Image.Image:
    cache = FeatureCache(cache_dir)
    if key not in cache:
        raise CacheError(f"{key!r} is not in the cache at {cache_dir}", "run `dinocache stats --json` to list keys")
    record, item = cache.record(key), cache[key]
    source_dir = Path(source_dir) if source_dir else _recorded_source(cache)
    try:
        pixels = decode_image(str(source_dir / key), 2**62)
    except DecodeError as exc:
        raise CacheError(f"cannot read the source image {source_dir / key}: {exc.detail}",
                         "pass --source with the folder the cache was extracted from") from None
    left, top, right, bottom = record["box"]
    region = pixels[:, top:bottom, left:right]
    bucket = cache.manifest["buckets"][record["bucket"]]
    width = max(1, round(DISPLAY_HEIGHT * bucket["input_width"] / bucket["input_height"]))
    picture = Image.fromarray((region.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
        (width, DISPLAY_HEIGHT), Image.Resampling.BILINEAR)
    features = Image.fromarray(pca_rgb(item["patches"])).resize((width, DISPLAY_HEIGHT), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (2 * width + GAP, DISPLAY_HEIGHT), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(features, (width + GAP, 0))
    return canvas


def _recorded_source(cache: FeatureCache) -> Path:
    for run in reversed(cache.manifest.get("runs", [])):
        if isinstance(run, dict) and isinstance(run.get("input_dir"), str):
            return Path(run["input_dir"])
    raise CacheError("this cache does not record where its images came from", "pass --source DIR")
