"""Find the images in a folder: a sorted, deterministic walk plus header-only size reads.

Nothing here decodes pixels: `probe` reads only the file header (and the EXIF orientation),
which is all the bucket planner needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DecodeError, DinocacheError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# EXIF orientations 5..8 rotate by 90 degrees, so the upright picture has width and height swapped.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class SourceFile:
    key: str  # POSIX path relative to the input folder: the sample's identity in the cache
    path: str
    size: int  # bytes
    mtime_ns: int


def scan_folder(root: str | Path) -> list[SourceFile]:
    """Every image file under `root` (extensions case-insensitive), sorted by key.

    Directory symlinks are not followed (no loops); a file that cannot be stat'ed (a broken
    or looping symlink) is still listed with size -1 so that it is reported, not skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DinocacheError(f"input folder {root} does not exist or is not a folder",
                             "pass the folder that holds your images, e.g. dinocache extract data/images")
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            key = Path(os.path.relpath(path, root)).as_posix()
            try:
                st = os.stat(path)
                found.append(SourceFile(key, path, st.st_size, st.st_mtime_ns))
            except OSError:
                found.append(SourceFile(key, path, -1, -1))
    found.sort(key=lambda s: s.key)
    return found


def probe(path: str) -> tuple[int, int]:
    """(width, height) of the upright image, from the header alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1) if img.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
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
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"header declares an empty image ({width}x{height})")
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height
