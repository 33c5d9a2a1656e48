"""Named fault points, so tests can crash or fill the disk at exact moments of a real run.

Set DINOCACHE_FAULT="point:n:action" (several separated by commas): the n-th time this process
reaches `point`, it either dies with SIGKILL (action `kill`) or raises ENOSPC (action `enospc`).
"point:n:action@R" applies only to the process whose RANK is R (torchrun).
Unset (always, outside tests) a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = ("decode", "shard_write", "shard_renamed", "manifest_write")
_hits: dict[str, int] = {}


def _plan() -> dict[str, tuple[int, str]]:
    plan = {}
    for item in filter(None, os.environ.get("DINOCACHE_FAULT", "").split(",")):
        item, _, rank = item.partition("@")
        if rank and rank != os.environ.get("RANK", "0"):
            continue
        point, n, action = item.split(":")
        plan[point] = (int(n), action)
    return plan


def fault_point(name: str) -> None:
    if "DINOCACHE_FAULT" not in os.environ:
        return
    planned = _plan().get(name)
    if planned is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != planned[0]:
        return
    if planned[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if planned[1] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
