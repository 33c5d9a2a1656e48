"""One writer per cache: an exclusive lock file holding the owner's host and pid.

A lock left by a process that no longer exists on this host is taken over, so a kill -9 never
leaves a cache that needs manual cleanup.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .errors import CacheError, untrusted
from .fileio import read_limited
from .names import LOCK_NAME

LOCK_BYTES = 4096  # a lock holds a host and a pid: anything longer is not one dinocache wrote


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid = holder.get("pid") if holder else None
                if holder and holder.get("host") == self.owner["host"] and isinstance(pid, int) and not _alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = (
                    f"pid {untrusted(holder.get('pid'))} on {untrusted(holder.get('host'))}"
                    if holder
                    else "owner unknown"
                )
                raise CacheError(
                    f"{self.path.parent} is being written by another dinocache process ({who})",
                    f"wait for it to finish; if no such process runs any more, delete {self.path}",
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(self.owner, fh)
            return self
        raise CacheError(f"could not take the lock {self.path}", f"delete {self.path} if no dinocache process runs")

    def _holder(self) -> dict | None:
        """Who holds the lock, from its first few KB; never through a link, never from a FIFO or
        a device (a `.lock` linked to /dev/zero, a FIFO there: refused, not read or waited on)."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise CacheError(
                f"{self.path} is not a lock dinocache wrote (a symbolic link, a FIFO or a device)",
                f"delete {self.path} if no dinocache process runs",
            )
        try:
            holder = json.loads(read_limited(self.path, LOCK_BYTES))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None  # written by hand, or by something else

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
