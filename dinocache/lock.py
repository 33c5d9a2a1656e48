"""One writer per cache: an exclusive lock file holding the owner's host and pid.

A lock left by a process that no longer exists on this host is taken over, so a kill -9 never
leaves a cache that needs manual cleanup.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .errors import CacheError
from .names import LOCK_NAME


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
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "owner unknown"
                raise CacheError(
                    f"{self.path.parent} is being written by another dinocache process ({who})",
                    f"wait for it to finish; if no such process runs any more, delete {self.path}",
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(self.owner, fh)
            return self
        raise CacheError(f"could not take the lock {self.path}", f"delete {self.path} if no dinocache process runs")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None  # written by hand, or by something else

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
