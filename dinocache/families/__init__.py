"""Model families, one module each (families/<name>.py) plus one line in FAMILIES. Everything
that differs between encoders is asked of a family: which configs and official checkpoints it
loads, its random:<arch> shapes, where its final norm is, how many registers it has, its FLOPs."""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..official import load_official_state_dict
from . import dinov2, dinov3, siglip2
from .base import Family, Shape

FAMILIES: tuple[Family, ...] = (dinov3.FAMILY, dinov2.FAMILY, siglip2.FAMILY)


def architectures() -> dict[str, Family]:
    """random:<arch> name -> its family."""
    return {arch: family for family in FAMILIES for arch in family.architectures}


def family_of_config(config) -> Family | None:
    return next((f for f in FAMILIES if config.model_type in f.model_types), None)


def family_named(name: str) -> Family | None:
    return next((f for f in FAMILIES if f.name == name), None)


def load_official(path: str, dtype: torch.dtype = torch.float32):
    """(transformers model with the weights, its config, its family) from an official .pth, built
    in `dtype`: the file is memory-mapped, so the host never holds a float32 copy of a bf16 model.
    The family whose official layout the tensors have converts them."""
    sd = load_official_state_dict(path)
    family = next((f for f in FAMILIES if f.claims_official(sd)), None)
    if family is None:
        raise ModelLoadError(
            f"{path} does not look like an official DINOv3 or DINOv2 ViT checkpoint",
            "ConvNeXt checkpoints are not supported; pass a ViT .pth",
        )
    model, config = family.official_model(str(path), sd, dtype)
    return model, config, family


def family_of_record(model: dict) -> str:
    """The family a manifest's model section names (none: DINOv3, the records before families)."""
    return model.get("family", dinov3.FAMILY.name)


__all__ = [
    "FAMILIES",
    "Family",
    "Shape",
    "architectures",
    "family_named",
    "family_of_config",
    "family_of_record",
    "load_official",
]
