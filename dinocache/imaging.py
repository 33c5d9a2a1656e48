"""Decode policy and preprocessing: from a file to the normalized tensor DINOv3 sees.

Decoding gets the traps right that naive `Image.convert("RGB")` falls into: EXIF orientation,
16-bit and float modes (convert("RGB") turns a 16-bit PNG ~99.6% white), alpha (composited on a
background colour instead of dropped), palette transparency, CMYK, and decompression bombs
(refused from the header, before any pixel is decoded).

Preprocessing matches transformers' `DINOv3ViTImageProcessor(do_center_crop=False)`: rescale to
[0, 1] -> bilinear antialiased resize -> normalize. Its torchvision resize on tensors is
`torch.nn.functional.interpolate(mode="bilinear", antialias=True)`, which is what we call, so
the core does not need torchvision.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DecodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)


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


def decode_image(source: str | bytes, max_pixels: int, background: tuple[int, int, int] = WHITE,
                 draft_size: tuple[int, int] | None = None, keep_uint8: bool = False) -> torch.Tensor:
    """Decode the first frame of an image (a path or its bytes), upright, as float32 RGB in [0, 1],
    shape [3, H, W]. Raises DecodeError with a stable reason code for anything unusable.

    `draft_size` (upright width, height) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale
    (its DCT scaling, much cheaper than a full decode) while staying at least that large; the
    result is then smaller than the source and the caller scales its crop box to match.
    `keep_uint8` returns 8-bit sources as uint8 [3, H, W] (4x less to move; the caller divides by
    255), other sources as float as always.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before decoding
    if isinstance(source, str):
        source = read_source(source)
    try:
        with Image.open(io.BytesIO(source)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels is over the limit of "
                                               f"{max_pixels} (raise --max-pixels if this image is legitimate)")
            img.seek(0)  # animated GIF/WebP/APNG: the first frame
            if draft_size is not None and img.format == "JPEG":
                transposed = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
                img.draft("RGB", tuple(reversed(draft_size)) if transposed else draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, background, keep_uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "Pillow does not recognise this file as an image") from None
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


def preprocess(
    pixels: torch.Tensor,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """Crop `box` (left, top, right, bottom) out of [3, H, W] pixels in [0, 1] (or uint8 0..255),
    resize to `size` = (width, height) with antialiased bilinear, and normalize. Returns float
    [3, height, width] on the pixels' device."""
    left, top, right, bottom = box
    region = pixels[:, top:bottom, left:right]
    if region.dtype == torch.uint8:
        region = region.float().div_(255.0)
    width, height = size
    if region.shape[1:] != (height, width):
        region = F.interpolate(region[None], size=(height, width), mode="bilinear",
                               align_corners=False, antialias=True)[0]
    mean_t = torch.tensor(mean, dtype=region.dtype, device=region.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=region.dtype, device=region.device).view(3, 1, 1)
    return (region - mean_t) / std_t
