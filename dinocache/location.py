"""Where a cache is: a folder on this machine, or a folder in object storage (`s3://...`, any
fsspec URL) reached through a local mirror (remote.py). Decided once, from what the user named,
by `CacheLocation`; every command and the reader ask it, never the string (as webdataset's
`gopen` scheme table and datatrove's `DataFolder` do). Whether a URL is one is `sources.is_url`."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from .remote import Remote
from .sources import is_url
from .store import LocalShards, RemoteShards


class CacheLocation:
    """A cache as the user named it: `name` (shown in messages), `is_remote`, and for a remote
    cache its `remote` (a `Remote`, made once; None for a local folder)."""

    def __init__(self, spec: str | Path):
        self.name = str(spec)
        self.is_remote = is_url(self.name)

    def __str__(self) -> str:
        return self.name

    @cached_property
    def remote(self) -> Remote | None:
        return Remote(self.name) if self.is_remote else None

    def local_view(self) -> Path:
        """A cache folder to read: the folder itself, or the mirror of a remote cache (its
        metadata pulled and checked)."""
        return self.remote.pull_metadata() if self.is_remote else Path(self.name)

    def shards(self, root: Path) -> LocalShards:
        """The shard store of the cache being written in the local folder `root` (a remote
        cache's mirror)."""
        return RemoteShards(self.remote, root) if self.is_remote else LocalShards(root)


def local_view(root: str | Path) -> Path:
    """`CacheLocation(root).local_view()`: what `stats`, `keys`, `crops` and `verify` read."""
    return CacheLocation(root).local_view()
