"""Webdataset tar shards: a `.tar` path, a glob, a `{00000..00099}` brace pattern, local or at
an fsspec URL. A sample's key is `<tar file name>/<__key__>` (webdataset's key: the member's path
up to the first dot of its file name); its first image member is the picture. Tars are never
extracted: their headers are scanned once (the one validation point of tar headers) and a
member is read in place, by the data offset its header gave (its locator); remote tars are
copied whole, once, into the local spool and read from there."""

from __future__ import annotations

import logging
import os
import re
import tarfile
from pathlib import PurePosixPath

from ..errors import ConfigError, DecodeError, DinocacheError
from ..keys import key_for_file
from ..scan import IMAGE_EXTENSIONS, stamp_problem
from .base import Source, SourceFile, link_out_problem, require_images, short
from .reading import _fsspec, decode_errors, hash_range, is_url, open_range, open_regular, os_failure, read_range
from .spool import spool

_BRACES = re.compile(r"\{([^{}]*)\}")
MAX_PATTERN_NAMES = 1_000_000  # tar names one pattern may give (webdataset sets have up to ~100k)


def expand_braces(pattern: str):
    """`data/{00000..00002}.tar` -> three names (zero padding kept); `{a,b}` lists too. Lazy: a
    pattern of 10M names costs nothing until they are asked for."""
    match = _BRACES.search(pattern)
    if not match:
        yield pattern
        return
    body = match.group(1)
    numbers = re.fullmatch(r"(\d{1,18})\.\.(\d{1,18})", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        options = (str(i).zfill(width) for i in range(int(first), int(last) + 1))
    else:
        options = iter(body.split(","))
    for option in options:
        yield from expand_braces(pattern[: match.start()] + option + pattern[match.end() :])


def _brace_count(pattern: str) -> int:
    """How many names a pattern's brace groups give, from their bounds (nothing expanded)."""
    count = 1
    for body in _BRACES.findall(pattern):
        numbers = re.fullmatch(r"(\d{1,18})\.\.(\d{1,18})", body)
        count *= max(0, int(numbers[2]) - int(numbers[1]) + 1) if numbers else len(body.split(","))
    return count


def pattern_folder(pattern: str) -> str:
    """The folder a tar path, glob or brace pattern names before its first wildcard or brace:
    the tars' source folder, out of which no link is followed (as in a folder source)."""
    literal = re.split(r"[*?\[{]", pattern, maxsplit=1)[0]
    return os.path.dirname(literal) or "."


class TarSource(Source):
    """Webdataset tar shards: local paths, fsspec URLs, brace patterns, globs."""

    kind = "tars"
    example = "s3://bucket/data/{00000..00099}.tar"

    @classmethod
    def claims(cls, spec: str) -> bool:
        name = PurePosixPath(spec.split("?", 1)[0]).name.lower()
        return name.endswith(".tar") or bool(re.search(r"\.tar(\}|$)", spec)) or (".tar" in name and "{" in spec)

    def tars(self) -> list[str]:
        """The tars the spec names that exist (local ones are looked up one by one as the
        pattern expands, so memory follows the tars found, not the names tried)."""
        names, absent, listed = [], 0, {}
        for count, pattern in enumerate(expand_braces(self.spec)):
            if count == MAX_PATTERN_NAMES or (count == 0 and _brace_count(self.spec) > MAX_PATTERN_NAMES):
                raise ConfigError(
                    f"{short(self.spec)} names more than {MAX_PATTERN_NAMES} tars",
                    "check the pattern's ranges, e.g. data/{00000..00099}.tar",
                )
            if is_url(pattern):
                fs, _, found = _fsspec().get_fs_token_paths(pattern)
                names += [fs.unstrip_protocol(p) for p in found] if any(c in pattern for c in "*?[") else [pattern]
            elif any(c in pattern for c in "*?["):
                import glob

                names += [p for p in sorted(glob.glob(pattern)) if os.path.isfile(p)]
            elif os.path.basename(pattern) in _listing(listed, os.path.dirname(pattern)):
                names.append(pattern)
            else:
                absent += 1
        if not names:
            raise DinocacheError(f"no tar files match {self.spec}", "check the pattern, e.g. data/{00000..00099}.tar")
        if absent:
            logging.getLogger("dinocache").warning("%d tar(s) that %s names do not exist", absent, self.spec)
        names = sorted(dict.fromkeys(names))
        tar_names = [PurePosixPath(n).name for n in names]
        if len(set(tar_names)) != len(tar_names):
            raise ConfigError(
                f"two tars in {self.spec} share a file name: keys would collide",
                "keys are '<tar file name>/<sample key>': give the tars distinct names",
            )
        return names

    def scan(self) -> list[SourceFile]:
        files: list[SourceFile] = []
        folder = os.path.realpath(pattern_folder(self.spec))
        for tar in self.tars():
            outside = None
            if not (self.follow_symlinks or is_url(tar)):
                outside = link_out_problem(tar, folder, f"the tars' folder {pattern_folder(self.spec)}")
            if outside:  # as in a folder: a link that leads out is a recorded failure, not read
                files.append(SourceFile(PurePosixPath(tar).name, tar, -1, -1, outside, source=self))
            else:
                files += scan_tar(tar, self)
        files.sort(key=lambda s: s.key)
        require_images(files, self.spec)
        return files

    # A member is the byte range [locator, locator + size) of its tar (a remote tar's spooled copy).

    def read(self, item, limit: int | None = None) -> bytes | bytearray:
        with decode_errors(item.path):
            return read_range(_local(item.path), item.locator, item.size, limit)

    def open(self, item, limit: int | None = None):
        with decode_errors(item.path):
            return open_range(_local(item.path), item.locator, item.size, limit)

    def sha256(self, item) -> str:
        with decode_errors(item.path):
            return hash_range(_local(item.path), item.locator, item.size)


def _local(tar: str) -> str:
    return spool(tar) if is_url(tar) else tar


# Compressed tars: members are read by offset, which only an uncompressed tar allows.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _listing(listed: dict, folder: str) -> set[str]:
    """The names in `folder`, listed once: a pattern of a million names costs set lookups, not
    a million file system calls."""
    if folder not in listed:
        try:
            listed[folder] = set(os.listdir(folder or "."))
        except OSError:
            listed[folder] = set()
    return listed[folder]


def scan_tar(tar: str, source: TarSource | None = None) -> list[SourceFile]:
    """The image samples of one tar, from its headers. Every member with an image extension
    ends as a sample or a recorded failure (a link, device or sparse member, a name given twice,
    a header whose numbers are not a size and a time, a member cut short); a tar that ends in
    the middle keeps the members read before it."""

    def failure(key: str, problem: tuple[str, str]) -> SourceFile:
        return SourceFile(key, tar, -1, -1, problem, source=source)

    name = key_for_file(PurePosixPath(tar).name)[0]  # a printable stand-in for a name that is not UTF-8
    samples: dict[str, SourceFile] = {}
    names: dict[str, str] = {}  # member name -> its sample key
    try:
        if is_url(tar):
            handle = _fsspec().open(tar, "rb").open()
            size = None
        else:
            handle = open_regular(tar)
            size = os.fstat(handle.fileno()).st_size
        magic = handle.read(6)
        handle.seek(0)
    except DecodeError as exc:
        return [failure(name, (exc.reason, exc.detail))]
    except OSError as exc:
        return [failure(name, os_failure(tar, exc))]
    except ValueError as exc:
        return [failure(name, ("unreadable", f"cannot open the tar: {str(exc)[:200]}"))]
    compression = next((kind for start, kind in _COMPRESSED.items() if magic.startswith(start)), None)
    if compression:
        handle.close()
        detail = f"the tar is {compression}-compressed; members are read by offset, so decompress it first"
        return [failure(name, ("unsupported", detail))]
    try:
        # A local tar is walked by seeking from header to header (its members' data is never
        # read here); a remote one is streamed. Headers are used once and not kept.
        with handle, tarfile.open(fileobj=handle, mode="r|" if size is None else "r:") as archive:
            while (member := archive.next()) is not None:
                archive.members.clear()
                record = _member_record(member, name, tar, size, source)
                if record is None:
                    continue
                if member.name in names:  # the same name twice: which one is the picture is ambiguous
                    detail = f"the tar holds {member.name!r} twice; keep one"
                    samples[names[member.name]] = failure(record.key, ("duplicate", detail))
                    continue
                names[member.name] = record.key
                samples.setdefault(record.key, record)  # a sample's .jpg and .png: the first wins
    except Exception as exc:  # tarfile on a hostile header may raise anything: the tar ends here
        detail = (
            f"the tar cannot be read past {len(samples)} sample(s): {type(exc).__name__}: {str(exc)[:200]} (truncated?)"
        )
        return list(samples.values()) + [failure(f"{name}/.tar-end", ("corrupt", detail))]
    return list(samples.values())


def _member_record(
    member: tarfile.TarInfo, tar_name: str, tar: str, tar_size: int | None, source: TarSource | None
) -> SourceFile | None:
    """One tar member with an image extension as a sample, or as the failure it is; None for
    other members (captions, metadata). The header is untrusted: its name, type, size and
    mtime are checked here, once."""
    base = PurePosixPath(member.name)
    stem, _, ext = base.name.partition(".")
    if "." + ext.lower().rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
        return None
    key, bad_name = key_for_file(f"{tar_name}/{(base.parent / stem).as_posix()}")
    size, mtime_ns = member.size, _seconds_to_ns(member.mtime)
    damaged = stamp_problem(size, mtime_ns)
    if damaged:
        size, mtime_ns = -1, -1  # nothing the manifest could not hold is recorded
    problem = None
    if bad_name:
        problem = ("bad_filename", f"{bad_name}; rename the member")
    elif member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        problem = ("not_a_file", f"a {kind} link member (to {short(member.linkname)}); only regular members are read")
    elif member.issparse():
        problem = ("unsupported", "a GNU sparse member; re-create the tar without --sparse")
    elif not member.isfile():
        problem = ("not_a_file", "a folder, device or FIFO member, not a regular file")
    elif damaged:
        problem = ("corrupt", f"its tar header is damaged: {damaged}")
    elif tar_size is not None and member.offset_data + size > tar_size:
        problem = ("corrupt", "the tar ends inside this member (truncated tar)")
    return SourceFile(key, tar, size, mtime_ns, problem, locator=member.offset_data, source=source)


def _seconds_to_ns(seconds) -> int | None:
    try:
        return int(seconds) * 1_000_000_000
    except (TypeError, ValueError, OverflowError):  # NaN, Infinity, garbage
        return None
