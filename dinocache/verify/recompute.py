"""--recompute: re-extract random samples through the same decode path and layout as extract
(JPEG draft, flip, layers, pool included) and compare every stored feature, token by token."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

from ..errors import DecodeError
from ..layout import Layout
from .report import VerifyOptions, VerifyReport

RECOMPUTE_MIN_COSINE = 0.995  # per token, stored vs recomputed (bf16 round trips give > 0.999)


def recompute(root: Path, table, manifest: dict, report: VerifyReport, options: VerifyOptions) -> None:
    """Re-extract `options.recompute` random samples of the table from `options.source`."""
    from ..features import stored_features
    from ..reader import FeatureCache
    from ..sources import SourceReader

    again = _Recomputer(manifest, options.device)
    cache = FeatureCache(
        root, flavour=again.layout.normed_values
    )  # the stored values, as stored_features computes them
    reader = SourceReader(str(options.source), options.follow_symlinks)
    picks = sorted(random.Random(options.seed).sample(range(len(table)), min(options.recompute, len(table))))
    for i in picks:
        record = table.record(i)
        key = record["key"]
        try:
            data = reader.read(key, tuple(record["source_size"]))
        except DecodeError as exc:
            report.add("recompute", f"{key}: cannot recompute, {exc.detail}", key=key)
            continue
        if hashlib.sha256(data).hexdigest() != record["source_sha256"]:
            report.add("recompute", f"{key}: cannot recompute, the source file's content changed", key=key)
            continue
        try:
            pixels, bucket = again.pixels(data, record)
        except DecodeError as exc:
            report.add("recompute", f"{key}: cannot recompute, {exc.detail}", key=key)
            continue
        fresh = stored_features(again.loaded, pixels[None], bucket.grid, again.layout)
        worst = _worst_cosine(fresh, cache[i])
        if worst < RECOMPUTE_MIN_COSINE:
            report.add(
                "recompute",
                f"{key}: recomputed features differ from the stored ones (worst token cosine "
                f"{worst:.4f} < {RECOMPUTE_MIN_COSINE}): preprocessing, model or data drift",
                key=key,
            )
        report.recomputed += 1


class _Recomputer:
    """The model, preprocessing and layout a cache was built with, loaded once."""

    def __init__(self, manifest: dict, device: str):
        from ..imaging import Preprocessing
        from ..model import load_model

        self.manifest = manifest
        self.model = manifest["model"]
        self.prep = Preprocessing.from_record(manifest["preprocessing"])
        self.layout = Layout.from_record(manifest["storage"])
        self.loaded = load_model(
            self.model["id"],
            self.model.get("revision"),
            device,
            self.model.get("compute_dtype", "float32"),
            self.prep.image_mean,
            self.prep.image_std,
            pos_embed_interpolation=self.model.get("pos_embed_interpolation"),  # a preset's (VA-VAE: timm's)
        )

    def pixels(self, data: bytes, record: dict):
        """(the model's input, the bucket) of one sample, through extract's decode path (DecodeError)."""
        from ..buckets import Bucket
        from ..imaging import model_input

        b = self.manifest["buckets"][record["bucket"]]
        bucket = Bucket(
            b["index"], b["width"], b["height"], b["input_width"], b["input_height"], self.model["patch_size"]
        )
        pixels = model_input(
            data,
            tuple(record["source_size"]),
            tuple(record["box"]),
            (bucket.input_width, bucket.input_height),
            self.prep,
            1 << 62,
            bucket_size=(bucket.width, bucket.height),
        )
        return pixels, bucket


def _worst_cosine(fresh: dict, stored: dict) -> float:
    worst = 1.0
    for name, value in fresh.items():
        if name.endswith("_lnstats"):
            continue
        got = stored[name].reshape(value[0].shape)
        worst = min(worst, float(_cosine(got, value[0]).min()))
    return worst


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)
