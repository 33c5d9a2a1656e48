"""What an image file is: its name (`IMAGE_EXTENSIONS`), what its header says (`probe`: the
upright size), the most bytes an image of that size may have, and what a record can hold.

Nothing here decodes pixels: `probe` reads only the file header (and the EXIF orientation),
which is all bucket placement needs. The sources (sources/) find the images and open them.
"""

from __future__ import annotations

from .errors import DecodeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# EXIF orientations 5..8 rotate by 90 degrees, so the upright picture has width and height swapped.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


MAX_SOURCE_BYTES = 1 << 62  # what a sample record holds (docs/FORMAT.md)
INT64 = (-(1 << 63), (1 << 63) - 1)


def stamp_problem(size, mtime_ns) -> str | None:
    """Why a size and mtime from untrusted input (a list row, a tar header) cannot be recorded:
    a record holds a byte count in 0..2^62 and a time in nanoseconds as a 64-bit integer."""
    if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_SOURCE_BYTES):
        return f"the size {_shown(size)} is not a byte count in 0..2^62"
    if not (isinstance(mtime_ns, int) and not isinstance(mtime_ns, bool) and INT64[0] <= mtime_ns <= INT64[1]):
        return f"the modification time {_shown(mtime_ns)} ns is not a 64-bit integer"
    return None


# An image file holds its pixels (at most 32 bytes each: twice float32 RGBA, the widest Pillow
# decodes) plus metadata, profiles and further frames (64 MiB). A larger file is a picture plus
# something else (junk, a hole): it is refused before it is read, so an image's bytes in memory
# stay bounded by its pixel count, and so by --max-pixels.
IMAGE_BYTES_SLACK = 64 * 1024 * 1024
MAX_BYTES_PER_PIXEL = 32


def max_image_bytes(width: int, height: int) -> int:
    return IMAGE_BYTES_SLACK + MAX_BYTES_PER_PIXEL * width * height


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def probe(path, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of the upright image, from the header alone (never decodes pixels).

    `path` is a file name or an open binary file. Images with more than `max_pixels` pixels
    are refused here, before anything else is read.
    """
    from PIL import Image, UnidentifiedImageError

    from .imaging import pillow_pixel_limit

    try:
        with pillow_pixel_limit(max_pixels or (1 << 62)), Image.open(path) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise DecodeError("corrupt", f"header declares an empty image ({width}x{height})")
            if max_pixels is not None and width * height > max_pixels:
                raise DecodeError(
                    "too_large",
                    f"{width}x{height} = {width * height} pixels is over the limit of "
                    f"{max_pixels} (raise --max-pixels if this image is legitimate)",
                )
            orientation = _orientation(img)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("missing", "the file disappeared or is a broken symlink") from None
    except PermissionError:
        raise DecodeError("unreadable", "no permission to read the file") from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "Pillow does not recognise this file as an image") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


def _orientation(img) -> int:
    """EXIF orientation from what the header parse already holds: Pillow's PNG getexif() would
    decode the whole image to look for an eXIf chunk after the pixels, so PNGs use only an
    eXIf chunk that came before them (where writers put it)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    if img.format not in ("JPEG", "MPO", "TIFF", "WEBP", "PNG"):
        return 1
    return int(img.getexif().get(0x0112, 1) or 1)
