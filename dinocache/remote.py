"""Caches on object storage: s3://, gs://, or any fsspec URL.

A remote cache has exactly the local layout (docs/FORMAT.md). dinocache works on a local
*mirror* of it (`~/.cache/dinocache/remote/<hash of the URL>`, or $DINOCACHE_REMOTE_CACHE):

- reading: the manifest, the sample table, the final norm and the statistics are downloaded
  into the mirror (each checked against its sha256); shards are downloaded when first read,
  checked against their sha256, and kept in a bounded least-recently-used shard cache
  ($DINOCACHE_SHARD_CACHE_GB, default 50). Rows are always read from local copies.
- writing: shards are written in the mirror, uploaded, and only then named by the manifest;
  after upload the local copy is dropped. A commit uploads the sample table, then the manifest,
  last. One committer per cache: the lock is an object created with a conditional PUT (S3's
  If-None-Match), so a second committer is refused; a lock left by a process that died must be
  deleted by hand (its host and pid are in it). The writers of a multi-process or Ray job take
  no lock: each PUTs its own shards, report and lease (lock.py) for a committer to fold in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import manifest as manifest_rules  # its size limit read when used, like read_manifest does
from .errors import CacheError, untrusted
from .fileio import atomic_write_bytes, is_link, remove_owned
from .lock import LOCK_BYTES, live_leases
from .manifest import OWNED, TEMP, read_manifest, schema_problems
from .names import INDEX_DIR, LOCK_NAME, MANIFEST_NAME, NORM_FILE, RANK_DIR, SHARD_DIR, STATS_DIR
from .sources import _fsspec
from .stfile import parse_json_bounded
from .store import RemoteShards  # noqa: F401 - named here too: the store of a remote cache

log = logging.getLogger("dinocache")

DEFAULT_SHARD_CACHE_GB = 50.0


def _mirror_base() -> Path:
    return Path(os.environ.get("DINOCACHE_REMOTE_CACHE", Path.home() / ".cache" / "dinocache" / "remote"))


class Remote:
    """One remote cache folder, through fsspec."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        try:
            self.fs, self.root = _fsspec().core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            raise CacheError(
                f"cannot reach {self.url}: {exc}",
                "pip install 'dinocache[s3]' for s3:// (gcsfs for gs://), and check the URL",
            ) from None

    def __getstate__(self):
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def mirror(self) -> Path:
        folder = _mirror_base() / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "SOURCE").write_text(self.url + "\n")
        return folder

    # ---- objects --------------------------------------------------------------------------
    def read(self, rel: str, limit: int | None = None) -> bytes | None:
        """An object's bytes (None when there is none); with `limit`, at most limit + 1 of them
        are fetched, so a caller can tell an object over its limit without loading it."""
        try:
            if limit is None:
                return self.fs.cat_file(self.path(rel))
            return self.fs.cat_file(self.path(rel), start=0, end=limit + 1)
        except FileNotFoundError:
            return None

    def _read_manifest_bytes(self) -> bytes | None:
        limit = manifest_rules.MAX_MANIFEST_BYTES
        size = self.size(MANIFEST_NAME)
        data = self.read(MANIFEST_NAME, limit=limit) if (size or 0) <= limit else b""
        if data is not None and (len(data) > limit or (size or 0) > limit):
            raise CacheError(
                f"{self.url}/{MANIFEST_NAME} is larger than {limit} bytes, the most a manifest may be",
                "pass the URL of a dinocache cache; a manifest that large is not one dinocache wrote",
            )
        return data

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.info(self.path(rel))["size"])
        except FileNotFoundError:
            return None

    def put_file(self, local: Path, rel: str) -> None:
        self.fs.put_file(str(local), self.path(rel))

    def write(self, rel: str, data: bytes) -> None:
        """One object, in one PUT: whole or absent, never part of it."""
        self.fs.pipe_file(self.path(rel), data)

    def rm(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def listing(self, folder: str) -> dict[str, int]:
        """name -> size of the objects directly in `folder`."""
        try:
            entries = self.fs.ls(self.path(folder), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}

    def download(self, rel: str, local: Path, sha256: str | None = None) -> Path:
        """`rel` into `local` (via a temp name), checked against `sha256` when given."""
        tmp = local.with_name(f".{local.name}.{os.getpid()}.download")
        digest = hashlib.sha256()
        try:
            with self.fs.open(self.path(rel), "rb", block_size=16 * 1024 * 1024) as src, open(tmp, "wb") as dst:
                while block := src.read(16 * 1024 * 1024):
                    digest.update(block)
                    dst.write(block)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise CacheError(f"{self.url}/{rel} is missing", "rerun the extract command that wrote the cache") from None
        if sha256 is not None and digest.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise CacheError(
                f"{self.url}/{rel} fails its sha256 checksum (corrupted in storage or in transit)",
                "run `dinocache verify`; rerun extract with --repair to recompute it",
            )
        os.replace(tmp, local)
        return local

    # ---- one writer -----------------------------------------------------------------------
    def lock(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        try:
            self.fs.pipe_file(self.path(LOCK_NAME), json.dumps(owner).encode(), mode="create")
        except FileExistsError:
            holder = (self.read(LOCK_NAME, limit=LOCK_BYTES) or b"?").decode(errors="replace")
            raise CacheError(
                f"{self.url} is being written by another dinocache process ({untrusted(holder)})",
                f"wait for it to finish; if no such process runs any more, delete {self.url}/{LOCK_NAME}",
            ) from None
        self._lock_token = owner["token"]

    def unlock(self) -> None:
        self.rm(LOCK_NAME)

    # ---- the mirror -------------------------------------------------------------------------
    def sync_mirror(self) -> Path:
        """The mirror brought in line with the remote, which is the truth: its metadata pulled.
        A mirror that disagrees (the remote has no manifest, or one of another cache: the bucket
        was emptied or recreated) is discarded first, so no old manifest, table or shard of it
        decides anything: not the settings check, not adoption."""
        mirror = self.mirror()
        remote_manifest = self._read_manifest_bytes()
        try:
            local_created = read_manifest(mirror).get("created") if (mirror / MANIFEST_NAME).is_file() else None
        except CacheError:
            local_created = "unreadable"
        remote_created = None
        if remote_manifest is not None:
            try:
                remote_created = json.loads(remote_manifest).get("created")
            except (ValueError, AttributeError):
                remote_created = "unreadable"  # pull_metadata says what is wrong with it
        if local_created is not None and local_created != remote_created:
            log.info("discarding the local mirror of %s: the remote cache is not the one it mirrors", self.url)
            (mirror / MANIFEST_NAME).unlink(missing_ok=True)
            (mirror / NORM_FILE).unlink(missing_ok=True)
            for folder in (SHARD_DIR, INDEX_DIR, STATS_DIR, RANK_DIR):
                remove_owned(mirror / folder, OWNED[folder])
                remove_owned(mirror / folder, TEMP)
        return self.pull_metadata() if remote_manifest is not None else mirror

    def pull_metadata(self) -> Path:
        """The manifest and the files it names (but shards) into the mirror, checked; returns it."""
        mirror = self.mirror()
        for folder in (INDEX_DIR, STATS_DIR, SHARD_DIR):
            path = mirror / folder
            if is_link(path):
                raise CacheError(f"{path} is a symbolic link", "delete the local mirror folder")
            path.mkdir(exist_ok=True)
        data = self._read_manifest_bytes()
        if data is None:
            raise CacheError(
                f"{self.url} has no {MANIFEST_NAME}: it is not a dinocache cache", "pass the URL given to extract --out"
            )
        try:
            manifest = parse_json_bounded(data, MANIFEST_NAME)
        except ValueError as exc:
            raise CacheError(f"{self.url}/{MANIFEST_NAME} is not readable: {exc}", "rebuild the cache") from None
        problems = schema_problems(manifest)
        if problems:
            raise CacheError(
                f"{self.url}/{MANIFEST_NAME} is not a valid manifest: " + "; ".join(problems[:5]),
                "rebuild the cache with extract --overwrite",
            )
        wanted = [(manifest["samples"]["file"], manifest["samples"]["sha256"])]
        norm = manifest["model"].get("final_norm")
        if norm:
            wanted.append((norm["file"], norm["sha256"]))
        wanted += [(e["file"], e["sha256"]) for e in manifest.get("statistics", [])]
        for rel, sha in wanted:
            local = mirror / rel
            if not (local.is_file() and hashlib.sha256(local.read_bytes()).hexdigest() == sha):
                self.download(rel, local, sha)
        atomic_write_bytes(mirror / MANIFEST_NAME, data)
        read_manifest(mirror)
        return mirror


@dataclass
class ShardCache:
    """Shards of a remote cache, downloaded on first read into the mirror and checked; the
    least recently used go once the folder is over its size."""

    remote: Remote
    mirror: Path
    limit_bytes: int = int(float(os.environ.get("DINOCACHE_SHARD_CACHE_GB", DEFAULT_SHARD_CACHE_GB)) * 1e9)

    def fetch(self, record: dict) -> Path:
        local = self.mirror / record["file"]
        if local.is_file() and local.stat().st_size == record["bytes"]:
            os.utime(local)
            return local
        self.remote.download(record["file"], local, record["sha256"])
        self._trim(keep=local)
        return local

    def _trim(self, keep: Path) -> None:
        folder = self.mirror / SHARD_DIR
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime
        )
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.limit_bytes:
                return
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


class RemoteSession:
    """extract writing to object storage: the remote lock, the mirror brought up to date (the
    remote is the truth), and shards left in the mirror by an interrupted run uploaded (they are
    then adopted like any orphan). The run's own uploads are its store's (`store.RemoteShards`):
    each shard once it is durable locally, and at each commit the new files, the manifest last."""

    def __init__(self, remote: Remote):
        self.remote = remote
        self.mirror = remote.mirror()

    def __enter__(self) -> "RemoteSession":
        self.remote.lock()
        try:
            self._prepare()
        except BaseException:
            self.remote.unlock()
            raise
        return self

    def _prepare(self) -> None:
        self.remote.sync_mirror()
        folder = self.mirror / SHARD_DIR
        if live_leases(self.mirror, self.remote):  # shards here may be a running writer's, on their way up
            return
        remote_shards = self.remote.listing(SHARD_DIR)
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if OWNED[SHARD_DIR].fullmatch(path.name) and path.is_file() and not is_link(path):
                if path.name not in remote_shards:
                    log.info("uploading %s, left by an interrupted run", path.name)
                    self.remote.put_file(path, f"{SHARD_DIR}/{path.name}")
                path.unlink()

    def __exit__(self, *exc) -> None:
        self.remote.unlock()
