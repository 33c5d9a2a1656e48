"""Where a cache's shard files live while it is written: `LocalShards` (the cache's own
shards/ folder) and `RemoteShards` (object storage, through the local mirror). Repair, adoption,
--overwrite and the writer's uploads ask the store; `state.CacheState` holds one. A new kind of
storage is a new store here (and a `remote.Remote`-like handle for its objects).

Trust: a store deletes only names dinocache gives its own files (`manifest.OWNED`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from .errors import CacheError
from .fileio import is_link
from .manifest import OWNED, cache_path, delete_owned, owned_name
from .names import INDEX_DIR, MANIFEST_NAME, NORM_FILE, RANK_DIR, SHARD_DIR, STATS_DIR
from .stfile import MAX_HEADER_BYTES

log = logging.getLogger("dinocache")


class LocalShards:
    """The shard files of a cache in its own shards/ folder (RemoteShards: in object storage):
    what repair, adoption and --overwrite look at and delete."""

    # The writer calls a store's `upload` with each durable shard before anything names it; a
    # local shard is in place once renamed, so there is none.
    upload = None
    remote = None  # RemoteShards: the cache's remote.Remote

    def __init__(self, root: Path):
        self.root = root

    def size(self, file: str) -> int | None:
        try:
            path = cache_path(self.root, file)
            return path.stat().st_size if path.is_file() else None
        except (CacheError, OSError):
            return None

    def orphans(self, known: set[str]) -> list[str]:
        folder = self.root / SHARD_DIR
        if not folder.is_dir() or is_link(folder):
            return []
        return [
            f"{SHARD_DIR}/{name}"
            for name in sorted(os.listdir(folder))
            if OWNED[SHARD_DIR].fullmatch(name) and f"{SHARD_DIR}/{name}" not in known
        ]

    @contextlib.contextmanager
    def local_copy(self, file: str, reported: dict | None = None):
        yield self.root / file

    def delete(self, file: str) -> None:
        delete_owned(self.root, file)

    def after_commit(self, files: list[str], old_table: str | None) -> None:
        """A local commit is complete once its manifest is in place."""


class RemoteShards(LocalShards):
    """The shards of a remote cache, for repair, adoption and --overwrite: sizes from one
    listing, deep checks (--repair) and orphans on a downloaded copy, deletes remote. `remote`
    is the cache's `remote.Remote`; `mirror` its local mirror, where the writer writes."""

    def __init__(self, remote, mirror: Path):
        super().__init__(mirror)
        self.remote = remote
        self._listing: dict[str, int] | None = None  # listed when first needed: a writer that only uploads never lists
        self._uploaded_extras: dict[str, str] = {}

    @property
    def _sizes(self) -> dict[str, int]:
        if self._listing is None:
            self._listing = self.remote.listing(SHARD_DIR)
        return self._listing

    def size(self, file: str) -> int | None:
        return self._sizes.get(file.removeprefix(SHARD_DIR + "/"))

    def orphans(self, known: set[str]) -> list[str]:
        return [
            f"{SHARD_DIR}/{name}"
            for name in sorted(self._sizes)
            if OWNED[SHARD_DIR].fullmatch(name) and f"{SHARD_DIR}/{name}" not in known
        ]

    @contextlib.contextmanager
    def local_copy(self, file: str, reported: dict | None = None):
        """A local copy to check. A shard a rank report describes at its listed size is not
        downloaded: adoption reads only its header (two range reads, into a sparse file of the
        shard's size) and takes the report's sha256, as a local merge does."""
        name = file.removeprefix(SHARD_DIR + "/")
        local = self.root / SHARD_DIR / f".check-{name}"
        try:
            if reported is not None and reported.get("bytes") == self._sizes.get(name):
                yield self._header_copy(file, local, reported["bytes"])
            else:
                yield self.remote.download(file, local)
        finally:
            local.unlink(missing_ok=True)

    def _header_copy(self, file: str, local: Path, size: int) -> Path:
        start = (self.remote.read(file, limit=7) or b"")[:8]
        header_len = int.from_bytes(start, "little") if len(start) == 8 else -1
        if not 0 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            return self.remote.download(file, local)  # not a header we can read alone: check it whole
        with open(local, "wb") as fh:
            fh.write((self.remote.read(file, limit=8 + header_len - 1) or b"")[: 8 + header_len])
            fh.truncate(size)
        return local

    def delete(self, file: str) -> None:
        if not owned_name(file):  # a tampered manifest must not make us delete a foreign object
            log.warning("%s/%s is not a name dinocache gives its files: left in place", self.remote.url, file)
            return
        self.remote.rm(file)
        self._sizes.pop(file.removeprefix(SHARD_DIR + "/"), None)

    def clear(self) -> None:
        """--overwrite on a remote cache: its manifest and every object with dinocache's names."""
        self.remote.rm(MANIFEST_NAME)
        self.remote.rm(NORM_FILE)
        for folder in (SHARD_DIR, INDEX_DIR, RANK_DIR, STATS_DIR):
            for name in self.remote.listing(folder):
                if OWNED[folder].fullmatch(name):
                    self.remote.rm(f"{folder}/{name}")
        self._listing = {}

    def upload(self, path: Path, name: str) -> None:
        """A shard durable in the mirror into storage; then the local copy goes."""
        self.remote.put_file(path, name)
        path.unlink()

    def after_commit(self, files: list[str], old_table: str | None) -> None:
        """A commit durable in the mirror into storage: the new files, the manifest last; then
        the table it replaced goes."""
        for rel in files:
            local = self.root / rel
            digest = hashlib.sha256(local.read_bytes()).hexdigest()
            if self._uploaded_extras.get(rel) != digest:
                self.remote.put_file(local, rel)
                self._uploaded_extras[rel] = digest
        self.remote.put_file(self.root / MANIFEST_NAME, MANIFEST_NAME)
        if old_table and owned_name(old_table):
            self.remote.rm(old_table)
