"""Decode policy and preprocessing: from a file to the normalized tensor DINOv3 sees.

Decoding gets the traps right that naive `Image.convert("RGB")` falls into: EXIF orientation,
16-bit and float modes (convert("RGB") turns a 16-bit PNG ~99.6% white), alpha (composited on a
background colour instead of dropped), palette transparency, CMYK, and decompression bombs
(refused from the header, before any pixel is decoded).

Preprocessing matches transformers' `DINOv3ViTImageProcessor(do_center_crop=False)`: rescale to
[0, 1] -> bilinear antialiased resize -> normalize. Its torchvision resize on tensors is
`torch.nn.functional.interpolate(mode="bilinear", antialias=True)`, which is what we call, so
the core does not need torchvision. `resize: adm` instead reproduces the centre crop of ADM
(guided-diffusion), which REPA, RAE and SVG train with, pixel for pixel: Pillow BOX halvings and
BICUBIC on the 8-bit image, then the crop, then rescale and normalize.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DecodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)
RESAMPLE = "bilinear"
RESAMPLES = ("bilinear", "bicubic")  # F.interpolate modes for the resize to the model's input
ADM_CROP = "guided-diffusion center_crop_arr: PIL BOX halvings, PIL BICUBIC, centre crop"  # resize: adm
RESCALE = "1/255 (16-bit: 1/65535)"
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes the model's input; `record()` is what the manifest stores, so a cache
    never mixes two of these."""

    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "stretch"  # how the crop box is chosen (buckets.crop_box)
    jpeg_draft: bool = False
    background: tuple[int, int, int] = WHITE
    # The resize to the model's input: transformers' processor by default (bilinear, antialiased,
    # after rescaling, before normalizing); a recipe preset may ask for its own (presets.py).
    resample: str = RESAMPLE
    antialias: bool = True
    normalize_first: bool = False
    preset: str | None = None
    token_pixels: int | None = None  # pixels per DiT token, when the encoder's patch differs

    def __post_init__(self):
        from .errors import ConfigError

        if self.resize == "adm" and self.jpeg_draft:
            raise ConfigError(
                "--jpeg-draft changes the pixels that ADM's centre crop (resize: adm) starts from",
                "drop --jpeg-draft: resize: adm reproduces the recipes' pixels from the full-size decode",
            )
        if self.resample not in RESAMPLES:
            raise ConfigError(f"unknown resample {self.resample!r}", f"use one of {', '.join(RESAMPLES)}")

    @property
    def is_processor_resize(self) -> bool:
        """The default resize, which the GPU can run on cropped regions (extract's device path)."""
        return self.resample == RESAMPLE and self.antialias and not self.normalize_first

    def record(self) -> dict:
        """The manifest's `preprocessing` section; fields added after format 2 appear only when
        they differ from what caches before them did, so those caches still match."""
        optional = {
            "crop": ADM_CROP if self.resize == "adm" else None,
            "normalize_before_resize": self.normalize_first or None,
            "preset": self.preset,
            "token_pixels": self.token_pixels,
        }
        return {
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resize": self.resize,
            "resample": self.resample,
            "antialias": self.antialias,
            "rescale": RESCALE,
            "alpha_background": list(self.background),
            "exif_transpose": True,
            "jpeg_draft": self.jpeg_draft,
        } | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_record(cls, prep: dict) -> "Preprocessing":
        return cls(
            tuple(prep["image_mean"]),
            tuple(prep["image_std"]),
            prep.get("resize", "stretch"),
            bool(prep.get("jpeg_draft", False)),
            tuple(prep.get("alpha_background", WHITE)),
            prep.get("resample", RESAMPLE),
            bool(prep.get("antialias", True)),
            bool(prep.get("normalize_before_resize", False)),
            prep.get("preset"),
            prep.get("token_pixels"),
        )


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int):
    """Pillow's own decompression-bomb guard off while we open one image (decode_image checks
    the header against `max_pixels` itself, with a message that names the flag), and restored
    after: a training job that imports dinocache keeps the guard it had."""
    import warnings

    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():  # over the limit is our DecodeError, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_source(path: str) -> bytes:
    """The file's bytes (read once: they are hashed and decoded from memory)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DecodeError("missing", "the file disappeared or is a broken symlink") from None
    except PermissionError:
        raise DecodeError("unreadable", "no permission to read the file") from None
    except OSError as exc:
        raise DecodeError("unreadable", f"{type(exc).__name__}: {exc}") from None


def decode_image(
    source: str | bytes,
    max_pixels: int,
    background: tuple[int, int, int] = WHITE,
    draft_size: tuple[int, int] | None = None,
    keep_uint8: bool = False,
) -> torch.Tensor:
    """Decode the first frame of an image (a path or its bytes), upright, as float32 RGB in [0, 1],
    shape [3, H, W]. Raises DecodeError with a stable reason code for anything unusable.

    `draft_size` (upright width, height) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale
    (its DCT scaling, much cheaper than a full decode) while staying at least that large; the
    result is then smaller than the source and the caller scales its crop box to match.
    `keep_uint8` returns 8-bit sources as uint8 [3, H, W] (4x less to move; the caller divides by
    255), other sources as float as always.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, str):
        source = read_source(source)
    try:
        with pillow_pixel_limit(max_pixels), Image.open(io.BytesIO(source)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    "too_large",
                    f"{width}x{height} = {width * height} pixels is over the limit of "
                    f"{max_pixels} (raise --max-pixels if this image is legitimate)",
                )
            img.seek(0)  # animated GIF/WebP/APNG: the first frame
            if draft_size is not None and img.format == "JPEG":
                transposed = img.getexif().get(0x0112, 1) in _TRANSPOSING_ORIENTATIONS
                img.draft("RGB", tuple(reversed(draft_size)) if transposed else draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, background, keep_uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "Pillow does not recognise this file as an image") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None


def _to_rgb(img, background: tuple[int, int, int], keep_uint8: bool = False) -> torch.Tensor:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (and PNG's 32-bit "I" holding 16-bit samples): full range is 65535, not 255.
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.clip(gray, 0.0, 1.0)).expand(3, -1, -1).contiguous()
    if mode == "F":
        gray = np.asarray(img, dtype=np.float32)
        finite_max = float(np.nanmax(gray)) if gray.size else 0.0
        scale = 1.0 if finite_max <= 1.0 else 255.0 if finite_max <= 255.0 else 65535.0
        gray = np.nan_to_num(gray / scale, nan=0.0, posinf=1.0, neginf=0.0)
        return torch.from_numpy(np.clip(gray, 0.0, 1.0)).expand(3, -1, -1).contiguous()
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        from PIL import Image

        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inversion), YCbCr, LAB, HSV
    # Convert in the decoder's HWC layout (contiguous, ~20% faster on a 3 MP image) and return a
    # [3, H, W] view of it; resize accepts channels-last input and returns the same values.
    rgb = torch.from_numpy(np.array(img, dtype=np.uint8))
    if keep_uint8:
        return rgb.permute(2, 0, 1)
    return rgb.float().div_(255.0).permute(2, 0, 1)


def resize(region: torch.Tensor, size: tuple[int, int], mode: str = RESAMPLE, antialias: bool = True) -> torch.Tensor:
    """[3, h, w] float -> [3, height, width] for `size` = (width, height): bilinear, antialiased,
    as transformers' processor does (or `mode`/`antialias` as a recipe's F.interpolate call).
    The two axes are resized one after the other, in the order whose intermediate is smaller, so
    memory is bounded by the source and the output, never by their product: a 4x1,000,000 strip
    into 1024x1024 would otherwise need a 1,000,000x1024 intermediate (12 GB). torch does width
    first; the other order differs by < 1e-6. Near-square regions (a recipe's 256 -> 224) take
    exactly one call, as the recipe's code does."""
    width, height = size
    h, w = region.shape[1:]
    if (h, w) == (height, width):
        return region
    x = region[None]
    kwargs = dict(mode=mode, align_corners=False, antialias=antialias)
    if h * width <= height * w:  # width first: torch's own order, exactly one call
        x = F.interpolate(x, size=(height, width), **kwargs)
    else:
        x = F.interpolate(x, size=(height, w), **kwargs)
        x = F.interpolate(x, size=(height, width), **kwargs)
    return x[0]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean_t) / std_t


def preprocess(
    pixels: torch.Tensor,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    prep: Preprocessing | None = None,
) -> torch.Tensor:
    """Crop `box` (left, top, right, bottom) out of [3, H, W] pixels in [0, 1] (or uint8 0..255),
    resize to `size` = (width, height) with antialiased bilinear (or `prep`'s resize, before or
    after normalizing), and normalize. Returns float [3, height, width] on the pixels' device."""
    left, top, right, bottom = box
    region = pixels[:, top:bottom, left:right]
    if region.dtype == torch.uint8:
        region = region.float().div_(255.0)
    if prep is None or prep.is_processor_resize:
        return normalize(resize(region, size), mean, std)
    if prep.normalize_first:  # REPA: x / 255 -> Normalize -> F.interpolate (train.py:55-57)
        return resize(normalize(region, mean, std), size, prep.resample, prep.antialias)
    return normalize(resize(region, size, prep.resample, prep.antialias), mean, std)


def adm_center_crop(rgb: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """ADM's `center_crop_arr` (guided-diffusion image_datasets.py:126-143) on a decoded image
    [3, H, W] (uint8, or float in [0, 1], quantized to 8 bits as saving it would), for a target
    (width, height): the same Pillow calls in the same order, so the pixels are identical.
    Returns uint8 [3, height, width]."""
    from PIL import Image

    from .buckets import adm_steps

    if rgb.dtype != torch.uint8:
        rgb = rgb.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    img = Image.fromarray(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()))
    steps = adm_steps(img.width, img.height, target)
    for _ in range(steps.halvings):
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    img = img.resize(steps.resized, resample=Image.BICUBIC)
    left, top = steps.offset
    arr = np.array(img)[top : top + target[1], left : left + target[0]]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def draft_size_for(
    source_size: tuple[int, int], box: tuple[int, int, int, int], input_size: tuple[int, int]
) -> tuple[int, int]:
    """The smallest full-image size (upright) at which the crop box still covers the model input."""
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    return (math.ceil(input_size[0] * source_size[0] / box_w), math.ceil(input_size[1] * source_size[1] / box_h))


def model_input(
    data: bytes,
    source_size: tuple[int, int],
    box: tuple[int, int, int, int],
    input_size: tuple[int, int],
    prep: Preprocessing,
    max_pixels: int,
    crop_only: bool = False,
    bucket_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The one path from a file's bytes to what the model sees, used by extract's workers,
    `verify --recompute` and `show`: decode (with the cache's JPEG draft setting) -> check the
    size the header promised -> crop -> resize -> normalize. `crop_only` stops after the crop and
    keeps 8-bit sources as uint8 (the GPU resizes them: `preprocess` on the device).
    With `resize: adm` the "crop" is ADM's centre crop to `bucket_size` (the trainer's size;
    default `input_size`), and the resize only rounds the bucket to the patch grid, if needed."""
    draft = draft_size_for(source_size, box, input_size) if prep.jpeg_draft else None
    adm = prep.resize == "adm"
    pixels = decode_image(data, max_pixels, prep.background, draft_size=draft, keep_uint8=crop_only or adm)
    height, width = pixels.shape[1:]
    if (width, height) != tuple(source_size):
        if draft is None or width < draft[0] or height < draft[1]:
            raise DecodeError(
                "changed",
                f"decoded size {width}x{height} differs from the header's "
                f"{source_size[0]}x{source_size[1]} (file replaced during "
                "the run, or EXIF stored after the pixels)",
            )
        scale_x, scale_y = width / source_size[0], height / source_size[1]
        box = (round(box[0] * scale_x), round(box[1] * scale_y), round(box[2] * scale_x), round(box[3] * scale_y))
    if adm:
        pixels = adm_center_crop(pixels, bucket_size or input_size)
        box = (0, 0, pixels.shape[2], pixels.shape[1])
    if crop_only:
        return pixels[:, box[1] : box[3], box[0] : box[2]].contiguous()
    return preprocess(pixels, box, input_size, prep.image_mean, prep.image_std, prep)
