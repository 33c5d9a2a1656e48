"""The manifest: the cache's root record, every on-disk name, and the checks a reader applies.

A cache folder is untrusted input (it may be copied, downloaded, edited or damaged): the
manifest is schema-checked field by field before anything uses it, files are opened only
inside the cache and never through a symbolic link, and every failure is a CacheError that says
what is wrong. The manifest is replaced atomically and only ever names durable files.
docs/FORMAT.md is the spec; keep the two in step.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from .buckets import MAX_SIDE, MIN_SIDE, RESIZE_MODES
from .errors import CacheError, DinocacheError, untrusted
from .fileio import atomic_write_bytes, contained_file, is_link, read_limited
from .imaging import RESAMPLES
from .index import SampleTable
from .layout import storage_problems, stored_grid
from .names import (  # noqa: F401
    DEFAULT_OUT,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    NORM_FILE,
    OWNED_PATTERNS,
    RANK_DIR,
    READABLE_VERSIONS,
    SHARD_DIR,
    SHARD_SUFFIX,
    STATS_DIR,
)
from .presets import PRESETS
from .stfile import parse_json_bounded

log = logging.getLogger("dinocache")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # about a million failure records (docs/FORMAT.md)

# The names dinocache gives its own files: nothing else is ever deleted.
OWNED = {folder: re.compile(pattern) for folder, pattern in OWNED_PATTERNS.items()}  # names.py


def owned_name(file: object) -> bool:
    """Whether a cache-relative name (`shards/NAME`, `index/NAME`, ...) is one dinocache gives
    its own files: the only names it ever deletes, locally or in object storage. A record that
    names anything else (a tampered manifest) is reported, and the file left alone."""
    if not isinstance(file, str):
        return False
    folder, _, name = file.partition("/")
    return folder in OWNED and OWNED[folder].fullmatch(name) is not None


def delete_owned(root: Path, file: str) -> bool:
    """Delete the cache file a record names when its name is dinocache's own and it is a regular
    file reached through no link; returns whether it did (anything else is left alone)."""
    if not owned_name(file):
        log.warning("%s is not a file name dinocache gives its own files: it is left in place, not deleted", file)
        return False
    try:
        path = cache_path(root, file, file.split("/", 1)[0])
        if path.is_file() and not is_link(path):
            path.unlink()
            return True
    except (CacheError, OSError):
        pass
    return False


TEMP = re.compile(r"\.[^/]+\.tmp(-\d+)?")  # `.NAME.tmp` (shards) and `.NAME.tmp-PID` (atomic writes)

_SHA256 = re.compile(r"[0-9a-f]{64}")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
MAX_BUCKETS = 10_000


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest, but only with one that every reader accepts: a value that would
    fail the schema (or the size cap) is refused here, before it could make the cache unreadable."""
    problems = schema_problems(manifest)
    try:
        data = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # NaN or Infinity somewhere the schema does not look
        problems, data = problems + ["it holds NaN or Infinity, which JSON readers refuse"], b""
    if len(data) > MAX_MANIFEST_BYTES:
        problems.append(f"it would be {len(data)} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
    if problems:
        raise CacheError(
            f"not writing {root / MANIFEST_NAME}: " + "; ".join(problems[:5]),
            "this is a dinocache bug (please report it); the cache keeps its previous manifest",
        )
    atomic_write_bytes(root / MANIFEST_NAME, data)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and check a manifest; errors name the cache and say what to do."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if root.exists() and not root.is_dir():  # e.g. the manifest.json itself, or an image
        raise CacheError(
            f"{root} is a file; a cache is the folder that holds manifest.json",
            f"pass the folder: {root.parent if root.name == MANIFEST_NAME else 'the --out folder extract wrote'}",
        )
    if not root.is_dir():
        raise CacheError(
            f"cache folder {root} does not exist",
            f"run `dinocache extract DIR --out {root}` first, or pass the folder your cache is in",
        )
    if is_link(path):
        raise CacheError(
            f"{path} is a symbolic link: dinocache reads a cache's files only inside its folder",
            "replace the link with the file it points to",
        )
    if not path.is_file():
        if (root / RANK_DIR).is_dir():
            hint = f"its ranks ran without a process group (--rank/--world-size): run `dinocache merge {root}`"
        elif (root / SHARD_DIR).is_dir():
            hint = "this looks like a cache whose first run never committed; rerun the same extract to finish it"
        else:
            hint = "pass the folder given to extract --out"
        raise CacheError(f"{root} has no {MANIFEST_NAME}: it is not a dinocache cache", hint)
    try:
        manifest = parse_json_bounded(read_limited(path, MAX_MANIFEST_BYTES), MANIFEST_NAME)
    except (OSError, ValueError) as exc:
        raise CacheError(
            f"{path} is not readable: {exc}", "restore it from a backup, or rebuild the cache with extract --overwrite"
        ) from None
    problems = schema_problems(manifest)
    if problems:
        raise CacheError(
            f"{path} is not a valid manifest: " + "; ".join(problems[:5]),
            "restore it from a backup, or rebuild the cache with extract --overwrite",
        )
    return manifest


def settings_of(manifest: dict) -> dict:
    """What a cache was built with (everything that changes the stored features)."""
    return {k: manifest[k] for k in ("model", "preprocessing", "storage", "buckets")}


def schema_problems(manifest: Any) -> list[str]:
    """Every structural problem of a manifest: the parts any reader (ours or not) relies on."""
    if not isinstance(manifest, dict):
        return ["top level is not an object"]
    if manifest.get("format") != FORMAT_NAME:
        return [f"format is {_show(manifest.get('format'))}, expected {FORMAT_NAME!r}"]
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        return [
            f"format_version is {_show(version)}; this dinocache reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (a newer dinocache wrote it? upgrade)"
        ]
    problems = settings_problems(manifest, version)
    for key, kind in (("shards", list), ("samples", dict), ("failures", list), ("runs", list)):
        if not isinstance(manifest.get(key, [] if key == "runs" else None), kind):
            problems.append(f"'{key}' is missing or not {'an object' if kind is dict else 'a list'}")
    if problems:
        return problems
    problems += _shard_problems(manifest["shards"], len(manifest["buckets"]))
    problems += _file_record_problems(manifest["samples"], "samples", INDEX_DIR, count=True)
    for i, failure in enumerate(manifest["failures"]):
        problem = failure_problem(failure)
        if problem:
            problems.append(f"failures[{i}]: {problem}")
            break
    else:
        keys = [f["key"] for f in manifest["failures"]]
        if len(set(keys)) != len(keys):
            problems.append("failures list a key more than once")
    for i, run in enumerate(manifest.get("runs", [])):
        problem = run_problem(run)
        if problem:
            problems.append(f"runs[{i}]: {problem}")
            break
    statistics = manifest.get("statistics", [])
    if not isinstance(statistics, list):
        problems.append("'statistics' must be a list")
    else:
        for i, entry in enumerate(statistics):
            problems += _file_record_problems(entry, f"statistics[{i}]", STATS_DIR)
            if not problems and not (
                isinstance(entry.get("flavour"), str)
                and isinstance(entry.get("views"), str)
                and isinstance(entry.get("per_position", False), bool)
                and _is_int(entry.get("samples", 0), 0)
                and (entry.get("samples_sha256") is None or _is_sha(entry.get("samples_sha256")))
            ):
                problems.append(f"statistics[{i}] must name its flavour, views, per_position, samples and table")
            if problems:
                break
    return problems


def settings_problems(settings: Any, version: int = FORMAT_VERSION) -> list[str]:
    """The settings sections (model, preprocessing, storage, buckets) of a manifest or a rank
    report, of a cache of format `version` (a rank report: this dinocache's)."""
    if not isinstance(settings, dict):
        return ["settings are not an object"]
    problems = [
        f"'{key}' is missing or not {'an object' if kind is dict else 'a list'}"
        for key, kind in (("model", dict), ("preprocessing", dict), ("storage", dict), ("buckets", list))
        if not isinstance(settings.get(key), kind)
    ]
    if problems:
        return problems
    problems += _model_problems(settings["model"])
    problems += _preprocessing_problems(settings["preprocessing"])
    problems += storage_problems(settings["storage"], version)
    if problems:
        return problems
    return _bucket_problems(settings["buckets"], settings["model"]["patch_size"], settings["storage"].get("pool", 1))


MAX_DETAIL_CHARS = 1000  # a failure's detail sentence; longer ones are cut when recorded
MAX_FAILURE_KEY_CHARS = 8192


def failure_problem(failure: Any) -> str | None:
    """Why a failure record (manifest or rank report) is malformed, or None."""
    if not (
        isinstance(failure, dict)
        and isinstance(failure.get("key"), str)
        and 0 < len(failure["key"]) <= MAX_FAILURE_KEY_CHARS
        and isinstance(failure.get("reason"), str)
        and isinstance(failure.get("detail", ""), str)
        and _is_int(failure.get("source_bytes", 0), -1)
        and _int_value(failure.get("source_mtime_ns", 0)) is not None
    ):
        return "a failure must have a key, a reason, a detail and the source's size and mtime"
    return None


_RUN_NUMBERS = ("planned", "processed", "failed", "seconds", "images_per_second", "rank", "world_size", "oom_retries")
_RUN_TEXTS = ("started", "finished", "input_dir", "device", "tool_version", "interrupted")


def run_problem(run: Any) -> str | None:
    """Why a run record (manifest or rank report) is malformed, or None."""
    if not (
        isinstance(run, dict)
        and all(_is_number(run[k]) for k in _RUN_NUMBERS if k in run)
        and all(isinstance(run[k], str) for k in _RUN_TEXTS if k in run)
        and all(
            isinstance(run.get(k, {}), dict) and all(_is_number(v) for v in run.get(k, {}).values())
            for k in ("stage_seconds", "batch_sizes")
        )
    ):
        return "a run must be an object whose counts and times are numbers and whose names are strings"
    return None


def _model_problems(model: dict) -> list[str]:
    problems = []
    for key, low, high in (("hidden_size", 1, 1 << 16), ("num_registers", 0, 1 << 10), ("patch_size", 1, 1 << 10)):
        if not _is_int(model.get(key), low, high):
            problems.append(f"model.{key} must be an integer in {low}..{high}")
    if not isinstance(model.get("id"), str):
        problems.append("model.id must be a string")
    if not isinstance(model.get("weights_fingerprint", ""), str):
        problems.append("model.weights_fingerprint must be a string")
    if model.get("revision") is not None and not isinstance(model.get("revision"), str):
        problems.append("model.revision must be a string or null")
    if model.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
        problems.append(f"model.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    if not isinstance(model.get("config", {}), dict):
        problems.append("model.config must be an object")
    norm = model.get("final_norm")
    if norm is not None and not (
        isinstance(norm, dict)
        and norm.get("file") == NORM_FILE
        and _is_sha(norm.get("sha256"))
        and _is_number(norm.get("eps"))
    ):
        problems.append(f"model.final_norm must name {NORM_FILE} with its sha256 and eps")
    return problems


def _preprocessing_problems(prep: dict) -> list[str]:
    problems = []
    for key in ("image_mean", "image_std"):
        value = prep.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
            problems.append(f"preprocessing.{key} must be three numbers")
        elif key == "image_std" and not all(v > 0 for v in value):
            problems.append("preprocessing.image_std must be positive")
    if prep.get("resize") not in RESIZE_MODES:
        problems.append(f"preprocessing.resize must be one of {', '.join(RESIZE_MODES)}")
    if prep.get("resample", RESAMPLES[0]) not in RESAMPLES:
        problems.append(f"preprocessing.resample must be one of {', '.join(RESAMPLES)}")
    if not all(isinstance(prep.get(k, False), bool) for k in ("antialias", "normalize_before_resize", "jpeg_draft")):
        problems.append("preprocessing.antialias, normalize_before_resize and jpeg_draft must be true or false")
    if prep.get("preset") is not None and prep["preset"] not in PRESETS:
        problems.append(f"preprocessing.preset must be one of {', '.join(PRESETS)}")
    if prep.get("token_pixels") is not None and not _is_int(prep["token_pixels"], 1, MAX_SIDE):
        problems.append(f"preprocessing.token_pixels must be a whole number 1..{MAX_SIDE}")
    return problems


def _bucket_problems(buckets: list, patch: int, pool: int) -> list[str]:
    if len(buckets) > MAX_BUCKETS:
        return [f"more than {MAX_BUCKETS} buckets"]
    names = set()
    for i, b in enumerate(buckets):
        ok = (
            isinstance(b, dict)
            and b.get("index") == i
            and all(_is_int(b.get(k), MIN_SIDE, MAX_SIDE) for k in ("width", "height"))
            and all(_is_int(b.get(k), patch, MAX_SIDE) for k in ("input_width", "input_height"))
        )
        if ok:
            grid = [b["input_height"] // patch, b["input_width"] // patch]
            ok = (
                b.get("name") == f"{b['width']}x{b['height']}"
                and b["input_width"] % patch == 0
                and b["input_height"] % patch == 0
                and b.get("grid") == grid
                and b.get("stored_grid", grid) == list(stored_grid(grid, pool))
                and b["name"] not in names
            )
        if not ok:
            return [
                f"buckets[{i}] must have its index, a WxH name, sizes in {MIN_SIDE}..{MAX_SIDE} (model input a "
                f"multiple of {patch}), its grid and stored grid, and a name no other bucket has"
            ]
        names.add(b["name"])
    return []


def _shard_problems(shards: list, num_buckets: int) -> list[str]:
    seen = set()
    for i, shard in enumerate(shards):
        problems = _file_record_problems(shard, f"shards[{i}]", SHARD_DIR)
        if problems:
            return problems
        if not (_is_int(shard.get("bucket"), 0, num_buckets - 1) and _is_int(shard.get("rows"), 1, 1 << 31)):
            return [f"shards[{i}] must have a bucket of the table and a row count"]
        if shard["file"] in seen:
            return [f"shards[{i}]: {shard['file']} is listed more than once"]
        seen.add(shard["file"])
    return []


def _file_record_problems(entry: Any, where: str, folder: str, count: bool = False) -> list[str]:
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and _is_int(entry.get("bytes"), 0)
        and _is_sha(entry.get("sha256"))
        and (not count or _is_int(entry.get("count"), 0))
    ):
        return [f"{where} must have a file, bytes{', count' if count else ''} and a sha256"]
    if not _inside(entry["file"], folder):
        return [f"{where}: path {entry['file']!r} escapes the cache folder (not a plain name inside {folder}/)"]
    return []


def _inside(file: str, folder: str) -> bool:
    parts = file.split("/")
    return (
        len(parts) == 2
        and parts[0] == folder
        and parts[1] not in ("", ".", "..")
        and "\\" not in file
        and "\0" not in file
    )


def _is_int(value: Any, low: int, high: int = 1 << 62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _int_value(value: Any) -> int | None:
    """An integer written as a number or (for values beyond 2^53) a decimal string."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value):
        value = int(value)
    return value if _is_int(value, -(1 << 63), (1 << 63) - 1) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cache_path(root: Path, file: str, folder: str = SHARD_DIR) -> Path:
    """The path of a file the manifest names: a plain name inside `folder`, inside the cache,
    reached through no symbolic link (a link would let a cache make us read any file)."""
    if not isinstance(file, str) or not _inside(file, folder):
        raise CacheError(
            f"path {file!r} escapes the cache folder (not a plain name inside {folder}/)",
            "the manifest was edited or is corrupt",
        )
    return contained_file(root, file, "cache file")


def shard_path(root: Path, file: str) -> Path:
    return cache_path(root, file, SHARD_DIR)


def load_samples(root: Path, manifest: dict):
    """The manifest's sample table (memory-mapped), checked against the manifest's count and size."""
    info = manifest["samples"]
    path = cache_path(root, info["file"], INDEX_DIR)
    if not path.is_file():
        raise CacheError(f"the sample table {info['file']} is missing", "rebuild the cache with extract --overwrite")
    if path.stat().st_size != info["bytes"]:
        raise CacheError(
            f"the sample table {info['file']} has {path.stat().st_size} bytes, the manifest says {info['bytes']}",
            "rebuild the cache with extract --overwrite",
        )
    table = SampleTable.load(path)
    if len(table) != info["count"]:
        raise CacheError(
            f"the sample table holds {len(table)} samples, the manifest says {info['count']}",
            "rebuild the cache with extract --overwrite",
        )
    return table


def recorded_model(root: Path) -> dict | None:
    """The `model` record the cache in the local folder `root` (a remote cache's mirror) was
    built with; None when there is no readable cache there."""
    if not (Path(root) / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(root)
    except DinocacheError:
        return None  # the run itself reports what is wrong with the cache
    if manifest["format_version"] != FORMAT_VERSION:
        return None  # an older format is refused for that first
    return manifest["model"]


def recorded_source(manifest: dict[str, Any]) -> str | None:
    """The input folder (or source spec) of the cache's last run that recorded one."""
    for run in reversed(manifest.get("runs", [])):
        if isinstance(run, dict) and isinstance(run.get("input_dir"), str):
            return run["input_dir"]
    return None


def implicit_source(manifest: dict[str, Any]) -> str:
    """The recorded input, for a command that reopens it without being told (`show`, `verify
    --recompute`): only a local folder or local tar shards. A URL, or a list file (whose rows may
    be URLs), is refused: a cache must never choose a host for dinocache to contact."""
    from .sources import LIST_SUFFIXES, is_url

    found = recorded_source(manifest)
    if found is None:
        raise CacheError("this cache does not record where its images came from", "pass --source DIR")
    if is_url(found) or found.split("?", 1)[0].lower().endswith(LIST_SUFFIXES):
        raise CacheError(
            f"this cache's images came from {untrusted(found)}, "
            + ("a URL" if is_url(found) else "a list file (its rows may be URLs)")
            + ": dinocache contacts only hosts named on the command line",
            "pass --source with that location (or a local copy of the images) to read them",
        )
    return found
