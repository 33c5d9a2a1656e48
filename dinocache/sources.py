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

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path, PurePosixPath

from .errors import ConfigError, DecodeError, DinocacheError
from .keys import key_problem
from .scan import IMAGE_EXTENSIONS, SourceFile, require_images, scan_folder

LIST_SUFFIXES = (".parquet", ".jsonl", ".csv")
PATH_COLUMNS = ("path", "url", "image", "file")
SPOOL_BYTES = 16 * 1024**3  # remote tars kept locally, least recently used dropped first
_BRACES = re.compile(r"\{([^{}]*)\}")


def is_url(text) -> bool:
    text = str(text)
    return "://" in text and not text.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """`data/{00000..00002}.tar` -> three names (zero padding kept); `{a,b}` lists too."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [
        name for option in options for name in expand_braces(pattern[: match.start()] + option + pattern[match.end() :])
    ]


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
        names = []
        for pattern in expand_braces(self.spec):
            if is_url(pattern):
                fs, _, found = _fsspec().get_fs_token_paths(pattern)
                names += [fs.unstrip_protocol(p) for p in found] if any(c in pattern for c in "*?[") else [pattern]
            elif any(c in pattern for c in "*?["):
                import glob

                names += [p for p in sorted(glob.glob(pattern)) if os.path.isfile(p)]
            else:
                names.append(pattern)
        if not names:
            raise DinocacheError(f"no tar files match {self.spec}", "check the pattern, e.g. data/{00000..00099}.tar")
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
        for tar in self.tars():
            files += scan_tar(tar)
        files.sort(key=lambda s: s.key)
        require_images(files, self.spec)
        return files


def scan_tar(tar: str) -> list[SourceFile]:
    """The image samples of one tar, from its headers. A member cut short, or a tar that ends in
    the middle, becomes a recorded failure; the members read before it are kept."""
    name = PurePosixPath(tar).name
    samples: dict[str, SourceFile] = {}
    failures: list[SourceFile] = []
    try:
        if is_url(tar):
            handle = _fsspec().open(tar, "rb").open()
            size = None
        else:
            handle = open(tar, "rb")
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError) as exc:
        return [SourceFile(name, tar, -1, -1, ("unreadable", f"cannot open the tar: {exc}"))]
    try:
        with handle, tarfile.open(fileobj=handle, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                base = PurePosixPath(member.name)
                stem, _, ext = base.name.partition(".")
                if "." + ext.lower().rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
                    continue
                key = f"{name}/{(base.parent / stem).as_posix()}" if str(base.parent) != "." else f"{name}/{stem}"
                if key in samples:
                    continue  # a second image of the same sample (e.g. .jpg and .png): the first wins
                problem = key_problem(key)
                record = SourceFile(
                    key,
                    tar,
                    member.size,
                    int(member.mtime) * 1_000_000_000,
                    ("bad_filename", f"{problem}; rename the member") if problem else None,
                    offset=member.offset_data,
                )
                if size is not None and member.offset_data + member.size > size:
                    record = SourceFile(
                        key,
                        tar,
                        member.size,
                        record.mtime_ns,
                        ("corrupt", "the tar ends inside this member (truncated tar)"),
                        offset=member.offset_data,
                    )
                samples[key] = record
    except (tarfile.TarError, EOFError, OSError) as exc:
        failures.append(
            SourceFile(
                f"{name}/.tar-end",
                tar,
                -1,
                -1,
                (
                    "corrupt",
                    f"the tar cannot be read past {len(samples)} sample(s): {type(exc).__name__}: {exc} (truncated?)",
                ),
            )
        )
    return list(samples.values()) + failures


class ListSource(Source):
    """A parquet, JSONL or CSV file naming images: a path/url column, optional key, width,
    height, size and mtime_ns columns. Relative paths are relative to the list file."""

    kind = "list"

    def rows(self) -> list[dict]:
        path = self.spec
        suffix = PurePosixPath(path).suffix.lower()
        opener = _fsspec().open if is_url(path) else open
        try:
            if suffix == ".parquet":
                try:
                    import pyarrow.parquet as pq
                except ImportError:
                    raise ConfigError("reading a parquet list needs pyarrow", "pip install 'dinocache[wds]'") from None
                with opener(path, "rb") as fh:
                    return pq.read_table(fh).to_pylist()
            with opener(path, "r", encoding="utf-8") as fh:
                if suffix == ".jsonl":
                    rows = []
                    for number, line in enumerate(fh, start=1):
                        if line.strip():
                            try:
                                rows.append(json.loads(line))
                            except ValueError as exc:
                                raise ConfigError(
                                    f"{path} line {number} is not JSON: {exc}", "write one object per line"
                                ) from None
                    return rows
                return list(csv.DictReader(fh))
        except FileNotFoundError:
            raise DinocacheError(
                f"list file {path} does not exist", "pass an existing .parquet, .jsonl or .csv"
            ) from None

    def scan(self) -> list[SourceFile]:
        rows = self.rows()
        base = "" if is_url(self.spec) else str(Path(self.spec).resolve().parent)
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
                    f"{self.spec} entry {number}: key {key!r} cannot be a sample key ({problem})",
                    "add a 'key' column with relative paths like 'photos/cat.jpg'",
                )
            if key in files:
                raise ConfigError(f"{self.spec} entry {number}: key {key!r} is listed twice", "keep one row per key")
            if not is_url(location) and not os.path.isabs(location):
                location = os.path.join(base, location)
            size, mtime = _int_or(row.get("size")), _int_or(row.get("mtime_ns"))
            problem = None
            if size is None or mtime is None:
                size, mtime, problem = _stat(location)
            hint = (_int_or(row.get("width")) or 0, _int_or(row.get("height")) or 0)
            files[key] = SourceFile(key, location, size, mtime, problem, hint=hint if all(hint) else None)
        out = sorted(files.values(), key=lambda s: s.key)
        require_images(out, self.spec)
        return out


def _default_list_key(location: str, base: str) -> str:
    """A list entry's key when it has no `key` column: a URL without its scheme; a local path
    relative to the list file's folder (normalised); a path outside that folder, absolute with
    its leading '/' dropped ('/data/a.jpg' -> 'data/a.jpg')."""
    if is_url(location):
        return location.split("://", 1)[1]
    if not base:
        return location
    absolute = os.path.normpath(os.path.join(base, location))
    inside = os.path.relpath(absolute, base)
    if inside != ".." and not inside.startswith(".." + os.sep):
        return PurePosixPath(Path(inside).as_posix()).as_posix()
    return Path(absolute).as_posix().lstrip("/")


def _int_or(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _stat(location: str) -> tuple[int, int, tuple[str, str] | None]:
    """(size, mtime_ns, None), or (-1, -1, (reason, detail)) for a listed file that is not there."""
    try:
        if is_url(location):
            fs, _, (path,) = _fsspec().get_fs_token_paths(location)
            info = fs.info(path)
            mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
            stamp = int(mtime.timestamp() * 1e9) if hasattr(mtime, "timestamp") else int(float(mtime) * 1e9)
            return int(info.get("size") or -1), stamp, None
        st = os.stat(location)
        return st.st_size, st.st_mtime_ns, None
    except FileNotFoundError:
        return -1, -1, ("missing", f"{location} does not exist")
    except (OSError, ValueError) as exc:
        return -1, -1, ("unreadable", f"cannot stat {location}: {getattr(exc, 'strerror', None) or exc}")


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


def read_bytes(path: str, offset: int = -1, size: int = -1) -> bytes:
    """A file's bytes, or a tar member's (`offset` >= 0): local, or through fsspec."""
    try:
        if offset < 0:
            if is_url(path):
                with _fsspec().open(path, "rb") as fh:
                    return fh.read()
            with open(path, "rb") as fh:
                return fh.read()
        local = spool(path) if is_url(path) else path
        with open(local, "rb") as fh:
            data = os.pread(fh.fileno(), size, offset)
        if len(data) != size:
            raise DecodeError("corrupt", f"the tar member is cut short ({len(data)} of {size} bytes)")
        return data
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("missing", "the file disappeared or is a broken symlink") from None
    except PermissionError:
        raise DecodeError("unreadable", "no permission to read the file") from None
    except (OSError, ValueError) as exc:
        raise DecodeError("unreadable", f"{type(exc).__name__}: {exc}") from None


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


def probe_bytes(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the upright image in `data`, from its header."""
    from .scan import probe

    return probe(io.BytesIO(data), max_pixels)


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

    def read(self, key: str) -> bytes:
        src = self.find(key)
        return read_bytes(src.path, src.offset, src.size)
