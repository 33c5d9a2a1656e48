"""The Source interface and its item record: what every kind of image source provides, and the
rules all of them share (one link rule, at least one image)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DecodeError, DinocacheError
from ..scan import IMAGE_EXTENSIONS, max_image_bytes, probe
from .reading import hash_file, is_url, open_file, read_file


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One image a source found (a scan's result). Only its source knows how to read it:
    `source.read(item)`, never `path` opened directly (it may be an archive holding the image)."""

    key: str  # POSIX path relative to the input folder: the sample's identity in the cache
    path: str  # the file that holds the bytes: the image itself, or the archive it is in
    size: int  # bytes (-1: could not stat)
    mtime_ns: int
    problem: tuple[str, str] | None = None  # (reason, detail) known before decoding: a failure to record
    locator: object = None  # where the bytes are inside `path`, as its source put it (opaque to the rest)
    hint: tuple[int, int] | None = None  # (width, height) the source gave (a list file): no header read needed
    source: Source | None = field(default=None, compare=False, repr=False)  # the source that scanned it


class Source:
    """A kind of image source: it claims the specs it reads (`claims`), lists their images
    (`scan`: SourceFile records sorted by key), finds one by key (`find`), says what it is
    (`describe`, the input a manifest records) and owns its items' bytes (`read`, `open` for a
    header probe, `sha256`, `probe`). An item is a SourceFile this source scanned, or a record
    carrying its `path`, `locator` and `size` (worklist.WorkItem). These defaults read an item
    as the whole file at its `path`, local or a URL; an archive overrides them."""

    kind = ""  # a short name: "folder", "tars", ...
    example = ""  # a spec it reads, for messages

    def __init__(self, spec: str, exclude=(), follow_symlinks: bool = False):
        self.spec, self.exclude, self.follow_symlinks = spec, list(exclude), follow_symlinks
        self._index: dict[str, SourceFile] | None = None

    @classmethod
    def claims(cls, spec: str) -> bool:
        """Whether this source reads `spec` (the registry asks each source in turn)."""
        raise NotImplementedError

    def scan(self) -> list[SourceFile]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.spec if is_url(self.spec) else str(Path(self.spec).resolve())

    def find(self, key: str) -> SourceFile:
        """The item of `key` (DecodeError "missing" when none), from one scan kept for the next."""
        if self._index is None:
            self._index = {s.key: s for s in self.scan()}
        if key not in self._index:
            raise DecodeError("missing", f"{key} is not in {self.spec}")
        return self._index[key]

    def read(self, item, limit: int | None = None) -> bytes | bytearray:
        """The item's bytes; never more than `limit` (a larger item is a too_large failure)."""
        return read_file(item.path, limit)

    def open(self, item, limit: int | None = None):
        """A context manager giving the item as a readable binary file, for a header probe:
        only what the probe reads is read. An item over `limit` bytes is refused unread."""
        return open_file(item.path, limit)

    def sha256(self, item) -> str:
        return hash_file(item.path)

    def probe(self, item: SourceFile, max_pixels: int) -> tuple[int, int]:
        """(width, height) of the upright image, from its header alone (or the size its source
        gave); DecodeError for an item that cannot be placed."""
        if item.problem:
            raise DecodeError(*item.problem)
        if item.size < 0:
            raise DecodeError("unreadable", "cannot stat the file (broken or looping symlink?)")
        if item.size == 0:
            raise DecodeError("empty", "zero-byte file")
        if item.hint:
            width, height = item.hint
            if width * height > max_pixels:
                raise DecodeError("too_large", f"the list gives {width}x{height}, over --max-pixels {max_pixels}")
        else:  # the header only; a file larger than any image within --max-pixels can need is refused unread
            with self.open(item, max_image_bytes(max_pixels, 1)) as fh:
                width, height = probe(fh, max_pixels)
        if item.size > max_image_bytes(width, height):
            raise DecodeError(
                "too_large",
                f"the file is {item.size} bytes, more than a {width}x{height} image can need "
                f"({max_image_bytes(width, height)}): a picture followed by junk or a hole is not read",
            )
        return width, height


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


def short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
