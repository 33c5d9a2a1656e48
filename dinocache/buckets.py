"""Aspect buckets: the bucket table, nearest-aspect assignment and the per-image transform.

Pure functions only: no I/O, no torch. Sizes are (width, height) everywhere, as in the
config file, because that is how DiT trainers (kohya, SimpleTuner) write them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RESIZE_MODES = ("stretch", "crop", "adm")
MIN_SIDE = 16  # one DINOv3 patch
MAX_SIDE = 8192  # 512 patches a side; larger buckets are a typo (an 8192x8192 bucket is 262k tokens)
DIT_TOKEN_PIXELS = 16  # an f8 VAE with patch size 2 (or f16 with patch 1): one DiT token per 16 px


def round_to_patch(side: int, patch_size: int) -> int:
    """Nearest multiple of `patch_size`, halves rounded up, never below one patch.

    DINOv3 floors its input to multiples of the patch size without a word, so the trainer's
    bucket side (e.g. 210) is rounded here to the nearest multiple (208) and both are recorded.
    """
    return max(patch_size, int(math.floor(side / patch_size + 0.5)) * patch_size)


@dataclass(frozen=True)
class Bucket:
    """One aspect bucket: the trainer's size and the model input size it maps to."""

    index: int
    width: int  # the DiT trainer's bucket size (VAE side), as written in the config
    height: int
    input_width: int  # what DINOv3 sees: each side rounded to a multiple of the patch size
    input_height: int
    patch_size: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid as (rows, cols) = (input_height / patch, input_width / patch)."""
        return self.input_height // self.patch_size, self.input_width // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)

    def to_record(self, pool: int = 1) -> dict:
        """The manifest's bucket record; `stored_grid` is the grid after --pool."""
        rows, cols = self.grid
        return {
            "index": self.index,
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "input_width": self.input_width,
            "input_height": self.input_height,
            "grid": [rows, cols],
            "stored_grid": [-(-rows // pool), -(-cols // pool)],
        }


def input_side(side: int, patch_size: int, token_pixels: int | None = None) -> int:
    """The model's input side for a bucket side: rounded to the patch size, or, with
    `token_pixels`, scaled so that the patch grid equals the DiT's token grid (one patch per
    `token_pixels` pixels: a /14 encoder sees a 256-px side, 16 DiT tokens of 16 px, as 224 px)."""
    if token_pixels is None:
        return round_to_patch(side, patch_size)
    return max(1, int(math.floor(side / token_pixels + 0.5))) * patch_size


def make_buckets(sizes: list[tuple[int, int]], patch_size: int, token_pixels: int | None = None) -> list[Bucket]:
    """Bucket table from (width, height) pairs, in the order given."""
    return [
        Bucket(i, w, h, input_side(w, patch_size, token_pixels), input_side(h, patch_size, token_pixels), patch_size)
        for i, (w, h) in enumerate(sizes)
    ]


def resolve_token_pixels(option: int | None, patch_size: int) -> int | None:
    """--token-pixels as given (0: off), else 16 for an encoder whose patch is not 16 pixels (an
    f8 VAE with patch 2 makes one DiT token per 16 pixels); None when it changes nothing."""
    if option is None:
        option = DIT_TOKEN_PIXELS if patch_size != DIT_TOKEN_PIXELS else 0
    return None if option in (0, patch_size) else option


def generate_sizes(
    resolution: int, step: int = 64, min_side: int = 256, max_side: int = 2048, max_aspect: float = 2.0
) -> list[tuple[int, int]]:
    """kohya-style buckets: every width on the `step` grid, height the largest step multiple
    keeping the area at or below resolution**2, and the same pair transposed; deduplicated and
    sorted by aspect ratio (tallest first)."""
    area = resolution * resolution
    sizes: set[tuple[int, int]] = set()
    top = max_side // step * step  # every side on the step grid, the limits included
    width = -(-min_side // step) * step
    while width <= top:
        height = min(top, (area // width) // step * step)
        if height >= min_side and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    square = min(top, resolution // step * step)
    if square >= min_side:
        sizes.add((square, square))
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest in log space; ties go to the lower index."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(b.log_aspect - target), b.index))


@dataclass(frozen=True)
class AdmSteps:
    """guided-diffusion's `center_crop_arr` for a target of (width, height): `halvings` BOX
    halvings of the whole image, a BICUBIC resize of the whole image to `resized`, then the
    target cut out at `offset` (left, top)."""

    halvings: int
    resized: tuple[int, int]
    offset: tuple[int, int]


def adm_steps(width: int, height: int, target: tuple[int, int]) -> AdmSteps:
    """The geometry of ADM's centre crop (openai/guided-diffusion, image_datasets.py:126-143,
    copied by REPA, RAE's calculate_stat.py and SVG's utils.py), for any target size: halve
    while both sides stay at least twice the target's (for a square target: `min(size) >= 2 *
    image_size`), scale so the image covers the target (`image_size / min(size)`), crop centred
    with floor offsets. The same float expressions as the original, so the rounding agrees."""
    tw, th = target
    w, h, halvings = width, height, 0
    while w >= 2 * tw and h >= 2 * th:
        w, h, halvings = w // 2, h // 2, halvings + 1
    scale = max(tw / w, th / h)
    rw, rh = (round(w * scale), round(h * scale))
    return AdmSteps(halvings, (rw, rh), ((rw - tw) // 2, (rh - th) // 2))


def crop_box(width: int, height: int, bucket: Bucket, mode: str) -> tuple[int, int, int, int]:
    """The region of the (EXIF-upright) source that is resized to the bucket: (left, top, right, bottom).

    `stretch` keeps the whole image (a slight aspect change, no pixel lost); `crop` takes the
    largest centred box with the bucket's aspect, as a "cover + centre crop" trainer does; `adm`
    is ADM's centre crop (`adm_steps`), whose box is the region its crop covers in the source,
    recorded for `crops` and `show` (its pixels come from `imaging.adm_center_crop`, not the box).
    """
    if mode == "stretch":
        return (0, 0, width, height)
    if mode == "adm":
        steps = adm_steps(width, height, (bucket.width, bucket.height))
        (rw, rh), (left, top) = steps.resized, steps.offset
        return (
            round(left * width / rw),
            round(top * height / rh),
            min(width, round((left + bucket.width) * width / rw)),
            min(height, round((top + bucket.height) * height / rh)),
        )
    if mode != "crop":
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    bucket_aspect = bucket.width / bucket.height
    if width / height > bucket_aspect:  # too wide: trim left and right
        new_w = max(1, min(width, round(height * bucket_aspect)))
        left = (width - new_w) // 2
        return (left, 0, left + new_w, height)
    new_h = max(1, min(height, round(width / bucket_aspect)))
    top = (height - new_h) // 2
    return (0, top, width, top + new_h)
