"""`dinocache show`: a cached image beside an RGB picture of its features.

The picture is what the model saw (decoded, cropped and resized by the same code path as
extract, then un-normalised). The first three principal components of the patch tokens
(computed over this image's grid), each stretched to [0, 1] between its 2nd and 98th
percentile, become red, green and blue; the grid is upsampled to the picture's size so patch
(r, c) sits over the pixels it describes. PIL only (no matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import CacheError, DecodeError, untrusted
from .imaging import Preprocessing, model_input
from .manifest import implicit_source
from .reader import FeatureCache
from .sources import SourceReader

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


def render(
    cache_dir: str | Path, key: str, source_dir: str | Path | None = None, follow_symlinks: bool = False
) -> Image.Image:
    cache = FeatureCache(cache_dir)
    if key not in cache:
        raise CacheError(_not_cached(cache, key), f"list the keys with `dinocache keys {cache_dir}`")
    record, item = cache.record(key), cache[key]
    source_dir = str(source_dir) if source_dir else _recorded_source(cache)
    prep = Preprocessing.from_record(cache.manifest["preprocessing"])
    bucket = cache.manifest["buckets"][record["bucket"]]
    size = (bucket["input_width"], bucket["input_height"])
    try:
        data = SourceReader(source_dir, follow_symlinks).read(key, tuple(record["source_size"]))
        pixels = model_input(
            data,
            tuple(record["source_size"]),
            tuple(record["box"]),
            size,
            prep,
            1 << 62,
            bucket_size=(bucket["width"], bucket["height"]),
        )
    except DecodeError as exc:
        raise CacheError(
            f"cannot read the source image {key} of {source_dir}: {exc.detail}",
            "pass --source with the folder the cache was extracted from",
        ) from None
    mean = torch.tensor(prep.image_mean).view(3, 1, 1)
    std = torch.tensor(prep.image_std).view(3, 1, 1)
    seen = (pixels * std + mean).clamp(0, 1)
    width = max(1, round(DISPLAY_HEIGHT * size[0] / size[1]))
    picture = Image.fromarray((seen.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
        (width, DISPLAY_HEIGHT), Image.Resampling.BILINEAR
    )
    features = Image.fromarray(pca_rgb(item["patches"])).resize((width, DISPLAY_HEIGHT), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (2 * width + GAP, DISPLAY_HEIGHT), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(features, (width + GAP, 0))
    return canvas


def _not_cached(cache: FeatureCache, key: str) -> str:
    failure = next((f for f in cache.manifest["failures"] if f["key"] == key), None)
    if failure is not None:
        reason, detail = untrusted(failure["reason"], 40), untrusted(failure.get("detail", ""))
        return f"{key!r} could not be extracted: {reason} ({detail})"
    message = f"{key!r} is not in the cache at {cache.root} (keys are paths relative to the input folder)"
    close = cache.close_keys(key)
    if close:
        message += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return message


def _recorded_source(cache: FeatureCache) -> str:
    return implicit_source(cache.manifest)
