"""Find the images in a folder: a sorted, deterministic walk plus header-only size reads.

Nothing here decodes pixels: `probe` reads only the file header (and the EXIF orientation),
which is all bucket placement needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DecodeError, DinocacheError
from .keys import key_for_file

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


@dataclass(frozen=True, slots=True)
class SourceFile:
    key: str  # POSIX path relative to the input folder: the sample's identity in the cache
    path: str
    size: int  # bytes (-1: could not stat)
    mtime_ns: int
    problem: tuple[str, str] | None = None  # (reason, detail) known before decoding: a failure to record
    offset: int = -1  # a tar member: where its bytes start in the tar at `path` (sources.py)
    hint: tuple[int, int] | None = None  # (width, height) a list file gave: no header read needed


def scan_folder(root: str | Path, exclude: list[str | Path] = (), follow_symlinks: bool = False) -> list[SourceFile]:
    """Every image file under `root` (extensions case-insensitive), sorted by key.

    Folder links are not followed (no loops). A file that cannot be stat'ed (a broken or looping
    link) is still listed with size -1 so that it is reported, not skipped; so is a file whose
    name cannot be a key, and (unless `follow_symlinks`) a link to a file outside `root`.
    Folders in `exclude` (the cache being written, when it lies inside the input) are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DinocacheError(
            f"input folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist"),
            "pass the folder that holds your images, e.g. dinocache extract data/images",
        )
    real_root = os.path.realpath(root)
    skip = {os.path.realpath(p) for p in exclude}
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in skip)
        for name in filenames:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            key, key_problem = key_for_file(os.path.relpath(path, root))
            if key_problem:
                found.append(SourceFile(key, path, -1, -1, ("bad_filename", f"{key_problem}; rename the file")))
                continue
            problem = None if follow_symlinks or not os.path.islink(path) else link_out_problem(path, real_root)
            try:
                st = os.stat(path)
                found.append(SourceFile(key, path, st.st_size, st.st_mtime_ns, problem))
            except OSError:
                found.append(SourceFile(key, path, -1, -1, problem))
    found.sort(key=lambda s: s.key)
    return found


def link_out_problem(path: str, real_root: str, what: str = "the input folder") -> tuple[str, str] | None:
    """("outside_source", detail) when `path` resolves outside `real_root` (a symbolic link on
    the way leads out): the one link rule of every local source, lifted by --follow-symlinks."""
    target = os.path.realpath(path)
    if os.path.commonpath([real_root, target]) == real_root:
        return None
    return (
        "outside_source",
        f"a symbolic link to {target}, outside {what} (pass --follow-symlinks to read it)",
    )


def require_images(sources: list[SourceFile], root: str | Path) -> None:
    if not sources:
        raise DinocacheError(
            f"no images found in {root} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))}, any case, in all subfolders)",
            "check the path; point extract at the folder that holds your images",
        )


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
