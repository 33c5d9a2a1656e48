"""A zip of images, read in place (never extracted): `photos.zip`, local or at an fsspec URL (a
remote zip is copied whole, once, into the spool). A member's key is its path inside the zip,
as if the zip were the folder it was made from: a zip made inside a folder (`cd photos && zip -r
../photos.zip .`) and that folder give the same cache.

The central directory is the one validation point of members, like a tar's headers: only a
regular, unencrypted member, stored or deflated, whose name is a valid key (no `..`, no
absolute path), given once, whose local header agrees and whose data lies inside the file is
read; every other member with an image name is a recorded failure. A member is read by the
data offset its local header gives (its locator) and inflated never past its declared size,
which the image's header bounds (scan.max_image_bytes): a zip bomb costs what its picture may."""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import io
import os
import stat
import struct
import zipfile
import zlib
from pathlib import PurePosixPath

from ..errors import DecodeError, DinocacheError
from ..keys import key_problem
from ..scan import IMAGE_EXTENSIONS, stamp_problem
from .base import Source, SourceFile, link_out_problem, require_images, short
from .reading import decode_errors, is_url, open_range, open_regular, pread_exact, read_range, within
from .spool import spool

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra field length
_READ = 1 << 16  # compressed bytes read at a time while inflating
_MOST_INFLATED = 1032  # deflate makes at most 1032 bytes of each byte it is given (258 per 2 bits)


class ZipSource(Source):
    """Images inside one .zip. An item's locator is (data offset, compressed size, method, CRC-32)."""

    kind = "zip"
    example = "s3://bucket/photos.zip"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return PurePosixPath(spec.split("?", 1)[0]).name.lower().endswith(".zip")

    def scan(self) -> list[SourceFile]:
        with self._archive() as fh:
            zip_size = os.fstat(fh.fileno()).st_size
            members: dict[str, SourceFile] = {}
            for info in self._directory(fh):
                record = self._member(info, fh.fileno(), zip_size)
                if record is None:
                    continue
                if record.key in members:  # the same name twice: which one is the picture is ambiguous
                    detail = f"the zip holds {short(info.filename)} twice; keep one"
                    record = SourceFile(record.key, self.spec, -1, -1, ("duplicate", detail), source=self)
                members[record.key] = record
        files = sorted(members.values(), key=lambda s: s.key)
        require_images(files, self.spec)
        return files

    def _directory(self, fh) -> list[zipfile.ZipInfo]:
        """The zip's central directory. zipfile on a hostile one may raise anything: then the zip
        cannot be listed, which is an error (as a list file that does not parse)."""
        try:
            return zipfile.ZipFile(fh).infolist()
        except Exception as exc:
            raise DinocacheError(
                f"{self.spec} is not a readable zip: {type(exc).__name__}: {str(exc)[:200]}",
                "pass a .zip of images (stored or deflated members), e.g. `cd photos && zip -r ../photos.zip .`",
            ) from None

    def _archive(self):
        """The zip, opened: a remote one's spooled copy; a local one that is a link out of its
        folder is refused, as a tar's is (unless --follow-symlinks)."""
        try:
            with decode_errors(self.spec):
                if is_url(self.spec):
                    return open_regular(spool(self.spec))
                folder = os.path.realpath(os.path.dirname(self.spec) or ".")
                outside = None if self.follow_symlinks else link_out_problem(self.spec, folder)
                if outside:
                    raise DecodeError(*outside)
                return open_regular(self.spec)
        except DecodeError as exc:
            fix = "check the path, e.g. dinocache extract photos.zip"
            raise DinocacheError(f"cannot read the zip {self.spec}: {exc.detail}", fix) from None

    def _member(self, info: zipfile.ZipInfo, fd: int, zip_size: int) -> SourceFile | None:
        """One member with an image extension as an item, or as the failure it is; None for
        other members (folders, captions)."""
        name = info.filename
        if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS:
            return None
        key = name.rstrip("/")
        size, mtime_ns = info.file_size, _zip_time(info.date_time)
        problem = _member_problem(info, key)
        if problem and problem[0] == "bad_filename":
            key = key if len(key) <= 1024 else key[:1021] + "..."  # a stand-in, never used as a path
        if stamp_problem(size, mtime_ns):
            size, mtime_ns = -1, -1  # nothing the manifest could not hold is recorded
        locator = None
        if problem is None:
            locator, problem = _data_at(info, fd, zip_size)
        return SourceFile(key, self.spec, size, mtime_ns, problem, locator=locator, source=self)

    # A member is the compressed bytes [offset, offset + packed) of the zip (a remote zip's spooled copy).

    def read(self, item, limit: int | None = None) -> bytes | bytearray:
        offset, packed, method, crc = item.locator
        with decode_errors(item.path):
            if method == zipfile.ZIP_STORED:
                data = read_range(_local(item.path), offset, item.size, limit)
            else:
                within(item.size, limit)
                with open_regular(_local(item.path)) as fh:
                    raw = pread_exact(fh.fileno(), packed, offset)
                data = _inflate(raw, item.size)
        if len(data) != item.size or zlib.crc32(data) != crc:
            raise DecodeError("corrupt", "the zip member's bytes do not match its CRC-32 (a damaged zip)")
        return data

    @contextlib.contextmanager
    def open(self, item, limit: int | None = None):
        offset, packed, method, _ = item.locator
        with decode_errors(item.path):
            local = _local(item.path)
        if method == zipfile.ZIP_STORED:
            with open_range(local, offset, item.size, limit) as fh:
                yield fh
            return
        with decode_errors(item.path), open_regular(local) as fh:
            within(item.size, limit)
            yield io.BufferedReader(Inflating(fh.fileno(), offset, packed, item.size), 1 << 16)

    def sha256(self, item) -> str:
        digest, crc = hashlib.sha256(), 0
        with self.open(item) as fh:
            while block := fh.read(_READ):
                digest.update(block)
                crc = zlib.crc32(block, crc)
            if fh.tell() != item.size or crc != item.locator[3]:
                raise DecodeError("corrupt", "the zip member's bytes do not match its CRC-32 (a damaged zip)")
        return digest.hexdigest()


def _local(path: str) -> str:
    return spool(path) if is_url(path) else path


def _member_problem(info: zipfile.ZipInfo, key: str) -> tuple[str, str] | None:
    """What the central directory says is wrong with a member, before anything of it is read."""
    bad_name = key_problem(key)
    mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix, where the mode is kept
    if bad_name:
        return "bad_filename", f"{bad_name}; rename the member"
    if stat.S_ISLNK(mode):
        return "not_a_file", "a symbolic link member; only regular members are read"
    if info.is_dir() or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
        return "not_a_file", "a folder, device or FIFO member, not a regular file"
    if info.flag_bits & 0x1:
        return "unsupported", "an encrypted member; dinocache reads no passwords"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return "unsupported", f"compressed with method {info.compress_type}; only stored and deflated members are read"
    damaged = stamp_problem(info.file_size, _zip_time(info.date_time))
    if damaged:
        return "corrupt", f"its zip header is damaged: {damaged}"
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        return "corrupt", f"a stored member of {info.file_size} bytes takes {info.compress_size} (a damaged zip)"
    if not info.file_size // _MOST_INFLATED <= info.compress_size <= _deflate_bound(info.file_size):
        detail = f"{info.compress_size} compressed bytes cannot hold {info.file_size} (a damaged zip, or a bomb)"
        return "corrupt", detail
    return None


def _data_at(info: zipfile.ZipInfo, fd: int, zip_size: int):
    """(locator, None), or (None, failure) when the member's local header is not where the
    central directory says, names another file, or its data runs past the end of the zip."""
    try:
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(pread_exact(fd, 30, info.header_offset))
        local_name = bytes(pread_exact(fd, name_length, info.header_offset + 30))
    except (OSError, ValueError, OverflowError, struct.error, DecodeError):
        return None, ("corrupt", "its local header is not where the zip's directory says (a damaged zip)")
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if signature != b"PK\x03\x04" or local_name != info.orig_filename.encode(encoding):
        return None, ("corrupt", "its local header names another file than the zip's directory (a tampered zip)")
    offset = info.header_offset + 30 + name_length + extra_length
    if offset + info.compress_size > zip_size:
        return None, ("corrupt", "the zip ends inside this member (truncated zip)")
    return (offset, info.compress_size, info.compress_type, info.CRC), None


def _deflate_bound(size: int) -> int:
    """The most compressed bytes a deflate stream of `size` bytes needs (stored blocks: 5 bytes
    per 64 KiB, far under 1 in 1000), with room for any encoder's framing."""
    return size + size // 1000 + 1024


def _zip_time(date_time) -> int:
    """A member's DOS time stamp in ns (read as UTC: it is only compared with itself); 0 for a
    date that is not one (zip tools write zeros for "no date")."""
    try:
        return calendar.timegm((*date_time, 0, 0, 0)) * 1_000_000_000
    except (TypeError, ValueError, OverflowError):
        return 0


def _inflate(raw, size: int) -> bytes:
    """A deflated member's bytes: never more than `size` + 1 of them are made, so a stream that
    inflates past its declared size (a zip bomb) is refused at that size."""
    try:
        data = zlib.decompressobj(-15).decompress(raw, size + 1)
    except zlib.error as exc:
        raise DecodeError("corrupt", f"the zip member does not inflate: {exc}") from None
    if len(data) > size:
        raise DecodeError("corrupt", f"the zip member inflates past its declared {size} bytes (a zip bomb?)")
    return data


class Inflating(io.RawIOBase):
    """A deflated member as a readable, seekable file, inflated as it is read (a seek back
    starts over) and never past its declared size: a header probe inflates its header only."""

    def __init__(self, fd: int, offset: int, packed: int, size: int):
        self.fd, self.offset, self.packed, self.size = fd, offset, packed, size
        self._restart()

    def _restart(self) -> None:
        self.inflater, self.taken, self.pos = zlib.decompressobj(-15), 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = min(self.size, max(0, pos + (0, self.pos, self.size)[whence]))
        if target < self.pos:
            self._restart()
        while self.pos < target and self.readinto(bytearray(min(_READ, target - self.pos))):
            pass
        return self.pos

    def readinto(self, buffer) -> int:
        wanted, data = min(len(buffer), self.size - self.pos), b""
        try:
            while wanted > 0 and not data and not self.inflater.eof:
                pending = self.inflater.unconsumed_tail
                if not pending:
                    if self.taken >= self.packed:
                        break
                    pending = os.pread(self.fd, min(_READ, self.packed - self.taken), self.offset + self.taken)
                    if not pending:
                        raise DecodeError("corrupt", "the zip member is cut short")
                    self.taken += len(pending)
                data = self.inflater.decompress(pending, wanted)
        except zlib.error as exc:
            raise DecodeError("corrupt", f"the zip member does not inflate: {exc}") from None
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)
