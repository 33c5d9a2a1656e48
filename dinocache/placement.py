"""Where each image goes: from its upright size (its source probes the header) to its bucket
and crop box. Decided here once, for extract and plan alike, so their counts cannot differ; a --crops
file (the trainer's own crops) overrides the rule per key."""

from __future__ import annotations

from dataclasses import dataclass

from .buckets import Bucket, assign_bucket, crop_box
from .errors import DecodeError
from .sources import SourceFile

BY_RULE, BY_CROPS = 0, 1  # the sample table's `placement` column


@dataclass(frozen=True, slots=True)
class Crop:
    """One line of a --crops file: this key is extracted at `size` from `box`."""

    bucket: int
    box: tuple[int, int, int, int]
    line: int


@dataclass(frozen=True, slots=True)
class Placement:
    bucket: int
    box: tuple[int, int, int, int]
    placement: int = BY_RULE


def place(width: int, height: int, buckets: list[Bucket], resize: str, crop: Crop | None = None) -> Placement:
    """The bucket and crop box for an upright `width` x `height` image: the trainer's crop when
    the crops file lists it, else the nearest-aspect bucket and the config's resize mode."""
    if crop is not None:
        left, top, right, bottom = crop.box
        if right > width or bottom > height:
            raise DecodeError(
                "crop_outside",
                f"the --crops box {list(crop.box)} (line {crop.line}) does not fit the {width}x{height} image",
            )
        return Placement(crop.bucket, crop.box, BY_CROPS)
    bucket = assign_bucket(width, height, buckets)
    return Placement(bucket.index, crop_box(width, height, bucket, resize), BY_RULE)


def probe_source(src: SourceFile, max_pixels: int) -> tuple:
    """("ok", width, height) or ("failed", reason, detail): picklable, for gathering across ranks.
    The item's source reads its header (sources/base.Source.probe)."""
    try:
        return ("ok", *src.source.probe(src, max_pixels))
    except DecodeError as exc:
        return ("failed", exc.reason, exc.detail)
