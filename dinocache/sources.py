"""Where the images come from, behind one interface: a folder (scan.py), webdataset tar shards, or
a list file (parquet, JSONL or CSV) of paths or fsspec URLs.

    source = open_source("data/{00000..00099}.tar")     # or a folder, or "images.parquet"
    files = source.scan()                                # sorted SourceFile records
    data = read_bytes(files[0])                          # what a decode worker does

A tar sample's key is `<tar file name>/<__key__>` (webdataset's key: the member's path up to the
first dot of its file name); its first image member is the picture. Members are read by the
offset recorded when the tar's headers were scanned (tars are never extracted); remote tars
are copied whole, once, into a local spool and read from there. A list entry's key is its
`key` column (else its path relative to the list file, or outside it its absolute path without
the leading '/'); `width`/`height` columns let plan and extract skip
reading headers, `size`/`mtime_ns` columns let reruns skip asking the store for them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import stat
import tarfile
from pathlib import Path, PurePosixPath

from .errors import ConfigError, DecodeError, DinocacheError
from .keys import key_for_file, key_problem
from .scan import (
    IMAGE_EXTENSIONS,
    SourceFile,
    link_out_problem,
    max_image_bytes,
    require_images,
    scan_folder,
    stamp_problem,
)
from .stfile import parse_json_bounded

LIST_SUFFIXES = (".parquet", ".jsonl", ".csv")
PATH_COLUMNS = ("path", "url", "image", "file")
SPOOL_BYTES = 16 * 1024**3  # remote tars kept locally, least recently used dropped first
_BRACES = re.compile(r"\{([^{}]*)\}")


def is_url(text) -> bool:
    text = str(text)
    return "://" in text and not text.startswith("file://")


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


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise ConfigError(
            "reading fsspec URLs needs fsspec (and s3fs for s3://)",
            "pip install 'dinocache[s3]' (or 'dinocache[wds]' for tar and parquet sources)",
        ) from None
    return fsspec


class Source:
    kind = "folder"

    def __init__(self, spec: str, exclude=(), follow_symlinks: bool = False):
        self.spec, self.exclude, self.follow_symlinks = spec, list(exclude), follow_symlinks

    def scan(self) -> list[SourceFile]:
        files = scan_folder(self.spec, self.exclude, self.follow_symlinks)
        require_images(files, self.spec)
        self._warn_about_excluded_images()
        return files

    def _warn_about_excluded_images(self) -> None:
        """The output folder inside the input is left out of the scan; say so when that hides
        images (an --out pointed at a subfolder of pictures by mistake)."""
        import logging

        root = os.path.realpath(self.spec)
        for folder in self.exclude:
            real = os.path.realpath(folder)
            if real == root or os.path.commonpath([root, real]) != root:
                continue
            hidden = sum(
                os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for _, _, names in os.walk(real) for name in names
            )  # 0 for a folder not made yet
            if hidden:
                logging.getLogger("dinocache").warning(
                    "%d image(s) under %s are left out: it is the output folder (--out); put the cache outside "
                    "the image folder to include them",
                    hidden,
                    folder,
                )
            else:  # it works (the scan leaves it out), but the cache now travels with every copy of the images
                logging.getLogger("dinocache").warning(
                    "the output folder %s is inside the image folder %s: the scan leaves it out, but copying or "
                    "syncing the images carries the cache along; keep caches beside the data, not in it",
                    folder,
                    self.spec,
                )

    def describe(self) -> str:
        return str(Path(self.spec).resolve()) if not is_url(self.spec) else self.spec


class TarSource(Source):
    """Webdataset tar shards: local paths, fsspec URLs, brace patterns, globs."""

    kind = "tars"

    def tars(self) -> list[str]:
        """The tars the spec names that exist (local ones are looked up one by one as the
        pattern expands, so memory follows the tars found, not the names tried)."""
        names, absent, listed = [], 0, {}
        for count, pattern in enumerate(expand_braces(self.spec)):
            if count == MAX_PATTERN_NAMES or (count == 0 and _brace_count(self.spec) > MAX_PATTERN_NAMES):
                raise ConfigError(
                    f"{_short(self.spec)} names more than {MAX_PATTERN_NAMES} tars",
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
            import logging

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
                files.append(SourceFile(PurePosixPath(tar).name, tar, -1, -1, outside))
            else:
                files += scan_tar(tar)
        files.sort(key=lambda s: s.key)
        require_images(files, self.spec)
        return files


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


def scan_tar(tar: str) -> list[SourceFile]:
    """The image samples of one tar, from its headers. Every member with an image extension
    ends as a sample or a recorded failure (a link, device or sparse member, a name given twice,
    a header whose numbers are not a size and a time, a member cut short); a tar that ends in
    the middle keeps the members read before it."""
    name = key_for_file(PurePosixPath(tar).name)[0]  # a printable stand-in for a name that is not UTF-8
    samples: dict[str, SourceFile] = {}
    names: dict[str, str] = {}  # member name -> its sample key
    failures: list[SourceFile] = []
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
        return [SourceFile(name, tar, -1, -1, (exc.reason, exc.detail))]
    except OSError as exc:
        return [SourceFile(name, tar, -1, -1, _os_failure(tar, exc))]
    except ValueError as exc:
        return [SourceFile(name, tar, -1, -1, ("unreadable", f"cannot open the tar: {str(exc)[:200]}"))]
    compression = next((kind for start, kind in _COMPRESSED.items() if magic.startswith(start)), None)
    if compression:
        handle.close()
        detail = f"the tar is {compression}-compressed; members are read by offset, so decompress it first"
        return [SourceFile(name, tar, -1, -1, ("unsupported", detail))]
    try:
        # A local tar is walked by seeking from header to header (its members' data is never
        # read here); a remote one is streamed. Headers are used once and not kept.
        with handle, tarfile.open(fileobj=handle, mode="r|" if size is None else "r:") as archive:
            while (member := archive.next()) is not None:
                archive.members.clear()
                record = _member_record(member, name, tar, size)
                if record is None:
                    continue
                if member.name in names:  # the same name twice: which one is the picture is ambiguous
                    detail = f"the tar holds {member.name!r} twice; keep one"
                    record = SourceFile(record.key, tar, -1, -1, ("duplicate", detail))
                    samples[names[member.name]] = record
                    continue
                names[member.name] = record.key
                samples.setdefault(record.key, record)  # a sample's .jpg and .png: the first wins
    except Exception as exc:  # tarfile on a hostile header may raise anything: the tar ends here
        failures.append(
            SourceFile(
                f"{name}/.tar-end",
                tar,
                -1,
                -1,
                (
                    "corrupt",
                    f"the tar cannot be read past {len(samples)} sample(s): {type(exc).__name__}: "
                    f"{str(exc)[:200]} (truncated?)",
                ),
            )
        )
    return list(samples.values()) + failures


def _member_record(member: tarfile.TarInfo, tar_name: str, tar: str, tar_size: int | None) -> SourceFile | None:
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
        problem = ("not_a_file", f"a {kind} link member (to {_short(member.linkname)}); only regular members are read")
    elif member.issparse():
        problem = ("unsupported", "a GNU sparse member; re-create the tar without --sparse")
    elif not member.isfile():
        problem = ("not_a_file", "a folder, device or FIFO member, not a regular file")
    elif damaged:
        problem = ("corrupt", f"its tar header is damaged: {damaged}")
    elif tar_size is not None and member.offset_data + size > tar_size:
        problem = ("corrupt", "the tar ends inside this member (truncated tar)")
    return SourceFile(key, tar, size, mtime_ns, problem, offset=member.offset_data)


def _seconds_to_ns(seconds) -> int | None:
    try:
        return int(seconds) * 1_000_000_000
    except (TypeError, ValueError, OverflowError):  # NaN, Infinity, garbage
        return None


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ListSource(Source):
    """A parquet, JSONL or CSV file naming images: a path/url column, optional key, width,
    height, size and mtime_ns columns. Relative paths are relative to the list file."""

    kind = "list"

    def rows(self) -> list[dict]:
        """The list's rows. The file is trusted (it names what is read) but not its syntax: every
        way it can fail to parse is a ConfigError that names the line."""
        path = self.spec
        suffix = PurePosixPath(path).suffix.lower()
        opener = _fsspec().open if is_url(path) else open
        fix = "pass a .parquet, .jsonl (one JSON object per line) or .csv file with a 'path' column"
        try:
            if suffix == ".parquet":
                try:
                    import pyarrow.parquet as pq
                except ImportError:
                    raise ConfigError("reading a parquet list needs pyarrow", "pip install 'dinocache[wds]'") from None
                with opener(path, "rb") as fh:
                    try:
                        return pq.read_table(fh).to_pylist()
                    except Exception as exc:  # pyarrow's errors: a corrupt or truncated file
                        raise ConfigError(f"{path} is not a readable parquet file: {str(exc)[:200]}", fix) from None
            with opener(path, "rb") as fh:
                if suffix == ".jsonl":
                    return [_json_row(line, f"{path} line {n}") for n, line in enumerate(fh, start=1) if line.strip()]
                reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", newline=""))
                try:
                    return list(reader)
                except (csv.Error, UnicodeDecodeError) as exc:
                    raise ConfigError(f"{path} line {reader.line_num + 1} is not CSV: {str(exc)[:200]}", fix) from None
        except FileNotFoundError:
            raise DinocacheError(f"list file {path} does not exist", fix) from None
        except OSError as exc:  # a folder, no permission
            raise DinocacheError(f"cannot read the list file {path}: {exc.strerror or exc}", fix) from None

    def scan(self) -> list[SourceFile]:
        rows = self.rows()
        base = "" if is_url(self.spec) else str(Path(self.spec).resolve().parent)
        self._say_what_it_reaches(rows, base)
        files: dict[str, SourceFile] = {}
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise ConfigError(f"{self.spec} entry {number} is not a record", "one object (row) per image")
            column = next((c for c in PATH_COLUMNS if row.get(c)), None)
            if column is None:
                raise ConfigError(
                    f"{self.spec} entry {number} has no {' / '.join(PATH_COLUMNS)} column",
                    "name each image's path or URL in a 'path' column",
                )
            location = str(row[column])
            key = str(row.get("key") or _default_list_key(location, base))
            problem = key_problem(key)
            if problem:
                raise ConfigError(
                    f"{self.spec} entry {number}: key {_short(key)} cannot be a sample key ({problem})",
                    "add a 'key' column with relative paths like 'photos/cat.jpg'",
                )
            if key in files:
                raise ConfigError(f"{self.spec} entry {number}: key {key!r} is listed twice", "keep one row per key")
            if not is_url(location) and not os.path.isabs(location):
                location = os.path.join(base, location)
            files[key] = _list_entry(key, location, row)
        out = sorted(files.values(), key=lambda s: s.key)
        require_images(out, self.spec)
        return out

    def _say_what_it_reaches(self, rows: list, base: str) -> None:
        """A list file is trusted input: it decides which files are read and which hosts are
        contacted. Before anything is read, say how many rows lead outside its folder or to URLs."""
        import logging

        outside, urls = [], []
        for row in rows:
            column = next((c for c in PATH_COLUMNS if isinstance(row, dict) and row.get(c)), None)
            location = str(row[column]) if column else ""
            if is_url(location):
                urls.append(location)
            elif location and base and _outside(location, base):
                outside.append(location)
        if outside or urls:
            logging.getLogger("dinocache").info(
                "%s names %d file(s) outside its folder (e.g. %s) and %d URL(s) (e.g. %s): a list file is "
                "trusted input, dinocache reads and fetches what it names",
                self.spec,
                len(outside),
                outside[0] if outside else "-",
                len(urls),
                urls[0] if urls else "-",
            )


def _default_list_key(location: str, base: str) -> str:
    """A list entry's key when it has no `key` column: a URL without its scheme; a local path
    relative to the list file's folder (normalised); a path outside that folder, absolute with
    its leading '/' dropped ('/data/a.jpg' -> 'data/a.jpg')."""
    if is_url(location):
        return location.split("://", 1)[1]
    if not base:
        return location
    absolute = os.path.normpath(os.path.join(base, location))
    if not _outside(location, base):
        return PurePosixPath(Path(os.path.relpath(absolute, base)).as_posix()).as_posix()
    return Path(absolute).as_posix().lstrip("/")


def _outside(location: str, base: str) -> bool:
    """Whether a list row's local path leads outside the list's folder (absolute, or ../)."""
    inside = os.path.relpath(os.path.normpath(os.path.join(base, location)), base)
    return inside == ".." or inside.startswith(".." + os.sep)


def _json_row(line: bytes, where: str):
    try:
        return parse_json_bounded(line, where)
    except ValueError as exc:
        raise ConfigError(str(exc), 'write one JSON object per line, e.g. {"path": "photos/cat.jpg"}') from None


MAX_HINT_SIDE = 1 << 30  # what a sample record holds for a width or height


def _list_entry(key: str, location: str, row: dict) -> SourceFile:
    """A list row as a source: its size/mtime/width/height hints checked here, once. A hint that
    is not a whole number in range makes the row a recorded failure (size and mtime -1, which
    any manifest holds); rows without size and mtime are looked up in the store."""
    values = {}
    for name in ("size", "mtime_ns", "width", "height"):
        raw = row.get(name)
        values[name] = None if raw is None or raw == "" else _whole_number(raw)
        if values[name] is False:
            return SourceFile(
                key, location, -1, -1, ("bad_list_row", f"its {name} {_short(raw)} is not a whole number")
            )
    size, mtime = values["size"], values["mtime_ns"]
    width, height = values["width"], values["height"]
    if size is not None and mtime is not None:
        problem = stamp_problem(size, mtime)
        if problem:
            return SourceFile(key, location, -1, -1, ("bad_list_row", problem))
    else:
        size, mtime, problem = _stat(location)
        if problem:
            return SourceFile(key, location, size, mtime, problem)
    hint = None
    if width is not None and height is not None:
        if not (1 <= width <= MAX_HINT_SIDE and 1 <= height <= MAX_HINT_SIDE):
            detail = f"its width/height {width}x{height} is not an image size (1..{MAX_HINT_SIDE} each)"
            return SourceFile(key, location, -1, -1, ("bad_list_row", detail))
        hint = (width, height)
    return SourceFile(key, location, size, mtime, hint=hint)


def _whole_number(value) -> int | bool:
    """A list cell as an integer (an int, an integral float, or its decimal text), else False."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return False
    if isinstance(value, float) and value.is_integer():  # NaN and Infinity are not
        return int(value)
    return False


def _stat(location: str) -> tuple[int, int, tuple[str, str] | None]:
    """(size, mtime_ns, None), or (-1, -1, (reason, detail)) for a listed file that is not there,
    cannot be reached, or whose store reports a size or time no record can hold."""
    try:
        if is_url(location):
            fs, _, (path,) = _fsspec().get_fs_token_paths(location)
            info = fs.info(path)
            mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
            stamp = int(mtime.timestamp() * 1e9) if hasattr(mtime, "timestamp") else int(float(mtime) * 1e9)
            size = info.get("size")
            size = size if isinstance(size, int) else -1
        else:
            st = os.stat(location)
            size, stamp = st.st_size, st.st_mtime_ns
    except OSError as exc:
        return -1, -1, _os_failure(location, exc)
    except (ValueError, TypeError, OverflowError) as exc:
        return -1, -1, ("unreadable", f"cannot stat {location}: {str(exc)[:200]}")
    problem = stamp_problem(size, stamp)
    return (-1, -1, ("unreadable", f"{location}: {problem}")) if problem else (size, stamp, None)


def _os_failure(location: str, exc: OSError) -> tuple[str, str]:
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


def open_source(spec: str | Path, exclude=(), follow_symlinks: bool = False) -> Source:
    """A folder, tar shards (a .tar path, URL, glob or brace pattern), or a list file."""
    text = str(spec)
    name = PurePosixPath(text.split("?", 1)[0]).name.lower()
    if name.endswith(".tar") or re.search(r"\.tar(\}|$)", text) or (".tar" in name and "{" in text):
        return TarSource(text, exclude, follow_symlinks)
    if name.endswith(LIST_SUFFIXES):
        return ListSource(text, exclude, follow_symlinks)
    if is_url(text):
        raise ConfigError(
            f"{text}: a remote source must be tar shards or a list file",
            "pass e.g. s3://bucket/data/{00000..00099}.tar or s3://bucket/images.parquet",
        )
    return Source(text, exclude, follow_symlinks)


# ---- reading ----------------------------------------------------------------------------------------


READ_CHUNK = 64 * 1024 * 1024  # one os.pread returns at most ~2 GiB: larger reads go in a loop


def read_bytes(path: str, offset: int = -1, size: int = -1, limit: int | None = None) -> bytes | bytearray:
    """A file's bytes, or a tar member's (`offset` >= 0): local, or through fsspec. Never more
    than `limit` bytes are read (a larger image is a "too_large" failure: scan.max_image_bytes),
    and only regular local files are opened."""
    with _decode_errors(path):
        if offset < 0 and is_url(path):
            with _fsspec().open(path, "rb") as fh:
                return _within(fh.read(-1 if limit is None else limit + 1), limit)
        local = spool(path) if is_url(path) else path
        with open_regular(local) as fh:
            if offset >= 0:
                _within(size, limit)
                return _pread_exact(fh.fileno(), size, offset)
            _within(os.fstat(fh.fileno()).st_size, limit)
            return _within(fh.read(-1 if limit is None else limit + 1), limit)


def _within(data, limit: int | None):
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


def _pread_exact(fd: int, size: int, offset: int) -> bytearray:
    """`size` bytes at `offset`, read in chunks into one buffer (a member over 2 GiB included)."""
    data, done = bytearray(size), 0
    while done < size:
        part = os.pread(fd, min(READ_CHUNK, size - done), offset + done)
        if not part:
            raise DecodeError("corrupt", f"the tar member is cut short ({done} of {size} bytes)")
        data[done : done + len(part)] = part
        done += len(part)
    return data


def sha256_source(path: str, offset: int = -1, size: int = -1) -> str:
    """The sha256 of a file's or a tar member's bytes, streamed (memory: one chunk)."""
    digest = hashlib.sha256()
    with _decode_errors(path):
        if offset < 0 and is_url(path):
            with _fsspec().open(path, "rb") as fh:
                while block := fh.read(READ_CHUNK):
                    digest.update(block)
            return digest.hexdigest()
        with open_regular(spool(path) if is_url(path) else path) as fh:
            if offset < 0:
                while block := fh.read(READ_CHUNK):
                    digest.update(block)
            else:
                for start in range(0, size, READ_CHUNK):
                    digest.update(_pread_exact(fh.fileno(), min(READ_CHUNK, size - start), offset + start))
    return digest.hexdigest()


@contextlib.contextmanager
def _decode_errors(path: str):
    """OS errors of a read, as the failure reasons a run records."""
    try:
        yield
    except DecodeError:
        raise
    except OSError as exc:
        raise DecodeError(*_os_failure(path, exc)) from None
    except ValueError as exc:
        raise DecodeError("unreadable", f"{type(exc).__name__}: {str(exc)[:200]}") from None


class _Member(io.RawIOBase):
    """Bytes [offset, offset + size) of an open tar, as a file: Pillow reads a member's header
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


@contextlib.contextmanager
def open_image(path: str, offset: int = -1, size: int = -1, limit: int | None = None):
    """A readable file of one image, for a header probe: a regular local file, a tar member (a
    window on the tar, so only the header is read) or a URL (read in small blocks). A file over
    `limit` bytes is refused before its header is read (some readers, WebP's, read it whole)."""
    with _decode_errors(path):
        if offset < 0 and is_url(path):
            with _fsspec().open(path, "rb", block_size=1 << 18) as fh:
                yield fh
            return
        with open_regular(spool(path) if is_url(path) else path) as fh:
            _within(size if offset >= 0 else os.fstat(fh.fileno()).st_size, limit)
            yield io.BufferedReader(_Member(fh.fileno(), offset, size), 1 << 16) if offset >= 0 else fh


def spool_dir() -> Path:
    return Path(os.environ.get("DINOCACHE_SPOOL", Path.home() / ".cache" / "dinocache" / "spool"))


def spool(url: str) -> str:
    """A local copy of a remote tar (downloaded whole, once, sequentially; shared by the decode
    workers through an atomic rename; the least recently used copies go past SPOOL_BYTES)."""
    folder = spool_dir()
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".tar")
    if local.exists():
        os.utime(local)
        return str(local)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    with _fsspec().open(url, "rb") as src, open(tmp, "wb") as dst:
        while block := src.read(16 * 1024 * 1024):
            dst.write(block)
    os.replace(tmp, local)
    _trim_spool(folder, keep=local)
    return str(local)


def _trim_spool(folder: Path, keep: Path) -> None:
    copies = sorted((p for p in folder.glob("*.tar")), key=lambda p: p.stat().st_atime)
    total = sum(p.stat().st_size for p in copies)
    for path in copies:
        if total <= SPOOL_BYTES:
            break
        if path != keep:
            total -= path.stat().st_size
            path.unlink(missing_ok=True)


class SourceReader:
    """Key -> the source's record and bytes, for verify --source and show. A folder is read
    through keys.source_path (confined to it); tars and lists are scanned once."""

    def __init__(self, spec: str | Path, follow_symlinks: bool = False):
        self.source = open_source(spec, follow_symlinks=follow_symlinks)
        self.spec, self.follow_symlinks = str(spec), follow_symlinks
        self._index: dict[str, SourceFile] | None = None

    def files(self) -> list[SourceFile]:
        return self.source.scan()

    def find(self, key: str) -> SourceFile:
        """The source record of `key` (DecodeError "missing" or "outside_source" when none)."""
        if self.source.kind == "folder":
            from .keys import source_path

            path = source_path(self.spec, key, self.follow_symlinks)
            try:
                st = os.stat(path)
            except OSError:
                raise DecodeError("missing", f"{key} is not in {self.spec}") from None
            return SourceFile(key, str(path), st.st_size, st.st_mtime_ns)
        if self._index is None:
            self._index = {s.key: s for s in self.source.scan()}
        if key not in self._index:
            raise DecodeError("missing", f"{key} is not in {self.spec}")
        return self._index[key]

    def read(self, key: str, source_size: tuple[int, int] | None = None) -> bytes | bytearray:
        """The bytes of `key`; with its recorded (width, height), no more than such an image needs."""
        src = self.find(key)
        limit = max_image_bytes(*source_size) if source_size else None
        return read_bytes(src.path, src.offset, src.size, limit)
