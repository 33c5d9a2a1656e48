"""Loose shards (no manifest): each checked on its own, since shards are self-describing; what
needs the manifest is listed as skipped."""

from __future__ import annotations

from pathlib import Path

from ..index import record_from_json
from ..layout import Layout, parse_shard_metadata, shard_tensor_problems, stored_grid
from ..stfile import SafetensorsError, SafetensorsFile
from .bytescan import scan_shard
from .report import VerifyOptions, VerifyReport
from .source import check_records_against_source

NEEDS_MANIFEST = ("checksums", "completeness (every image exactly once)", "superseded rows", "the sample table")


def verify_loose(paths: list[Path], report: VerifyReport, options: VerifyOptions) -> None:
    report.skipped = [f"{what} (needs the manifest)" for what in NEEDS_MANIFEST]
    seen: dict[str, str] = {}  # key -> the shard it was first found in
    for path in dict.fromkeys(paths):
        name = str(path)
        report.shards += 1
        try:
            _, header, value_problems, read = scan_shard(path, options.check_values)
        except (SafetensorsError, OSError) as exc:
            report.add("unreadable", f"{name} is not a readable safetensors file: {exc}", name)
            continue
        report.bytes_read += read
        for problem in value_problems:
            report.add("values", f"{name}: {problem}", name)
        try:
            meta = parse_shard_metadata(header.metadata)
        except ValueError as exc:
            report.add("metadata", f"{name}: {exc}", name)
            continue
        if not _check_tensors(name, header, meta, report):
            continue
        records = _row_records(name, meta, report, seen)
        report.samples += len(records)
        if options.source is not None:
            check_records_against_source(str(options.source), records, name, report, options.follow_symlinks)


def _check_tensors(name: str, header: SafetensorsFile, meta, report: VerifyReport) -> bool:
    """The tensors against the layout the shard's own settings describe (format 2 on); False
    when the settings cannot describe it."""
    if meta.version < 2:
        report.notes.append(f"{name} is a format-1 shard: its tensors are checked for consistency only")
        _check_v1_tensors(name, header, meta, report)
        return True
    layout = Layout.from_record(meta.settings["storage"])
    model = meta.settings["model"]
    grid = stored_grid(meta.bucket.get("grid", [0, 0]), layout.pool)
    if meta.grid != grid:
        report.add("metadata", f"{name}: metadata grid {meta.grid} disagrees with its bucket's {grid}", name)
    try:
        specs = layout.tensors(int(model["hidden_size"]), int(model["num_registers"]), grid)
    except (KeyError, TypeError, ValueError):
        report.add("metadata", f"{name}: metadata settings lack the model's hidden_size or num_registers", name)
        return False
    for problem in shard_tensor_problems(header.entries, specs, len(meta.samples)):
        report.add("layout", f"{name}: {problem}", name)
    return True


def _row_records(name: str, meta, report: VerifyReport, seen: dict[str, str]) -> list[dict]:
    """The shard's row records that parse; a key already seen in another shard is a duplicate."""
    records = []
    for row, sample in enumerate(meta.samples):
        try:
            records.append(record_from_json(sample, None))
        except ValueError as exc:
            report.add("record", f"{name}: row {row}: {exc}", name)
            continue
        key = records[-1]["key"]
        if key in seen:
            report.add("duplicate", f"{key!r} is in both {seen[key]} and {name}", name, key)
        seen[key] = name
    return records


def _check_v1_tensors(name: str, header: SafetensorsFile, meta, report: VerifyReport) -> None:
    entries = header.entries
    if "cls" not in entries or "patches" not in entries:
        report.add("layout", f"{name}: a shard holds at least cls and patches", name)
        return
    n, dim = entries["cls"].shape[0], entries["cls"].shape[-1]
    rows, cols = meta.grid
    if entries["patches"].shape != (n, rows * cols, dim):
        report.add(
            "layout",
            f"{name}: patches has shape {list(entries['patches'].shape)}, expected "
            f"{[n, rows * cols, dim]} for its {rows}x{cols} grid",
            name,
        )
    if n != len(meta.samples):
        report.add("layout", f"{name}: {n} rows of tensors, {len(meta.samples)} row records", name)
