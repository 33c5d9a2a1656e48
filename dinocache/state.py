"""The cache while it is being written: the committed state (manifest + sample table), what a
run adds, atomic commits, adoption of shards that no manifest names yet, and the merge of a
multi-process run. extract.py drives it; nothing here computes features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import CacheError
from .faults import fault_point
from .index import SampleTable
from .lock import CacheLock
from .manifest import (FORMAT_NAME, FORMAT_VERSION, INDEX_DIR, MANIFEST_NAME, RANK_DIR, SHARD_DIR, SHARD_SUFFIX,
                       atomic_write_bytes, load_samples, read_manifest, write_manifest)
from .writer import sha256_file

log = logging.getLogger("dinocache")


def settings_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += settings_differences(a, b, where + ".")
        elif a != b:
            diffs.append(f"{where}: cache has {a!r}, this run has {b!r}")
    return diffs


class CacheState:
    """The cache while it is being written: the committed sample table plus what this run added.
    `commit` writes a new sample index, then the manifest that names it (both atomically)."""

    def __init__(self, root: Path, settings: dict):
        self.root = root
        self.settings = settings
        self.shards: list[dict] = []
        self.table = SampleTable.empty()
        self.pending: list[dict] = []  # sample records (with shard + row) not yet in `table`
        self.dropped: set[str] = set()  # keys to remove at the next commit (--prune)
        self.failures: dict[str, dict] = {}
        self.runs: list[dict] = []
        self.created = now()
        self.index_file: str | None = None
        self.index_info: dict | None = None  # manifest["samples"] of the committed table

    @classmethod
    def open(cls, root: Path, settings: dict, overwrite: bool, cleanup: bool = True) -> "CacheState":
        """Load the cache's committed state. `cleanup` removes temp files and unnamed sample tables:
        only for the lock holder while no other rank writes."""
        state = cls(root, settings)
        if overwrite:
            (root / MANIFEST_NAME).unlink(missing_ok=True)
            shutil.rmtree(root / SHARD_DIR, ignore_errors=True)
            shutil.rmtree(root / INDEX_DIR, ignore_errors=True)
            shutil.rmtree(root / RANK_DIR, ignore_errors=True)
        if (root / MANIFEST_NAME).exists():
            manifest = read_manifest(root)
            old = {k: manifest[k] for k in ("model", "preprocessing", "storage", "buckets")}
            diffs = settings_differences(old, settings)
            if diffs:
                raise CacheError(f"{root} was built with different settings:\n    " + "\n    ".join(diffs),
                                 "use the same options as before, another --out, or --overwrite to rebuild it")
            state.created = manifest.get("created", state.created)
            state.shards = manifest["shards"]
            state.runs = manifest.get("runs", [])
            state.table = load_samples(root, manifest)
            state.index_file = manifest["samples"]["file"]
            state.index_info = manifest["samples"]
            state.failures = {f["key"]: f for f in manifest["failures"]}
        if cleanup:
            state._remove_stale_index_files()
        return state

    def _remove_stale_index_files(self) -> None:
        """Index files of commits that died before their manifest landed (we hold the lock)."""
        for path in (self.root / INDEX_DIR).glob("*") if (self.root / INDEX_DIR).is_dir() else ():
            if f"{INDEX_DIR}/{path.name}" != self.index_file:
                path.unlink(missing_ok=True)
        for path in (self.root / SHARD_DIR).glob(".*.tmp*") if (self.root / SHARD_DIR).is_dir() else ():
            path.unlink(missing_ok=True)  # a shard write cut short: never referenced

    def cached(self, key: str) -> dict | None:
        i = self.table.find(key)
        return self.table.record(i) if i >= 0 else None

    def adopt_orphans(self, known_records: dict[str, dict] | None = None) -> int:
        """Shards that are durable on disk but not in the manifest: written by a run that died
        before committing, or by the other ranks of a multi-process run. `known_records` (from
        rank reports) spares re-hashing shards whose size still matches."""
        from safetensors import safe_open

        known_records = known_records or {}
        known = {s["file"] for s in self.shards}
        adopted = 0
        for path in sorted((self.root / SHARD_DIR).glob("*" + SHARD_SUFFIX)):
            name = f"{SHARD_DIR}/{path.name}"
            if name in known:
                continue
            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
                samples = json.loads(meta["samples"])
                bucket = samples[0]["bucket"]
                if any(s["bucket"] != bucket for s in samples) or not 0 <= bucket < len(self.settings["buckets"]):
                    raise ValueError("inconsistent bucket")
                if self.settings["buckets"][bucket]["name"] != meta.get("bucket"):
                    raise ValueError("the bucket table differs from this cache's")
            except Exception as exc:  # not ours or damaged: leave it for verify to report
                log.warning("not adopting %s: %s", name, exc)
                continue
            size = path.stat().st_size
            reported = known_records.get(name)
            digest = reported["sha256"] if reported and reported.get("bytes") == size else sha256_file(path)
            record = {"file": name, "bucket": bucket, "rows": len(samples), "bytes": size, "sha256": digest}
            self.add_shard(record, samples)
            adopted += 1
        if adopted:
            log.info("adopted %d shard(s) not yet in the manifest (other ranks, or an interrupted run)", adopted)
        return adopted

    def add_shard(self, record: dict, samples: list[dict]) -> None:
        index = len(self.shards)
        self.shards.append(record)
        for row, sample in enumerate(samples):
            # A recomputed image supersedes its old row: the old shard keeps the bytes, nobody references them.
            self.pending.append({**sample, "shard": index, "row": row})
            self.failures.pop(sample["key"], None)

    def add_failure(self, key: str, source_bytes: int, source_mtime_ns: int, reason: str, detail: str) -> None:
        self.failures[key] = {"key": key, "reason": reason, "detail": detail,
                              "source_bytes": source_bytes, "source_mtime_ns": source_mtime_ns}

    def commit(self) -> None:
        """Sample index first (new name), then the manifest that points at it, then drop the old index."""
        if self.pending or self.dropped or self.index_file is None:
            self.table = self.table.merged(self.pending, self.dropped)
            self.pending, self.dropped = [], set()
            data = self.table.to_bytes()
            name = f"{INDEX_DIR}/samples-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
            (self.root / INDEX_DIR).mkdir(exist_ok=True)
            atomic_write_bytes(self.root / name, data)
            old, self.index_file = self.index_file, name
            self.index_info = {"file": name, "count": len(self.table), "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}
        else:
            old = None
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tool_version": __version__,
            "created": self.created, "updated": now(),
            **self.settings,
            "shards": self.shards,
            "samples": self.index_info,
            "failures": [self.failures[k] for k in sorted(self.failures)],
            "runs": self.runs,
        }
        fault_point("manifest_write")
        write_manifest(self.root, manifest)
        if old and old != self.index_file:
            (self.root / old).unlink(missing_ok=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class MergeResult:
    out: Path
    shards_adopted: int = 0
    rank_reports: int = 0
    samples: int = 0
    processed: int = 0  # images extracted by the reporting ranks


def merge_cache(root: str | Path, locked: bool = False) -> MergeResult:
    """Fold what the ranks of a multi-process run wrote (shards, rank reports) into the manifest."""
    root = Path(root)
    reports = []
    for path in sorted((root / RANK_DIR).glob("*.json")) if (root / RANK_DIR).is_dir() else ():
        try:
            reports.append((path, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable rank report %s: %s", path.name, exc)
    if (root / MANIFEST_NAME).exists():
        manifest = read_manifest(root)
        settings = {k: manifest[k] for k in ("model", "preprocessing", "storage", "buckets")}
    elif reports:
        settings = reports[0][1]["settings"]
    else:
        raise CacheError(f"{root} has neither a manifest nor rank reports: nothing to merge",
                         "pass the --out folder the ranks wrote to")
    with contextlib.nullcontext() if locked else CacheLock(root):
        state = CacheState.open(root, settings, overwrite=False)
        known = {r["file"]: r for _, report in reports for r in report.get("shards", [])}
        result = MergeResult(root, shards_adopted=state.adopt_orphans(known), rank_reports=len(reports))
        for _, report in reports:
            if report.get("settings") != settings:
                raise CacheError(f"rank report {report.get('rank')} was made with other settings than {root}",
                                 "merge only ranks of the same command")
            for failure in report.get("failures", []):
                state.failures.setdefault(failure["key"], failure)
            state.runs.append(report["run"])
            result.processed += report["run"].get("processed", 0)
        cached = {r["key"] for r in state.pending}
        for key in list(state.failures):
            if key in cached or state.table.find(key) >= 0:
                state.failures.pop(key)
        state.commit()
        for path, _ in reports:
            path.unlink(missing_ok=True)
        if (root / RANK_DIR).is_dir() and not any((root / RANK_DIR).iterdir()):
            (root / RANK_DIR).rmdir()
        result.samples = len(state.table)
    return result
