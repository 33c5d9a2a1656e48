"""Where the images come from, behind one interface (base.Source): a folder, webdataset tar
shards, or a list file (parquet, JSONL or CSV) of paths or fsspec URLs.

    source = open_source("data/{00000..00099}.tar")     # or a folder, or "images.parquet"
    files = source.scan()                                # sorted SourceFile records
    data = files[0].source.read(files[0])                # what a decode worker does

Every item knows the source that scanned it, and only that source reads, opens, hashes or
probes it: an item's `locator` (a tar member's data offset) means something to its source alone.
A new kind of source is one module with a Source subclass, and its line in SOURCES.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import ConfigError
from ..scan import max_image_bytes
from .base import Source, SourceFile, link_out_problem, require_images
from .listfile import LIST_SUFFIXES
from .reading import _fsspec, is_url
from .tars import expand_braces, pattern_folder, scan_tar

# The registry: "module:class" of every source, asked in this order; the first whose claims(spec)
# is true reads the spec. The folder comes last: it takes any local path no other source claims.
SOURCES = (
    "tars:TarSource",
    "zips:ZipSource",
    "listfile:ListSource",
    "folder:FolderSource",
)

__all__ = [
    "LIST_SUFFIXES",
    "SOURCES",
    "Source",
    "SourceFile",
    "SourceReader",
    "_fsspec",
    "expand_braces",
    "is_url",
    "link_out_problem",
    "open_source",
    "pattern_folder",
    "require_images",
    "scan_tar",
]


def source_kinds() -> list[type[Source]]:
    """The registered Source classes, in the order they are asked."""
    kinds = []
    for entry in SOURCES:
        module, name = entry.split(":")
        kinds.append(getattr(importlib.import_module(f"{__name__}.{module}"), name))
    return kinds


def open_source(spec: str | Path, exclude=(), follow_symlinks: bool = False) -> Source:
    """The source that reads `spec`: the first in SOURCES that claims it."""
    text = str(spec)
    for kind in source_kinds():
        if kind.claims(text):
            return kind(text, exclude, follow_symlinks)
    examples = [kind.example for kind in source_kinds() if is_url(kind.example)]
    raise ConfigError(f"{text}: no source reads this URL", "pass e.g. " + " or ".join(examples))


class SourceReader:
    """Key -> the source's record and bytes, for verify --source and show."""

    def __init__(self, spec: str | Path, follow_symlinks: bool = False):
        self.source = open_source(spec, follow_symlinks=follow_symlinks)

    def find(self, key: str) -> SourceFile:
        """The source record of `key` (DecodeError "missing" or "outside_source" when none)."""
        return self.source.find(key)

    def read(self, key: str, source_size: tuple[int, int] | None = None) -> bytes | bytearray:
        """The bytes of `key`; with its recorded (width, height), no more than such an image needs."""
        limit = max_image_bytes(*source_size) if source_size else None
        return self.source.read(self.find(key), limit)
