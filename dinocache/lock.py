"""One committer per cache, any number of writers: the lock and the writers' leases.

The lock is an exclusive file holding the owner's host and pid, taken by whoever commits (a
single run, rank 0 of a torchrun job, `merge`, the Ray driver). A lock left by a process that no
longer exists on this host is taken over, so a kill -9 never leaves a cache that needs manual
cleanup. Object storage has its own lock object (remote.py).

A writer of many (a rank without the lock, a Ray actor) takes no lock: it only adds files under
names no one else uses (its shards, its report). While it writes it holds a lease,
ranks/lease-ID.json (its host, pid and start time), so that a committer leaves alone what may be
its files in the making (temp files, a mirror's shards not yet uploaded) and refuses
--overwrite. A lease whose process is gone (this host) or older than a day is stale: deleted.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from pathlib import Path

from .errors import CacheError, untrusted
from .fileio import atomic_write_bytes, is_link, read_limited
from .names import LEASE_PATTERN, LOCK_NAME, RANK_DIR, lease_name

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


LEASE_MAX_AGE_S = 24 * 3600  # a lease of another host cannot be checked by pid: it ends after a day
LEASE = re.compile(LEASE_PATTERN)


class WriterLease:
    """Held by a writer of many while it writes (see the module's docstring); `remote`: the
    lease is an object of the cache in object storage."""

    def __init__(self, root: Path, remote=None):
        self.root, self.remote = Path(root), remote
        self.name = lease_name(uuid.uuid4().hex[:12])
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def __enter__(self) -> "WriterLease":
        data = json.dumps(self.owner).encode()
        if self.remote is not None:
            self.remote.write(self.name, data)
        else:
            (self.root / RANK_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.root / self.name, data)
        return self

    def __exit__(self, *exc) -> None:
        if self.remote is not None:
            self.remote.rm(self.name)
        else:
            (self.root / self.name).unlink(missing_ok=True)


def live_leases(root: Path, remote=None) -> list[str]:
    """The writers that hold a lease now ("pid P on HOST"); stale leases are deleted."""
    names = list(remote.listing(RANK_DIR)) if remote is not None else _local_names(Path(root) / RANK_DIR)
    live = []
    for name in sorted(n for n in names if LEASE.fullmatch(n)):
        rel = f"{RANK_DIR}/{name}"
        try:
            data = remote.read(rel, limit=LOCK_BYTES) if remote is not None else read_limited(root / rel, LOCK_BYTES)
            holder = json.loads(data or b"")
        except (OSError, ValueError):
            holder = None  # unreadable, or cut short: judged by nothing but its name, so kept
        if not isinstance(holder, dict):
            live.append(name)
        elif not _stale(holder):
            live.append(f"pid {untrusted(holder.get('pid'))} on {untrusted(holder.get('host'))}")
        elif remote is not None:
            remote.rm(rel)
        else:
            (Path(root) / rel).unlink(missing_ok=True)
    return live


def writers_at_work(root: Path, remote, shown, overwrite: bool) -> list[str]:
    """The live leases a committer must respect; --overwrite is refused while there are any."""
    writers = live_leases(root, remote)
    if writers and overwrite:
        raise CacheError(
            f"{shown} is being written by {len(writers)} other writer(s) ({writers[0]})",
            f"wait for them to finish; if none runs any more, delete {shown}/{RANK_DIR}/lease-*.json",
        )
    return writers


def _stale(holder: dict) -> bool:
    pid, started = holder.get("pid"), holder.get("started")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        return True
    return isinstance(started, (int, float)) and time.time() - started > LEASE_MAX_AGE_S


def _local_names(folder: Path) -> list[str]:
    if not folder.is_dir() or is_link(folder):
        return []
    return [name for name in os.listdir(folder) if not is_link(folder / name)]
