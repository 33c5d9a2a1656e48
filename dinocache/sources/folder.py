"""A folder of images: a sorted, deterministic walk (the output folder left out); keys are paths
relative to the folder; links that lead out of it are recorded failures; a key is found again
through keys.source_path (confined to the folder)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import DecodeError, DinocacheError
from ..keys import key_for_file, source_path
from ..scan import IMAGE_EXTENSIONS
from .base import Source, SourceFile, link_out_problem, require_images
from .reading import is_url


class FolderSource(Source):
    kind = "folder"
    example = "data/images"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return not is_url(spec)  # last in the registry: any local path no other source claims

    def scan(self) -> list[SourceFile]:
        files = self.walk()
        require_images(files, self.spec)
        self._warn_about_excluded_images()
        return files

    def walk(self) -> list[SourceFile]:
        """Every image file under the folder (extensions case-insensitive), sorted by key.

        Folder links are not followed (no loops). A file that cannot be stat'ed (a broken or looping
        link) is still listed with size -1 so that it is reported, not skipped; so is a file whose
        name cannot be a key, and (unless `follow_symlinks`) a link to a file outside the folder.
        Folders in `exclude` (the cache being written, when it lies inside the input) are skipped.
        """
        root = Path(self.spec)
        if not root.is_dir():
            raise DinocacheError(
                f"input folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist"),
                "pass the folder that holds your images, e.g. dinocache extract data/images",
            )
        real_root = os.path.realpath(root)
        skip = {os.path.realpath(p) for p in self.exclude}
        found: list[SourceFile] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in skip)
            for name in filenames:
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                path = os.path.join(dirpath, name)
                key, key_problem = key_for_file(os.path.relpath(path, root))
                if key_problem:
                    problem = ("bad_filename", f"{key_problem}; rename the file")
                    found.append(SourceFile(key, path, -1, -1, problem, source=self))
                    continue
                problem = None
                if not self.follow_symlinks and os.path.islink(path):
                    problem = link_out_problem(path, real_root)
                try:
                    st = os.stat(path)
                    found.append(SourceFile(key, path, st.st_size, st.st_mtime_ns, problem, source=self))
                except OSError:
                    found.append(SourceFile(key, path, -1, -1, problem, source=self))
        found.sort(key=lambda s: s.key)
        return found

    def find(self, key: str) -> SourceFile:
        """The file of `key`, looked up alone (no walk), never outside the folder."""
        path = source_path(self.spec, key, self.follow_symlinks)
        try:
            st = os.stat(path)
        except OSError:
            raise DecodeError("missing", f"{key} is not in {self.spec}") from None
        return SourceFile(key, str(path), st.st_size, st.st_mtime_ns, source=self)

    def _warn_about_excluded_images(self) -> None:
        """The output folder inside the input is left out of the scan; say so when that hides
        images (an --out pointed at a subfolder of pictures by mistake)."""
        root = os.path.realpath(self.spec)
        for folder in self.exclude:
            real = os.path.realpath(folder)
            if real == root or os.path.commonpath([root, real]) != root:
                continue
            hidden = sum(
                os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for _, _, names in os.walk(real) for name in names
            )  # 0 for a folder not made yet
            if hidden:
                logging.getLogger("dinocache").warning(
                    "%d image(s) under %s are left out: it is the output folder (--out); put the cache outside "
                    "the image folder to include them",
                    hidden,
                    folder,
                )
            else:  # it works (the scan leaves it out), but the cache now travels with every copy of the images
                logging.getLogger("dinocache").warning(
                    "the output folder %s is inside the image folder %s: the scan leaves it out, but copying or "
                    "syncing the images carries the cache along; keep caches beside the data, not in it",
                    folder,
                    self.spec,
                )
