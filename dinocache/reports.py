"""Rank reports and merge: what a writer that does not commit (a rank of a multi-process run)
leaves beside its shards, and `merge`, which folds every report (and every shard no manifest
names yet) into the one manifest. Reports are written, checked and read here and nowhere else.

Trust: a report is untrusted like the rest of the cache: `rank_report_problems` checks it by the
manifest's own rules before merge uses any of it; a malformed one is left in place and ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CacheError, untrusted
from .fileio import atomic_write_bytes, is_link, read_limited, remove_folder_if_empty
from .location import CacheLocation
from .lock import CacheLock, live_leases
from .manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    RANK_DIR,
    _is_int,
    _shard_problems,
    failure_problem,
    read_manifest,
    run_problem,
    settings_of,
    settings_problems,
)
from .names import REPORT_PATTERN, rank_report_name
from .state import CacheState, check_cache_folders
from .stfile import parse_json_bounded
from .store import RemoteShards

log = logging.getLogger("dinocache")
REPORT = re.compile(REPORT_PATTERN)  # ranks/ also holds the writers' leases (lock.WriterLease)


def rank_report_problems(report: Any) -> list[str]:
    """The one check of a rank report (`ranks/rank-*.json`, untrusted like the rest of the
    cache) before merge uses any of it: the manifest's rules for every part it would copy."""
    if not isinstance(report, dict):
        return ["it is not an object"]
    problems = [f"settings: {p}" for p in settings_problems(report.get("settings"))]
    for key in ("rank", "world_size"):
        if not _is_int(report.get(key), 0, 1 << 20):
            problems.append(f"'{key}' is not a small integer")
    problem = run_problem(report.get("run"))
    if problem:
        problems.append(f"run: {problem}")
    shards, failures = report.get("shards", []), report.get("failures", [])
    if not isinstance(shards, list) or not isinstance(failures, list):
        return problems + ["'shards' and 'failures' must be lists"]
    if not problems:
        problems += _shard_problems(shards, len(report["settings"]["buckets"]))
    for i, failure in enumerate(failures):
        problem = failure_problem(failure)
        if problem:
            problems.append(f"failures[{i}]: {problem}")
            break
    return problems


def write_rank_report(state: CacheState, run: dict, rank: int, world_size: int, written: list[dict], run_id) -> None:
    """What a rank leaves for merge: its run record, the shards it wrote and the failures it
    knows, checked by merge's own rules first. The files the manifest will name besides shards
    (final_norm) are written too, so the merge that follows has them."""
    state.write_extras()
    report = {
        "rank": rank,
        "world_size": world_size,
        "settings": state.settings,
        "run": run,
        "shards": written,
        "failures": list(state.failures.values()),
    }
    problems = rank_report_problems(report)  # merge must be able to use what a rank leaves
    if problems:
        raise CacheError(f"not writing a malformed rank report: {'; '.join(problems[:3])}", "please report it")
    remote = state.store.remote  # a cache in object storage: the report goes there
    if remote is not None:
        for name, data in state.extras.items():
            if remote.size(name) != len(data):
                remote.put_file(state.root / name, name)
    name = rank_report_name(rank, run_id or uuid.uuid4().hex[:8])
    ReportFolder(state.root, remote).write(name, json.dumps(report).encode())


@dataclass
class MergeResult:
    out: Path
    shards_adopted: int = 0
    rank_reports: int = 0
    samples: int = 0
    processed: int = 0  # images extracted by the reporting ranks
    ranks: dict[int, set[int]] = field(default_factory=dict)  # world size -> the ranks that reported

    def coverage_notes(self) -> list[str]:
        """What this merge did not hear from: ranks of a --world-size that did not report (still
        running, failed, or merged before), and reports of runs with different world sizes."""
        notes = []
        if len(self.ranks) > 1:
            notes.append(
                f"reports come from runs with different --world-size ({', '.join(map(str, sorted(self.ranks)))})"
            )
        for size, seen in sorted(self.ranks.items()):
            missing = sorted(set(range(size)) - seen)
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                notes.append(
                    f"no report from rank(s) {shown} of {size} in this merge (still running, failed, or merged "
                    "before): merge again once they finish, or rerun extract to do what they did not"
                )
        return notes


class ReportFolder:
    """The ranks/ folder of a cache: in its local folder, or under its URL in object storage
    (`remote`: a report is one PUT, atomic there). Only names dinocache gives reports are read
    or deleted."""

    def __init__(self, root: Path, remote=None):
        self.root, self.remote = Path(root), remote

    def write(self, name: str, data: bytes) -> None:
        if self.remote is not None:
            self.remote.write(f"{RANK_DIR}/{name}", data)
            return
        (self.root / RANK_DIR).mkdir(exist_ok=True)
        atomic_write_bytes(self.root / RANK_DIR / name, data)

    def names(self) -> list[str]:
        if self.remote is not None:
            found = list(self.remote.listing(RANK_DIR))
        else:
            folder = self.root / RANK_DIR
            if not folder.is_dir() or is_link(folder):
                return []
            found = [name for name in os.listdir(folder) if not is_link(folder / name)]
        return sorted(name for name in found if REPORT.fullmatch(name))

    def read(self, name: str) -> bytes:
        if self.remote is None:
            return read_limited(self.root / RANK_DIR / name, MAX_MANIFEST_BYTES)
        data = self.remote.read(f"{RANK_DIR}/{name}", limit=MAX_MANIFEST_BYTES)
        if data is None:
            raise OSError("it is gone")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"it is larger than {MAX_MANIFEST_BYTES} bytes")
        return data

    def delete(self, names: list[str]) -> None:
        for name in names:
            if self.remote is not None:
                self.remote.rm(f"{RANK_DIR}/{name}")
            else:
                (self.root / RANK_DIR / name).unlink(missing_ok=True)
        if self.remote is None:
            remove_folder_if_empty(self.root / RANK_DIR)


def read_rank_reports(folder: ReportFolder) -> tuple[list[tuple[str, dict]], list[str]]:
    """The rank reports that pass `rank_report_problems`. One that does not is left in place
    (with a warning naming what is wrong) and nothing of it is used: its shards are still
    adopted on their own merits, its images are extracted again by the next run. Returns the
    good reports (name, report) and the names of those ignored."""
    reports, ignored = [], []
    for name in folder.names():
        try:
            report = parse_json_bounded(folder.read(name), name)
            problems = rank_report_problems(report)
            if problems:
                raise ValueError("; ".join(problems[:3]))
            reports.append((name, report))
        except (OSError, ValueError) as exc:
            log.warning("ignoring rank report %s: %s", name, untrusted(str(exc)))
            ignored.append(name)
    return reports, ignored


def merge_cache(root: str | Path, locked: bool = False, session=None, cleanup: bool = True) -> MergeResult:
    """Fold what the writers of a multi-process run left (shards, rank reports) into the
    manifest, in a folder or in object storage. `locked`/`session`: the caller holds the lock
    (the remote session). `cleanup=False` while writers still run (their temp files stay)."""
    from .remote import RemoteSession

    location = CacheLocation(root)
    if location.is_remote and session is None:
        with RemoteSession(location.remote) as session:
            return merge_cache(root, True, session, cleanup)
    if session is not None:
        folder, store = ReportFolder(session.mirror, session.remote), RemoteShards(session.remote, session.mirror)
    else:
        folder, store = ReportFolder(Path(root)), None
        check_cache_folders(folder.root)
    reports, ignored = read_rank_reports(folder)
    settings = _merged_settings(folder.root, reports, ignored, root)
    with contextlib.nullcontext() if locked else CacheLock(folder.root):
        cleanup = cleanup and not live_leases(folder.root, folder.remote)  # writers at work: their temp files stay
        state = CacheState.open(folder.root, settings, overwrite=False, cleanup=cleanup, store=store)
        return fold_reports(state, folder, reports)


def fold_reports(
    state: CacheState, folder: ReportFolder, reports: list[tuple[str, dict]], into: dict | None = None
) -> MergeResult:
    """Fold `reports`, and every shard no manifest names yet, into `state` (held by the one
    committer) and commit; the reports go once the manifest that names their shards is durable.
    With `into` (a job's one run record, already in state.runs: the Ray engine's thousands of
    units), the reports' counts are added to it instead of each run being kept."""
    for _, report in reports:
        if report["settings"] != state.settings:
            raise CacheError(
                f"rank report {report.get('rank')} was made with other settings than {folder.root}",
                "merge only ranks of the same command",
            )
    known = {r["file"]: r for _, report in reports for r in report.get("shards", [])}
    result = MergeResult(folder.root, shards_adopted=state.adopt_orphans(known), rank_reports=len(reports))
    for _, report in reports:
        for failure in report.get("failures", []):
            state.failures.setdefault(failure["key"], failure)
        if into is None:
            state.runs.append(report["run"])
        else:
            _add_run(into, report["run"])
        result.processed += int(report["run"].get("processed", 0))
        result.ranks.setdefault(int(report["world_size"]), set()).add(int(report["rank"]))
    cached = {r["key"] for r in state.pending}
    for key in list(state.failures):
        if key in cached or state.table.find(key) >= 0:
            state.failures.pop(key)
    state.commit()
    folder.delete([name for name, _ in reports])  # folded into the manifest, which is durable
    result.samples = len(state.table)
    return result


def _add_run(job: dict, run: dict) -> None:
    for key in ("processed", "failed", "oom_retries"):
        if key in run:
            job[key] = job.get(key, 0) + run[key]
    for stage, seconds in run.get("stage_seconds", {}).items():  # actor-seconds, summed over units
        job["stage_seconds"][stage] = round(job["stage_seconds"].get(stage, 0.0) + seconds, 3)
    job["units_done"] = job.get("units_done", 0) + 1


def _merged_settings(root: Path, reports: list, ignored: list, shown) -> dict:
    """The settings of the cache being merged: its manifest's, else the first report's."""
    if (root / MANIFEST_NAME).exists():
        return settings_of(read_manifest(root))
    if reports:
        return reports[0][1]["settings"]
    if ignored:
        raise CacheError(
            f"{shown} has no manifest, and its {len(ignored)} rank report(s) are malformed (warnings above): "
            "nothing to merge",
            "rerun the ranks' extract commands (--rank/--world-size), then merge",
        )
    raise CacheError(
        f"{shown} has neither a manifest nor rank reports: nothing to merge",
        "pass the --out folder or URL the ranks wrote to",
    )
