"""Model families, one module each (families/<name>.py) plus one line in FAMILIES. Everything
that differs between encoders is asked of a family: which configs and official checkpoints it
loads, its random:<arch> shapes, where its final norm is, how many registers it has, its FLOPs."""

from __future__ import annotations

from . import dinov2, dinov3
from .base import Family, Shape

FAMILIES: tuple[Family, ...] = (dinov3.FAMILY, dinov2.FAMILY)


def architectures() -> dict[str, Family]:
    """random:<arch> name -> its family."""
    return {arch: family for family in FAMILIES for arch in family.architectures}


def family_of_config(config) -> Family | None:
    return next((f for f in FAMILIES if config.model_type in f.model_types), None)


def family_named(name: str) -> Family | None:
    return next((f for f in FAMILIES if f.name == name), None)


def family_of_record(model: dict) -> str:
    """The family a manifest's model section names (none: DINOv3, the records before families)."""
    return model.get("family", dinov3.FAMILY.name)


__all__ = ["FAMILIES", "Family", "Shape", "architectures", "family_named", "family_of_config", "family_of_record"]
