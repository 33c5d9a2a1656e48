"""--source: the images a cache (or loose shards) was extracted from, missing or changed since.
Every read goes through the sources module; the one call here that reaches an item by its path
and tar offset is in `_same_bytes` (the Source seam's to replace)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DecodeError
from .report import VerifyReport


def check_source(source: Path, table, manifest: dict, report: VerifyReport, follow_symlinks: bool) -> None:
    from ..sources import open_source
    from ..worklist import same_content

    failed = {f["key"] for f in manifest["failures"]}
    present = set()
    restamped = 0
    for src in open_source(str(source), follow_symlinks=follow_symlinks).scan():
        present.add(src.key)
        i = table.find(src.key) if not src.problem else -1
        if i < 0:
            if src.key not in failed:
                report.add("source_missing", f"{src.key} is in {source} but not in the cache", key=src.key)
            continue
        cols = table.columns
        recorded_bytes = int(cols["source_bytes"][i])
        if recorded_bytes == src.size and int(cols["source_mtime_ns"][i]) == src.mtime_ns:
            continue
        if same_content(src, recorded_bytes, cols["source_sha256"][i].tobytes().hex()):  # the rule extract uses
            restamped += 1
        else:
            report.add("source_changed", f"{src.key} changed in {source} since it was extracted", key=src.key)
    if restamped:
        report.notes.append(
            f"{restamped} image(s) in {source} have a new modification time but the same content (a copy?); "
            "extract keeps their features and records the new time"
        )
    gone = [key for key in table.iter_keys() if key not in present]
    if gone:
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        report.notes.append(f"{len(gone)} cached image(s) are no longer in {source}: {shown}")


def check_records_against_source(
    source: Path, records: list[dict], name: str, report: VerifyReport, follow_symlinks: bool
) -> None:
    """Loose shards: each row record against the image its key names."""
    from ..sources import SourceReader

    reader = SourceReader(source, follow_symlinks)
    for record in records:
        key = record["key"]
        try:
            src = reader.find(key)
        except DecodeError as exc:
            report.add("source_missing", f"{key} (in {name}): {exc.detail}", name, key)
            continue
        if src.size == record["source_bytes"] and src.mtime_ns == record["source_mtime_ns"]:
            continue
        if _same_bytes(src, record):
            report.notes.append(f"{key}: touched or copied since it was extracted, same content")
        else:
            report.add("source_changed", f"{key} changed in {source} since it was extracted (in {name})", name, key)


def _same_bytes(src, record: dict) -> bool:
    """The item's content hashes to what was recorded (False when it cannot be read)."""
    try:
        return bool(record["source_sha256"]) and src.source.sha256(src) == record["source_sha256"]
    except DecodeError:
        return False
