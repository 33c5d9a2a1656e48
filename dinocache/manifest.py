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
SHARD_SUFFIX = ".safetensors"
LOCK_NAME = ".lock"
DEFAULT_OUT = "dinocache_out"

# Per-sample columns of manifest["samples"]: one list per column, all of the same length.
SAMPLE_COLUMNS = ("key", "shard", "row", "bucket", "source_bytes", "source_mtime_ns", "source_size", "box")


def empty_samples() -> dict[str, list]:
    return {name: [] for name in SAMPLE_COLUMNS}


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
    samples = manifest["samples"]
    lengths = {name: len(samples.get(name, ())) if isinstance(samples.get(name), list) else -1 for name in SAMPLE_COLUMNS}
    if any(n < 0 for n in lengths.values()):
        problems.append("samples is missing column(s) " + ", ".join(k for k, n in lengths.items() if n < 0))
    elif len(set(lengths.values())) > 1:
        problems.append(f"samples columns have different lengths {lengths}")
    return problems


def shard_path(root: Path, file: str) -> Path:
    """The absolute path of a shard named in the manifest, refusing names that escape the cache."""
    if not isinstance(file, str) or not file.startswith(SHARD_DIR + "/") or "\\" in file:
        raise CacheError(f"shard path {file!r} is not inside {SHARD_DIR}/", "the manifest was edited or is corrupt")
    resolved = (root / file).resolve()
    if not resolved.is_relative_to((root / SHARD_DIR).resolve()):
        raise CacheError(f"shard path {file!r} escapes the cache folder", "the manifest was edited or is corrupt")
    return resolved
