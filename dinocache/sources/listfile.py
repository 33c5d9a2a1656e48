"""A list file (parquet, JSONL or CSV) naming images by path or fsspec URL. A row's key is its
`key` column, else its path relative to the list file (outside it, its absolute path without
the leading '/'); `width`/`height` columns let plan and extract skip reading headers,
`size`/`mtime_ns` columns let reruns skip asking the store for them. The one validation point
of list rows: the file is trusted (it names what is read), its syntax and numbers are not."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, DinocacheError
from ..keys import key_problem
from ..scan import stamp_problem
from ..stfile import parse_json_bounded
from .base import Source, SourceFile, require_images, short
from .reading import _fsspec, is_url, os_failure

LIST_SUFFIXES = (".parquet", ".jsonl", ".csv")
PATH_COLUMNS = ("path", "url", "image", "file")


class ListSource(Source):
    """A parquet, JSONL or CSV file naming images: a path/url column, optional key, width,
    height, size and mtime_ns columns. Relative paths are relative to the list file."""

    kind = "list"
    example = "s3://bucket/images.parquet"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return PurePosixPath(spec.split("?", 1)[0]).name.lower().endswith(LIST_SUFFIXES)

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
                    f"{self.spec} entry {number}: key {short(key)} cannot be a sample key ({problem})",
                    "add a 'key' column with relative paths like 'photos/cat.jpg'",
                )
            if key in files:
                raise ConfigError(f"{self.spec} entry {number}: key {key!r} is listed twice", "keep one row per key")
            if not is_url(location) and not os.path.isabs(location):
                location = os.path.join(base, location)
            files[key] = _list_entry(key, location, row, self)
        out = sorted(files.values(), key=lambda s: s.key)
        require_images(out, self.spec)
        return out

    def _say_what_it_reaches(self, rows: list, base: str) -> None:
        """A list file is trusted input: it decides which files are read and which hosts are
        contacted. Before anything is read, say how many rows lead outside its folder or to URLs."""
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


def _list_entry(key: str, location: str, row: dict, source: ListSource) -> SourceFile:
    """A list row as a source: its size/mtime/width/height hints checked here, once. A hint that
    is not a whole number in range makes the row a recorded failure (size and mtime -1, which
    any manifest holds); rows without size and mtime are looked up in the store."""
    values = {}
    for name in ("size", "mtime_ns", "width", "height"):
        raw = row.get(name)
        values[name] = None if raw is None or raw == "" else _whole_number(raw)
        if values[name] is False:
            problem = ("bad_list_row", f"its {name} {short(raw)} is not a whole number")
            return SourceFile(key, location, -1, -1, problem, source=source)
    size, mtime = values["size"], values["mtime_ns"]
    width, height = values["width"], values["height"]
    if size is not None and mtime is not None:
        problem = stamp_problem(size, mtime)
        if problem:
            return SourceFile(key, location, -1, -1, ("bad_list_row", problem), source=source)
    else:
        size, mtime, problem = _stat(location)
        if problem:
            return SourceFile(key, location, size, mtime, problem, source=source)
    hint = None
    if width is not None and height is not None:
        if not (1 <= width <= MAX_HINT_SIDE and 1 <= height <= MAX_HINT_SIDE):
            detail = f"its width/height {width}x{height} is not an image size (1..{MAX_HINT_SIDE} each)"
            return SourceFile(key, location, -1, -1, ("bad_list_row", detail), source=source)
        hint = (width, height)
    return SourceFile(key, location, size, mtime, hint=hint, source=source)


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
        return -1, -1, os_failure(location, exc)
    except (ValueError, TypeError, OverflowError) as exc:
        return -1, -1, ("unreadable", f"cannot stat {location}: {str(exc)[:200]}")
    problem = stamp_problem(size, stamp)
    return (-1, -1, ("unreadable", f"{location}: {problem}")) if problem else (size, stamp, None)
