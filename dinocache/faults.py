"""Named fault points, so tests can crash or fill the disk at exact moments of a real run.

Set DINOCACHE_FAULT="point:n:action" (several separated by commas): the n-th time this process
reaches `point`, it dies with SIGKILL (`kill`), raises ENOSPC (`enospc`, or `late_enospc` after
a second, so that work queued behind the failing write goes on meanwhile), sends itself SIGTERM
or SIGINT (`sigterm`, `sigint`: a real signal, as `scancel` or Ctrl-C deliver it), or raises
torch's out-of-memory error (`oom`).
"point:n:action@R" applies only to the process whose RANK is R (torchrun).
With DINOCACHE_FAULT_ONCE=PATH a fault fires in one process only, the first to create PATH (a
Ray actor restarted after the kill must not die again at the same point).
Unset (always, outside tests) a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = ("decode", "forward", "batch_done", "shard_write", "shard_renamed", "shard_uploaded", "manifest_write")
_hits: dict[str, int] = {}


def _configured_faults() -> dict[str, tuple[int, str]]:
    from .distributed import LauncherEnv

    faults = {}
    for item in filter(None, os.environ.get("DINOCACHE_FAULT", "").split(",")):
        item, _, rank = item.partition("@")
        if rank and int(rank) != LauncherEnv.read().rank:
            continue
        point, n, action = item.split(":")
        faults[point] = (int(n), action)
    return faults


def _first_to_fire() -> bool:
    marker = os.environ.get("DINOCACHE_FAULT_ONCE")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def fault_point(name: str) -> None:
    if "DINOCACHE_FAULT" not in os.environ:
        return
    fault = _configured_faults().get(name)
    if fault is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != fault[0] or not _first_to_fire():
        return
    if fault[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault[1] == "late_enospc":
        import time

        time.sleep(1.0)
    if fault[1] in ("enospc", "late_enospc"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
    if fault[1] in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if fault[1] == "sigterm" else signal.SIGINT)
    if fault[1] == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
