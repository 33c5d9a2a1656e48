"""What each path given to verify is (a cache, a cache's shards/ folder, a cache in object
storage, loose shards), and the run over all of them: `verify_paths`, the CLI's entry point."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import DinocacheError
from ..location import CacheLocation
from ..manifest import MANIFEST_NAME, NORM_FILE, RANK_DIR, SHARD_DIR, SHARD_SUFFIX, implicit_source, read_manifest
from ..stfile import SafetensorsError, SafetensorsFile
from .cache import check_cache, needs_source
from .loose import verify_loose
from .remote import verify_remote
from .report import Problem, VerifyOptions, VerifyReport


@dataclass
class Targets:
    """The paths sorted by kind, in the order given."""

    caches: list[Path] = field(default_factory=list)
    remotes: list[str] = field(default_factory=list)
    loose: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_paths(
    paths: list[str | Path],
    check_values: bool = True,
    source: str | Path | None = None,
    recompute: int = 0,
    seed: int = 0,
    device: str = "auto",
    follow_symlinks: bool = False,
) -> VerifyReport:
    """Verify what each path is: a cache folder, a cache's shards/ folder (the whole cache is
    verified), a folder of shards without a manifest, or single shard files. A path that is
    none of these is a usage error (DinocacheError)."""
    targets = classify_paths(paths)
    options = _with_recompute_source(
        targets, VerifyOptions(check_values, source, recompute, seed, device, follow_symlinks)
    )
    report = VerifyReport(paths=[str(p) for p in paths])
    report.notes += targets.notes
    checks = [(str(root), check_cache, root) for root in dict.fromkeys(targets.caches)]
    checks += [(url, verify_remote, url) for url in dict.fromkeys(targets.remotes)]
    several = len(checks) + bool(targets.loose) > 1
    for name, check, where in checks:
        first = len(report.problems)
        check(where, report, options)
        if several:  # say which cache each problem is in
            _name_cache(report.problems[first:], name)
    if targets.loose:
        report.mode = "shards" if not targets.caches else "mixed"
        verify_loose(targets.loose, report, options)
    return report


def classify_paths(paths: list[str | Path]) -> Targets:
    targets = Targets()
    for raw in paths or [Path("dinocache_out")]:
        if CacheLocation(raw).is_remote:  # a cache in object storage
            targets.remotes.append(str(raw))
        else:
            _classify_local(Path(raw), targets)
    return targets


def _classify_local(path: Path, targets: Targets) -> None:
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        targets.caches.append(path)
    elif path.is_dir() and path.name == SHARD_DIR and (path.parent / MANIFEST_NAME).exists():
        targets.caches.append(path.parent)
        targets.notes.append(f"{path} is the shards/ folder of the cache {path.parent}: verifying that whole cache")
    elif path.is_dir() and (path / RANK_DIR).is_dir() and not (path / MANIFEST_NAME).exists():
        raise DinocacheError(
            f"{path} has no {MANIFEST_NAME} yet: its ranks ran without a process group",
            f"run `dinocache merge {path}` first, then verify it",
        )
    elif path.is_dir():
        targets.loose += _shards_in(path)
    elif path.is_file() and path.name.endswith(SHARD_SUFFIX):
        why = _not_a_shard(path)
        if why is not None:
            raise DinocacheError(f"{path} is not a shard: {why}", "verify the cache folder, or pass shard files")
        targets.loose.append(path)
    elif path.exists():
        raise DinocacheError(
            f"{path} is not a cache folder or a {SHARD_SUFFIX} shard",
            "pass a cache folder, its shards/ folder, or shard files",
        )
    else:
        raise DinocacheError(
            f"{path} does not exist",
            "pass the folder given to extract --out (default ./dinocache_out), its shards/ folder, or shard files",
        )


def _shards_in(path: Path) -> list[Path]:
    """The shards of a folder without a manifest (a usage error when it holds none)."""
    found = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_SUFFIX) and not p.name.startswith("."))
    found = [p for p in found if _not_a_shard(p) is None] or found
    if found and _not_a_shard(found[0]) is not None:
        raise DinocacheError(f"{path} holds no shards: {_not_a_shard(found[0])}", "verify the cache folder itself")
    if not found:
        hint = (
            "run `dinocache extract DIR --out " + str(path) + "` first"
            if not any(path.iterdir())
            else "pass a cache folder, its shards/ folder, or .safetensors files"
        )
        raise DinocacheError(
            f"{path} is not a dinocache cache (no {MANIFEST_NAME}) and holds no {SHARD_SUFFIX} files", hint
        )
    return found


def _with_recompute_source(targets: Targets, options: VerifyOptions) -> VerifyOptions:
    """--recompute works on one cache and needs its images: --source, else the folder the cache
    was built from when it is still here."""
    if not options.recompute:
        return options
    if targets.loose or len(targets.caches) + len(targets.remotes) != 1:
        raise DinocacheError("--recompute works on one cache folder", "pass a single cache folder with --recompute")
    if options.source is None and targets.caches:
        found = _source_of(targets.caches[0])
        if found is not None:
            targets.notes.append(f"--recompute reads the images from {found}, the source the cache was built from")
            options = replace(options, source=found)
    if options.source is None:
        raise needs_source()
    return options


def _name_cache(problems: list[Problem], cache: str) -> None:
    for problem in problems:
        problem.message = f"{cache}: {problem.message}"
        if problem.path is not None:
            problem.path = f"{cache.rstrip('/')}/{problem.path}"


def _source_of(root: Path) -> str | None:
    """The local source a cache was built from (a folder, a zip, tar shards), when it is still
    here (never a URL or a list file: `implicit_source`). A tar pattern is taken as it is: a
    shard gone since is reported per sample."""
    try:
        found = implicit_source(read_manifest(root))
    except DinocacheError:
        return None  # the manifest's own problems are verify's to report; --source names the rest
    return found if Path(found).exists() or any(c in found for c in "*?[{") else None


def _not_a_shard(path: Path) -> str | None:
    """Why a .safetensors file is not a dinocache shard (None when it is one, or unreadable: a
    damaged shard is verify's to report)."""
    try:
        meta = SafetensorsFile(path).metadata
    except SafetensorsError:
        return None
    kind = meta.get("format")
    if kind == "dinocache":
        return None
    if kind == "dinocache-samples":
        return "it is a cache's sample table"
    if kind == "dinocache-statistics":
        return "it is a cache's dataset statistics"
    if path.name == NORM_FILE or set(meta) == {"eps"}:
        return "it is a cache's final-norm file"
    return "it is a safetensors file that dinocache did not write"
