"""The reading layer every source uses: a whole file (local, or a URL through fsspec) or a byte
range of a local file, read, hashed or opened for a header probe. Regular files only, never
more than the caller's limit (scan.max_image_bytes), pread in a loop, and every OS error as the
failure reason a run records."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat

from ..errors import ConfigError, DecodeError

READ_CHUNK = 64 * 1024 * 1024  # one os.pread returns at most ~2 GiB: larger reads go in a loop


def is_url(text) -> bool:
    """Whether `text` names something behind fsspec (s3://, http://, memory://...), not a local path."""
    text = str(text)
    return "://" in text and not text.startswith("file://")


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise ConfigError(
            "reading fsspec URLs needs fsspec (and s3fs for s3://)",
            "pip install 'dinocache[s3]' (or 'dinocache[wds]' for tar and parquet sources)",
        ) from None
    return fsspec


# ---- whole files: a folder's or a list's images ------------------------------------------------------


def read_file(path: str, limit: int | None = None) -> bytes:
    """A file's bytes, local or a URL; more than `limit` bytes is a too_large failure, unread
    where the size is known first."""
    with decode_errors(path):
        if is_url(path):
            with _fsspec().open(path, "rb") as fh:
                return within(fh.read(-1 if limit is None else limit + 1), limit)
        with open_regular(path) as fh:
            within(os.fstat(fh.fileno()).st_size, limit)
            return within(fh.read(-1 if limit is None else limit + 1), limit)


def hash_file(path: str) -> str:
    """The sha256 of a file's bytes, streamed (memory: one chunk)."""
    digest = hashlib.sha256()
    with decode_errors(path):
        with _fsspec().open(path, "rb") if is_url(path) else open_regular(path) as fh:
            while block := fh.read(READ_CHUNK):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def open_file(path: str, limit: int | None = None):
    """A file opened for a header probe: a URL is read in small blocks; a local file over
    `limit` bytes is refused before its header is read (some readers, WebP's, read it whole)."""
    with decode_errors(path):
        if is_url(path):
            with _fsspec().open(path, "rb", block_size=1 << 18) as fh:
                yield fh
            return
        with open_regular(path) as fh:
            within(os.fstat(fh.fileno()).st_size, limit)
            yield fh


# ---- byte ranges of a local file: archive members ----------------------------------------------------


def read_range(path: str, offset: int, size: int, limit: int | None = None) -> bytearray:
    """Bytes [offset, offset + size) of a local file (an archive member read in place)."""
    with decode_errors(path), open_regular(path) as fh:
        within(size, limit)
        return pread_exact(fh.fileno(), size, offset)


def hash_range(path: str, offset: int, size: int) -> str:
    digest = hashlib.sha256()
    with decode_errors(path), open_regular(path) as fh:
        for start in range(0, size, READ_CHUNK):
            digest.update(pread_exact(fh.fileno(), min(READ_CHUNK, size - start), offset + start))
    return digest.hexdigest()


@contextlib.contextmanager
def open_range(path: str, offset: int, size: int, limit: int | None = None):
    """Bytes [offset, offset + size) of a local file as a readable file (a window: a header
    probe reads the header, not the rest)."""
    with decode_errors(path), open_regular(path) as fh:
        within(size, limit)
        yield io.BufferedReader(Window(fh.fileno(), offset, size), 1 << 16)


class Window(io.RawIOBase):
    """Bytes [offset, offset + size) of an open file, as a file: Pillow reads a member's header
    through it without the rest of the member being read."""

    def __init__(self, fd: int, offset: int, size: int):
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos + (0, self.pos, self.size)[whence])
        return self.pos

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self.size - self.pos)
        part = os.pread(self.fd, wanted, self.offset + self.pos) if wanted > 0 else b""
        buffer[: len(part)] = part
        self.pos += len(part)
        return len(part)


def pread_exact(fd: int, size: int, offset: int) -> bytearray:
    """`size` bytes at `offset`, read in chunks into one buffer (a member over 2 GiB included)."""
    data, done = bytearray(size), 0
    while done < size:
        part = os.pread(fd, min(READ_CHUNK, size - done), offset + done)
        if not part:
            raise DecodeError("corrupt", f"the archive member is cut short ({done} of {size} bytes)")
        data[done : done + len(part)] = part
        done += len(part)
    return data


# ---- the rules every read follows ------------------------------------------------------------------


def within(data, limit: int | None):
    """`data` (bytes, or a byte count) when it is at most `limit` bytes, else a too_large failure."""
    size = data if isinstance(data, int) else len(data)
    if limit is not None and size > limit:
        raise DecodeError(
            "too_large", f"the file holds more than the {limit} bytes its image can need (a picture followed by junk?)"
        )
    return data


def open_regular(path: str):
    """A local file opened for reading only if it is a regular file: a FIFO would block the run
    and a device (/dev/zero) never end. It is opened without blocking, then checked."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a file")
            raise DecodeError("not_a_file", f"{path} is {kind}; only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


@contextlib.contextmanager
def decode_errors(path: str):
    """OS errors of a read, as the failure reasons a run records."""
    try:
        yield
    except DecodeError:
        raise
    except OSError as exc:
        raise DecodeError(*os_failure(path, exc)) from None
    except ValueError as exc:
        raise DecodeError("unreadable", f"{type(exc).__name__}: {str(exc)[:200]}") from None


def os_failure(location: str, exc: OSError) -> tuple[str, str]:
    """The recorded failure for an OSError on `location`. fsspec's HTTP store reports a host it
    cannot reach as a missing file: a connection error or timeout behind it makes it
    `unreachable` (a server that answered 404 leaves it `missing`)."""
    cause, seen = exc, 0
    while is_url(location) and cause is not None and seen < 20:  # the chain fsspec raised it from
        name = type(cause).__name__
        if isinstance(cause, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            return "unreachable", f"cannot reach {location}: {name}: {str(cause)[:200]}"
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if isinstance(exc, FileNotFoundError):
        return "missing", f"{location} does not exist"
    if isinstance(exc, PermissionError):
        return "unreadable", f"no permission to read {location}"
    return "unreadable", f"cannot read {location}: {exc.strerror or str(exc)[:200]}"
