"""A cache in object storage: its metadata pulled (and checked) into the local mirror, each
shard streamed through a temporary local copy, unlisted objects found by listing."""

from __future__ import annotations

from ..errors import CacheError
from .cache import check_cache
from .report import VerifyOptions, VerifyReport


def verify_remote(url: str, report: VerifyReport, options: VerifyOptions) -> None:
    from ..remote import Remote, RemoteShards

    try:
        remote = Remote(url)
        mirror = remote.pull_metadata()
    except CacheError as exc:
        report.add("manifest", exc.message, url)
        return
    check_cache(mirror, report, options, store=RemoteShards(remote, mirror))
