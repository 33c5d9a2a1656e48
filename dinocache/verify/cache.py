"""One cache with its manifest: every listed shard (concurrently), the sample table, the files
the manifest names, shards it does not list, and then --source and --recompute."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CacheError, DinocacheError
from ..fileio import is_link
from ..layout import Layout
from ..manifest import MANIFEST_NAME, SHARD_DIR, SHARD_SUFFIX, load_samples, read_manifest
from .listed import ListedShards
from .recompute import recompute
from .report import VerifyOptions, VerifyReport
from .source import check_source
from .table import check_samples


def needs_source() -> DinocacheError:
    return DinocacheError(
        "--recompute needs the images: pass --source DIR",
        "e.g. dinocache verify OUT --source data/images --recompute 20",
    )


def verify_cache(
    root: str | Path,
    check_values: bool = True,
    source: str | Path | None = None,
    recompute: int = 0,
    seed: int = 0,
    device: str = "auto",
    follow_symlinks: bool = False,
) -> VerifyReport:
    """Check one cache folder (never raises for a damaged cache: problems are reported)."""
    if recompute and source is None:
        raise needs_source()
    report = VerifyReport(paths=[str(root)])
    check_cache(Path(root), report, VerifyOptions(check_values, source, recompute, seed, device, follow_symlinks))
    return report


def check_cache(root: Path, report: VerifyReport, options: VerifyOptions, store=None) -> None:
    """Everything verify checks in one cache; `store` reads a remote cache's shards."""
    try:
        manifest = read_manifest(root)
    except CacheError as exc:
        report.add("manifest", exc.message, str(root / MANIFEST_NAME))
        return
    listed = ListedShards(root, manifest, Layout.from_record(manifest["storage"]), options.check_values, store)
    report.shards += len(manifest["shards"])
    for problems, read in listed.all_findings():
        report.problems += problems
        report.bytes_read += read
    report.samples += manifest["samples"]["count"]
    _check_not_empty(root, manifest, report)
    table_ok = check_samples(root, manifest, report)
    _check_extra_files(root, manifest, report)
    if options.source is not None and table_ok and report.ok:
        table = load_samples(root, manifest)
        check_source(str(options.source), table, manifest, report, options.follow_symlinks)
        if options.recompute:
            recompute(root, table, manifest, report, options)
    _check_unlisted_shards(root, manifest, report, store)


def _check_not_empty(root: Path, manifest: dict, report: VerifyReport) -> None:
    if manifest["samples"]["count"] == 0:  # intact, but nothing a trainer can use: never a plain OK
        failed = len(manifest["failures"])
        report.add(
            "empty",
            "the cache holds no samples"
            + (f": all {failed} image(s) failed (`dinocache keys --failed` lists why)" if failed else ""),
            str(root / MANIFEST_NAME),
        )


def _check_unlisted_shards(root: Path, manifest: dict, report: VerifyReport, store) -> None:
    listed = {s.get("file") for s in manifest["shards"]}
    folder = root / SHARD_DIR
    names = (
        [f.removeprefix(SHARD_DIR + "/") for f in store.orphans(set())]
        if store is not None
        else (sorted(os.listdir(folder)) if folder.is_dir() and not is_link(folder) else [])
    )
    for name in names:
        if name.endswith(SHARD_SUFFIX) and not name.startswith(".") and f"{SHARD_DIR}/{name}" not in listed:
            report.add(
                "unlisted_shard",
                f"{SHARD_DIR}/{name} is not in the manifest (left by an interrupted "
                "run? rerun extract to adopt it, or delete it)",
                f"{SHARD_DIR}/{name}",
            )


def _check_extra_files(root: Path, manifest: dict, report: VerifyReport) -> None:
    """The final-norm file and the dataset statistics the manifest names."""
    from ..fileio import contained_file, sha256_file

    norm = manifest["model"].get("final_norm")
    if norm is not None:
        try:
            path = contained_file(root, norm["file"], "final-norm file")
            if not path.is_file():
                report.add("missing_file", f"{norm['file']} is missing (rerun extract to rewrite it)", norm["file"])
            elif sha256_file(path) != norm["sha256"]:
                report.add(
                    "checksum", f"{norm['file']} fails its sha256 checksum (rerun extract to rewrite it)", norm["file"]
                )
        except CacheError as exc:
            report.add("path", exc.message, norm["file"])
    _check_statistics(root, manifest, report)


def _check_statistics(root: Path, manifest: dict, report: VerifyReport) -> None:
    from ..normstats import is_fresh, read_statistics_file

    stale = []
    for entry in manifest.get("statistics", []):
        try:
            read_statistics_file(root, manifest, entry)  # the reader's own check
        except CacheError as exc:
            report.add("statistics", exc.message, entry["file"])
        if not is_fresh(entry, manifest["samples"]["sha256"]):
            stale.append(f"{entry['file']} ({entry.get('flavour')})")
    if stale:  # one note, however many statistics files
        report.notes.append(
            f"statistics {', '.join(stale)} {'is' if len(stale) == 1 else 'are'} stale: the cache changed "
            "since they were computed; rerun `dinocache norm-stats`"
        )


def _listed_shard_findings(
    root: Path, index: int, shard: dict, manifest: dict, layout: Layout, check_values: bool, store=None
):
    """verify's check of one listed shard, for `state.find_damage` (--repair)."""
    return ListedShards(root, manifest, layout, check_values, store).findings(index, shard)
