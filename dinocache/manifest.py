"""The manifest: the cache's index, its format version and every on-disk name, in one place.

The manifest is replaced atomically (temp file -> fsync -> rename -> fsync dir), and only ever
references shards that are already durable. docs/FORMAT.md is the spec; keep the two in step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CacheError

FORMAT_NAME = "dinocache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
INDEX_DIR = "index"
RANK_DIR = "ranks"  # reports of the ranks of a multi-process run, until merged into the manifest  # the sample table (dinocache/index.py), one file per committed generation
SHARD_SUFFIX = ".safetensors"
LOCK_NAME = ".lock"
DEFAULT_OUT = "dinocache_out"

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(root / MANIFEST_NAME, json.dumps(manifest, separators=(",", ":")).encode())


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and sanity-check a manifest; errors name the cache and say what to do."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise CacheError(f"cache folder {root} does not exist",
                         f"run `dinocache extract DIR --out {root}` first, or pass the folder your cache is in")
    if not path.is_file():
        raise CacheError(f"{root} has no {MANIFEST_NAME}: it is not a dinocache cache (or its first run never finished a shard)",
                         "pass the folder given to extract --out, or rerun extract to finish the cache")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path} is not readable JSON: {exc}", "restore it from a backup or rerun extract with --overwrite") from None
    problems = schema_problems(manifest)
    if problems:
        raise CacheError(f"{path} is not a valid manifest: " + "; ".join(problems[:5]),
                         "rerun extract with --overwrite to rebuild the cache")
    return manifest


def schema_problems(manifest: Any) -> list[str]:
    """Structural problems of a manifest (the parts every reader relies on)."""
    if not isinstance(manifest, dict):
        return ["top level is not an object"]
    if manifest.get("format") != FORMAT_NAME:
        return [f"format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}"]
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        return [f"format_version is {version!r}; this dinocache reads version {FORMAT_VERSION} (upgrade dinocache?)"]
    problems = []
    for key, kind in (("model", dict), ("preprocessing", dict), ("storage", dict), ("buckets", list),
                      ("shards", list), ("samples", dict), ("failures", list)):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"'{key}' is missing or not a {kind.__name__}")
    if problems:
        return problems
    model = manifest["model"]
    for key, low in (("hidden_size", 1), ("num_registers", 0), ("patch_size", 1)):
        if not _is_int(model.get(key), low):
            problems.append(f"model.{key} must be an integer >= {low}")
    if not isinstance(model.get("id"), str):
        problems.append("model.id must be a string")
    storage = manifest["storage"]
    if storage.get("dtype") not in ("bfloat16", "float16", "float32", "float8_e4m3fn") \
            or not isinstance(storage.get("registers"), bool) or not _is_int(storage.get("pool", 1), 1, 64) \
            or not all(_is_int(k, 1, 1000) for k in storage.get("layers", [])):
        problems.append("storage must have a known dtype, a registers flag, a pool of 1..64 and block numbers")
    samples = manifest["samples"]
    for key, kind in (("file", str), ("count", int), ("bytes", int), ("sha256", str)):
        if not isinstance(samples.get(key), kind) or isinstance(samples.get(key), bool):
            problems.append(f"samples.{key} is missing or not a {kind.__name__}")
    for i, bucket in enumerate(manifest["buckets"]):
        grid = bucket.get("grid") if isinstance(bucket, dict) else None
        stored = bucket.get("stored_grid", grid) if isinstance(bucket, dict) else None
        if not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(g, 1, 1 << 16) for g in grid)
                and isinstance(stored, list) and len(stored) == 2 and all(_is_int(g, 1, 1 << 16) for g in stored)
                and isinstance(bucket.get("name"), str) and bucket.get("index") == i
                and all(_is_int(bucket.get(k), 1, 1 << 20) for k in ("width", "height", "input_width", "input_height"))):
            problems.append(f"buckets[{i}] must have its index, a name, sizes and a [rows, cols] grid")
            break
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("sha256"), str)
                and _is_int(shard.get("bucket"), 0, len(manifest["buckets"]) - 1)
                and _is_int(shard.get("rows"), 0) and _is_int(shard.get("bytes"), 0)):
            problems.append(f"shards[{i}] must have a file, a bucket of the table, rows, bytes and sha256")
            break
    for i, failure in enumerate(manifest["failures"]):
        if not isinstance(failure, dict) or not isinstance(failure.get("key"), str) or not isinstance(failure.get("reason"), str):
            problems.append(f"failures[{i}] must have a key and a reason")
            break
    return problems


def _is_int(value: Any, low: int, high: int = 1 << 62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def cache_path(root: Path, file: str, folder: str = SHARD_DIR) -> Path:
    """The absolute path of a file named in the manifest, refusing names that escape `folder`."""
    if not isinstance(file, str) or not file.startswith(folder + "/") or "\\" in file or "\0" in file:
        raise CacheError(f"path {file!r} is not inside {folder}/", "the manifest was edited or is corrupt")
    resolved = (root / file).resolve()
    if not resolved.is_relative_to((root / folder).resolve()):
        raise CacheError(f"path {file!r} escapes the cache folder", "the manifest was edited or is corrupt")
    return resolved


def shard_path(root: Path, file: str) -> Path:
    return cache_path(root, file, SHARD_DIR)


def load_samples(root: Path, manifest: dict):
    """The manifest's sample table (memory-mapped), checked against the manifest's count and size."""
    from .index import SampleTable

    info = manifest["samples"]
    path = cache_path(root, info["file"], INDEX_DIR)
    if not path.is_file():
        raise CacheError(f"the sample index {info['file']} is missing", "rerun extract to rebuild the cache")
    if path.stat().st_size != info["bytes"]:
        raise CacheError(f"the sample index {info['file']} has {path.stat().st_size} bytes, the manifest says "
                         f"{info['bytes']}", "rerun extract with --overwrite")
    table = SampleTable.load(path)
    if len(table) != info["count"]:
        raise CacheError(f"the sample index holds {len(table)} samples, the manifest says {info['count']}",
                         "rerun extract with --overwrite")
    return table
