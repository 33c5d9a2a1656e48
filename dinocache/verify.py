"""Prove a cache (or loose shards) complete and intact. Every problem is a record with a kind, the
file, the key when there is one, and a sentence; the CLI prints them or `--json`s them.

Each shard is read once, sequentially, in bounded chunks: the same pass computes its sha256,
and checks that every value is finite. Its header is checked against the layout (names, dtypes,
shapes) and, from format 2 on, its own metadata (settings, bucket, row records) against the
manifest. Without a manifest (a folder of shards, single files), each shard is checked on its
own, since shards are self-describing; what needs the manifest is listed as skipped.
"""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CacheError, DecodeError, DinocacheError
from .fileio import is_link
from .index import record_from_json
from .layout import (
    NONFINITE_BITS,
    Layout,
    parse_shard_metadata,
    shard_identity_problems,
    shard_tensor_problems,
    stored_grid,
)
from .manifest import (
    INDEX_DIR,
    MANIFEST_NAME,
    NORM_FILE,
    RANK_DIR,
    SHARD_DIR,
    SHARD_SUFFIX,
    cache_path,
    implicit_source,
    load_samples,
    read_manifest,
    settings_of,
    shard_path,
)
from .sources import is_url
from .stfile import DTYPES, SafetensorsError, SafetensorsFile

RECOMPUTE_MIN_COSINE = 0.995  # per token, stored vs recomputed (bf16 round trips give > 0.999)
CHUNK = 16 * 1024 * 1024
NEEDS_MANIFEST = ("checksums", "completeness (every image exactly once)", "superseded rows", "the sample table")


@dataclass
class Problem:
    kind: str
    message: str
    path: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class VerifyReport:
    paths: list[str] = field(default_factory=list)
    mode: str = "cache"  # "cache", or "shards" (no manifest)
    shards: int = 0
    samples: int = 0
    bytes_read: int = 0
    recomputed: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a fault
    skipped: list[str] = field(default_factory=list)  # checks that need what was not given

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, path: str | None = None, key: str | None = None) -> None:
        self.problems.append(Problem(kind, message, path, key))

    def as_dict(self) -> dict:
        return {"ok": self.ok, **{k: v for k, v in asdict(self).items()}}

    # the CLI's text form lives here too, so both say the same
    def messages(self) -> list[str]:
        return [p.message for p in self.problems]


# ---- one shard, one pass ------------------------------------------------------------------------


def scan_shard(path: Path, check_values: bool, window: int = CHUNK) -> tuple[str, SafetensorsFile, list[str], int]:
    """Read a shard once: (sha256 of the whole file, its parsed header, value problems, bytes).

    The file is memory-mapped and walked in windows: each window is hashed, and the values of
    every tensor inside it are checked, while its pages are hot; then the window is released
    (MADV_DONTNEED), so resident memory stays at one window whatever the shard's size."""
    import mmap

    header = SafetensorsFile(path)
    digest = hashlib.sha256()
    bad: set[str] = set()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise SafetensorsError("the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)
            try:
                for start in range(0, size, window):
                    stop = min(size, start + window)
                    digest.update(view[start:stop])
                    if check_values:
                        _check_window(mm, header, start, stop, bad)
                    if hasattr(mm, "madvise") and stop - start == window and window % mmap.PAGESIZE == 0:
                        mm.madvise(mmap.MADV_DONTNEED, start, window)
            finally:
                view.release()
    problems = [f"{name} contains NaN or Inf" for name in sorted(bad)]
    return digest.hexdigest(), header, problems, size


def _check_window(mm, header: SafetensorsFile, start: int, stop: int, bad: set[str]) -> None:
    """Finite-check the elements of every tensor that begin inside [start, stop) of the file
    (an element straddling `stop` belongs to the next window)."""
    for entry in header.entries.values():
        if entry.name in bad or entry.dtype not in NONFINITE_BITS:
            continue
        itemsize = DTYPES[entry.dtype][0].itemsize
        base = header.data_start + entry.start
        count = (entry.stop - entry.start) // itemsize
        first = max(0, -(-(start - base) // itemsize)) if start > base else 0
        last = min(count, -(-(stop - base) // itemsize))
        if last <= first:
            continue
        first_byte = base + first * itemsize
        if first_byte + (last - first) * itemsize > len(mm):
            continue
        data = memoryview(mm)[first_byte : first_byte + (last - first) * itemsize]
        try:
            if not _finite(data, entry.dtype):
                bad.add(entry.name)
        finally:
            data.release()


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _finite(data: memoryview, code: str) -> bool:
    """No NaN or Inf among the raw values of a tensor of safetensors `code`, from the layout's
    dtype table (layout.NONFINITE_BITS): a value is not finite exactly when its masked bits are
    all ones."""
    if code not in NONFINITE_BITS:
        return True  # integer tensors
    itemsize, mask = NONFINITE_BITS[code]
    dtype = _UINT[itemsize]
    bits = np.bitwise_and(np.frombuffer(data, dtype=dtype), dtype(mask))
    return bool(bits.max(initial=0) != mask)


# ---- entry point --------------------------------------------------------------------------------


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
    caches: list[Path] = []
    remotes: list[str] = []
    loose: list[Path] = []
    notes: list[str] = []
    for raw in paths or [Path("dinocache_out")]:
        if is_url(str(raw)):  # a cache in object storage
            remotes.append(str(raw))
            continue
        path = Path(raw)
        if path.is_dir() and (path / MANIFEST_NAME).exists():
            caches.append(path)
        elif path.is_dir() and path.name == SHARD_DIR and (path.parent / MANIFEST_NAME).exists():
            caches.append(path.parent)
            notes.append(f"{path} is the shards/ folder of the cache {path.parent}: verifying that whole cache")
        elif path.is_dir() and (path / RANK_DIR).is_dir() and not (path / MANIFEST_NAME).exists():
            raise DinocacheError(
                f"{path} has no {MANIFEST_NAME} yet: its ranks ran without a process group",
                f"run `dinocache merge {path}` first, then verify it",
            )
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_SUFFIX) and not p.name.startswith("."))
            found = [p for p in found if _not_a_shard(p) is None] or found
            if found and _not_a_shard(found[0]) is not None:
                raise DinocacheError(
                    f"{path} holds no shards: {_not_a_shard(found[0])}", "verify the cache folder itself"
                )
            if not found:
                hint = (
                    "run `dinocache extract DIR --out " + str(path) + "` first"
                    if not any(path.iterdir())
                    else "pass a cache folder, its shards/ folder, or .safetensors files"
                )
                raise DinocacheError(
                    f"{path} is not a dinocache cache (no {MANIFEST_NAME}) and holds no {SHARD_SUFFIX} files", hint
                )
            loose += found
        elif path.is_file() and path.name.endswith(SHARD_SUFFIX):
            why = _not_a_shard(path)
            if why is not None:
                raise DinocacheError(f"{path} is not a shard: {why}", "verify the cache folder, or pass shard files")
            loose.append(path)
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
    if recompute and (loose or len(caches) + len(remotes) != 1):
        raise DinocacheError("--recompute works on one cache folder", "pass a single cache folder with --recompute")
    if recompute and source is None and caches:
        source = _source_of(caches[0])
        if source is not None:
            notes.append(f"--recompute reads the images from {source}, the folder the cache was built from")
    if recompute and source is None:
        raise DinocacheError(
            "--recompute needs the images: pass --source DIR",
            "e.g. dinocache verify OUT --source data/images --recompute 20",
        )
    report = VerifyReport(paths=[str(p) for p in paths])
    report.notes += notes
    several = len(dict.fromkeys(caches)) + len(dict.fromkeys(remotes)) + bool(loose) > 1
    for root in dict.fromkeys(caches):
        first = len(report.problems)
        _verify_cache(root, report, check_values, source, recompute, seed, device, follow_symlinks)
        if several:  # say which cache each problem is in
            _name_cache(report.problems[first:], str(root))
    for url in dict.fromkeys(remotes):
        first = len(report.problems)
        _verify_remote(url, report, check_values, source, recompute, seed, device, follow_symlinks)
        if several:
            _name_cache(report.problems[first:], url)
    if loose:
        report.mode = "shards" if not caches else "mixed"
        _verify_loose(loose, report, check_values, source, follow_symlinks)
    return report


def _name_cache(problems: list[Problem], cache: str) -> None:
    for problem in problems:
        problem.message = f"{cache}: {problem.message}"
        if problem.path is not None:
            problem.path = f"{cache.rstrip('/')}/{problem.path}"


def _source_of(root: Path) -> str | None:
    """The folder a cache was built from, when it still exists here (never a URL or a list file:
    `implicit_source`)."""
    try:
        found = implicit_source(read_manifest(root))
    except DinocacheError:
        return None  # the manifest's own problems are verify's to report; --source names the rest
    return found if Path(found).is_dir() else None


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
        raise DinocacheError(
            "--recompute needs the images: pass --source DIR",
            "e.g. dinocache verify OUT --source data/images --recompute 20",
        )
    report = VerifyReport(paths=[str(root)])
    _verify_cache(Path(root), report, check_values, source, recompute, seed, device, follow_symlinks)
    return report


def _verify_remote(
    url: str,
    report: VerifyReport,
    check_values: bool,
    source,
    recompute: int,
    seed: int,
    device: str,
    follow_symlinks: bool,
) -> None:
    """A cache in object storage: its metadata pulled (and checked) into the local mirror, each
    shard streamed through a temporary local copy, unlisted objects found by listing."""
    from .remote import Remote, RemoteShards

    try:
        remote = Remote(url)
        mirror = remote.pull_metadata()
    except CacheError as exc:
        report.add("manifest", exc.message, url)
        return
    _verify_cache(
        mirror,
        report,
        check_values,
        source,
        recompute,
        seed,
        device,
        follow_symlinks,
        store=RemoteShards(remote, mirror),
    )


def _verify_cache(
    root: Path,
    report: VerifyReport,
    check_values: bool,
    source,
    recompute: int,
    seed: int,
    device: str,
    follow_symlinks: bool,
    store=None,
) -> None:
    try:
        manifest = read_manifest(root)
    except CacheError as exc:
        report.add("manifest", exc.message, str(root / MANIFEST_NAME))
        return
    shards = manifest["shards"]
    layout = Layout.from_record(manifest["storage"])
    report.shards += len(shards)
    # Shards are checked concurrently: hashing (~1.5 GB/s a core) would otherwise be slower than
    # the disk; hashlib and numpy release the GIL. Findings keep the manifest's order.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        findings = list(
            pool.map(
                lambda item: _listed_shard_findings(root, item[0], item[1], manifest, layout, check_values, store),
                enumerate(shards),
            )
        )
    for problems, read in findings:
        report.problems += problems
        report.bytes_read += read
    report.samples += manifest["samples"]["count"]
    if manifest["samples"]["count"] == 0:  # intact, but nothing a trainer can use: never a plain OK
        failed = len(manifest["failures"])
        report.add(
            "empty",
            "the cache holds no samples"
            + (f": all {failed} image(s) failed (`dinocache keys --failed` lists why)" if failed else ""),
            str(root / MANIFEST_NAME),
        )
    table_ok = _check_samples(root, manifest, report)
    _check_extra_files(root, manifest, report)
    if source is not None and table_ok and report.ok:
        table = load_samples(root, manifest)
        _check_source(str(source), table, manifest, report, follow_symlinks)
        if recompute:
            _recompute(root, str(source), table, manifest, recompute, seed, device, report, follow_symlinks)
    listed = {s.get("file") for s in shards}
    folder = root / SHARD_DIR
    names = (
        [f.removeprefix(SHARD_DIR + "/") for f in store.orphans(set())]
        if store is not None
        else (sorted(os.listdir(folder)) if folder.is_dir() and not is_link(folder) else [])
    )
    if names:
        for name in names:
            if name.endswith(SHARD_SUFFIX) and not name.startswith(".") and f"{SHARD_DIR}/{name}" not in listed:
                report.add(
                    "unlisted_shard",
                    f"{SHARD_DIR}/{name} is not in the manifest (left by an interrupted "
                    "run? rerun extract to adopt it, or delete it)",
                    f"{SHARD_DIR}/{name}",
                )


def _listed_shard_findings(
    root: Path, index: int, shard: dict, manifest: dict, layout: Layout, check_values: bool, store=None
) -> tuple[list[Problem], int]:
    """(problems, bytes read) for one shard the manifest lists; runs in a worker thread. A
    remote shard is checked through a temporary local copy."""
    local = VerifyReport()
    if store is None:
        _check_listed_shard(root, index, shard, manifest, layout, check_values, local)
        return local.problems, local.bytes_read
    name = shard["file"]
    size = store.size(name)
    if size is None or size != shard["bytes"]:
        what = "is missing" if size is None else f"has {size} bytes, the manifest says {shard['bytes']}"
        local.add(
            "missing_shard" if size is None else "size",
            f"shard {name} {what} (rerun the extract command: it recomputes its rows)",
            name,
        )
        return local.problems, 0
    try:
        with store.local_copy(name) as path:
            _check_listed_shard(root, index, shard, manifest, layout, check_values, local, path=path)
    except (CacheError, OSError) as exc:
        local.add("unreadable", f"shard {name} cannot be downloaded: {exc}", name)
    return local.problems, local.bytes_read


def _check_listed_shard(
    root: Path,
    index: int,
    shard: dict,
    manifest: dict,
    layout: Layout,
    check_values: bool,
    report: VerifyReport,
    path: Path | None = None,
) -> None:
    name = shard["file"]
    try:
        path = path or shard_path(root, name)
    except CacheError as exc:
        report.add("path", f"shard #{index}: {exc.message}", name)
        return
    if not path.is_file():
        report.add(
            "missing_shard", f"shard {name} is missing (rerun the extract command: it recomputes its rows)", name
        )
        return
    size = path.stat().st_size
    if size != shard["bytes"]:
        report.add(
            "size",
            f"shard {name} has {size} bytes, the manifest says {shard['bytes']} (truncated or "
            "replaced; rerun the extract command: it recomputes its rows)",
            name,
        )
        return
    try:
        digest, header, value_problems, read = scan_shard(path, check_values)
    except (SafetensorsError, OSError) as exc:
        report.add("unreadable", f"shard {name} is not a readable safetensors file: {exc}", name)
        return
    report.bytes_read += read
    if digest != shard["sha256"]:
        report.add(
            "checksum",
            f"shard {name} fails its sha256 checksum (corrupted on disk; rerun extract with "
            "--repair to recompute its rows)",
            name,
        )
        return
    bucket = manifest["buckets"][shard["bucket"]]
    grid = tuple(bucket.get("stored_grid", bucket["grid"]))
    model = manifest["model"]
    specs = layout.tensors(model["hidden_size"], model["num_registers"], grid)
    for problem in shard_tensor_problems(header.entries, specs, shard["rows"]) + shard_identity_problems(
        header.metadata, bucket, grid, manifest["format_version"]
    ):
        report.add(
            "layout",
            f"shard {name}: {problem} (bucket {bucket['name']}, grid {grid[0]}x{grid[1]}, "
            f"hidden {model['hidden_size']}, storage {layout.dtype})",
            name,
        )
    for problem in value_problems:
        report.add("values", f"shard {name}: {problem}", name)
    try:
        meta = parse_shard_metadata(header.metadata)
    except ValueError as exc:
        report.add("metadata", f"shard {name}: {exc}", name)
        return
    if meta.version >= 2 and manifest["format_version"] >= 2:
        wanted = {k: settings_of(manifest)[k] for k in ("model", "preprocessing", "storage")}
        if meta.settings != wanted or meta.bucket != bucket:
            report.add(
                "metadata",
                f"shard {name} was written with other settings or for another bucket than the manifest records",
                name,
            )
    if len(meta.samples) != shard["rows"]:
        report.add(
            "metadata", f"shard {name} describes {len(meta.samples)} rows, the manifest says {shard['rows']}", name
        )


def _check_samples(root: Path, manifest: dict, report: VerifyReport) -> bool:
    """The sample table: intact, keys valid, sorted and unique, every row inside its shard, no row
    twice, no sample both cached and failed. False when it cannot be read at all."""
    from .fileio import sha256_file

    info, shards = manifest["samples"], manifest["shards"]
    try:
        path = cache_path(root, info["file"], INDEX_DIR)
        if path.is_file() and sha256_file(path) != info["sha256"]:
            report.add(
                "index", f"sample table {info['file']} fails its sha256 checksum (corrupted on disk)", info["file"]
            )
            return False
        table = load_samples(root, manifest)
        table.check_keys()
    except CacheError as exc:
        report.add("index", exc.message, info["file"])
        return False
    keys = table.keys()
    for a, b in zip(keys, keys[1:]):
        if a >= b:
            if a == b:
                report.add("duplicate", f"sample {b!r} is listed more than once", info["file"], b)
            else:
                report.add("index", f"sample table is not sorted at {b!r}", info["file"], b)
    shard = np.asarray(table.columns["shard"], dtype=np.int64)
    row = np.asarray(table.columns["row"], dtype=np.int64)
    bucket = np.asarray(table.columns["bucket"], dtype=np.int64)
    bad_shard = (shard < 0) | (shard >= len(shards))
    for i in np.flatnonzero(bad_shard)[:20]:
        report.add("row", f"sample {keys[i]!r} points at shard #{shard[i]}, which does not exist", key=keys[i])
    ok = ~bad_shard
    shard_rows = np.array([s["rows"] for s in shards] or [0], dtype=np.int64)
    shard_bucket = np.array([s["bucket"] for s in shards] or [0], dtype=np.int64)
    safe_shard = np.where(ok, shard, 0)
    for i in np.flatnonzero(ok & ((row < 0) | (row >= shard_rows[safe_shard])))[:20]:
        report.add(
            "row",
            f"sample {keys[i]!r} points at row {row[i]} of {shards[shard[i]]['file']}, "
            f"which has {shard_rows[shard[i]]} rows",
            shards[shard[i]]["file"],
            keys[i],
        )
    for i in np.flatnonzero(ok & (bucket != shard_bucket[safe_shard]))[:20]:
        report.add(
            "row",
            f"sample {keys[i]!r} says bucket {bucket[i]} but its shard {shards[shard[i]]['file']} "
            f"is bucket {shard_bucket[shard[i]]}",
            shards[shard[i]]["file"],
            keys[i],
        )
    slots = shard * (1 << 32) + row
    unique, counts = np.unique(slots, return_counts=True)
    for slot in unique[counts > 1][:20]:
        owners = [keys[i] for i in np.flatnonzero(slots == slot)]
        where = shards[slot >> 32]["file"] if 0 <= slot >> 32 < len(shards) else str(slot >> 32)
        report.add("row", f"samples {', '.join(map(repr, owners))} share row {slot & 0xFFFFFFFF} of {where}", where)
    for failure in manifest["failures"]:
        if table.find(failure["key"]) >= 0:
            report.add(
                "failure_and_cached",
                f"{failure['key']!r} is both cached and recorded as failed (a sample is "
                "one or the other; rerun extract to settle it)",
                key=failure["key"],
            )
    return True


def _check_extra_files(root: Path, manifest: dict, report: VerifyReport) -> None:
    """The final-norm file and the dataset statistics the manifest names."""
    from .fileio import contained_file, sha256_file

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
    from .normstats import is_fresh, read_statistics_file

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


def _check_source(source: Path, table, manifest: dict, report: VerifyReport, follow_symlinks: bool) -> None:
    from .sources import open_source
    from .worklist import same_content

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


def _recompute(
    root: Path,
    source: Path,
    table,
    manifest: dict,
    count: int,
    seed: int,
    device: str,
    report: VerifyReport,
    follow_symlinks: bool,
) -> None:
    """Re-extract `count` random samples through the same decode path and layout as extract
    (JPEG draft, flip, layers, pool included) and compare every stored feature, token by token."""
    from .buckets import Bucket
    from .features import stored_features
    from .imaging import Preprocessing, model_input
    from .model import load_model
    from .reader import FeatureCache
    from .sources import SourceReader

    model, prep_record = manifest["model"], manifest["preprocessing"]
    prep = Preprocessing.from_record(prep_record)
    layout = Layout.from_record(manifest["storage"])
    loaded = load_model(
        model["id"],
        model.get("revision"),
        device,
        model.get("compute_dtype", "float32"),
        prep.image_mean,
        prep.image_std,
    )
    cache = FeatureCache(root, flavour=layout.normed_values)  # the stored values, as stored_features computes them
    reader = SourceReader(source, follow_symlinks)
    picks = sorted(random.Random(seed).sample(range(len(table)), min(count, len(table))))
    for i in picks:
        record = table.record(i)
        key = record["key"]
        try:
            data = reader.read(key, tuple(record["source_size"]))
        except DecodeError as exc:
            report.add("recompute", f"{key}: cannot recompute, {exc.detail}", key=key)
            continue
        if hashlib.sha256(data).hexdigest() != record["source_sha256"]:
            report.add("recompute", f"{key}: cannot recompute, the source file's content changed", key=key)
            continue
        b = manifest["buckets"][record["bucket"]]
        bucket = Bucket(b["index"], b["width"], b["height"], b["input_width"], b["input_height"], model["patch_size"])
        try:
            pixels = model_input(
                data,
                tuple(record["source_size"]),
                tuple(record["box"]),
                (bucket.input_width, bucket.input_height),
                prep,
                1 << 62,
                bucket_size=(bucket.width, bucket.height),
            )
        except DecodeError as exc:
            report.add("recompute", f"{key}: cannot recompute, {exc.detail}", key=key)
            continue
        fresh = stored_features(loaded, pixels[None], bucket.grid, layout)
        stored = cache[i]
        worst = 1.0
        for name, value in fresh.items():
            if name.endswith("_lnstats"):
                continue
            got = stored[name].reshape(value[0].shape)
            worst = min(worst, float(_cosine(got, value[0]).min()))
        if worst < RECOMPUTE_MIN_COSINE:
            report.add(
                "recompute",
                f"{key}: recomputed features differ from the stored ones (worst token cosine "
                f"{worst:.4f} < {RECOMPUTE_MIN_COSINE}): preprocessing, model or data drift",
                key=key,
            )
        report.recomputed += 1


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


# ---- loose shards (no manifest) -------------------------------------------------------------------


def _verify_loose(paths: list[Path], report: VerifyReport, check_values: bool, source, follow_symlinks: bool) -> None:
    report.skipped = [f"{what} (needs the manifest)" for what in NEEDS_MANIFEST]
    seen: dict[str, str] = {}
    for path in dict.fromkeys(paths):
        name = str(path)
        report.shards += 1
        try:
            _, header, value_problems, read = scan_shard(path, check_values)
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
        num_buckets = None
        if meta.version >= 2:
            layout = Layout.from_record(meta.settings["storage"])
            model = meta.settings["model"]
            grid = stored_grid(meta.bucket.get("grid", [0, 0]), layout.pool)
            if meta.grid != grid:
                report.add("metadata", f"{name}: metadata grid {meta.grid} disagrees with its bucket's {grid}", name)
            try:
                specs = layout.tensors(int(model["hidden_size"]), int(model["num_registers"]), grid)
            except (KeyError, TypeError, ValueError):
                report.add("metadata", f"{name}: metadata settings lack the model's hidden_size or num_registers", name)
                continue
            for problem in shard_tensor_problems(header.entries, specs, len(meta.samples)):
                report.add("layout", f"{name}: {problem}", name)
        else:
            report.notes.append(f"{name} is a format-1 shard: its tensors are checked for consistency only")
            _check_v1_tensors(name, header, meta, report)
        records = []
        for row, sample in enumerate(meta.samples):
            try:
                records.append(record_from_json(sample, num_buckets))
            except ValueError as exc:
                report.add("record", f"{name}: row {row}: {exc}", name)
                continue
            key = records[-1]["key"]
            if key in seen:
                report.add("duplicate", f"{key!r} is in both {seen[key]} and {name}", name, key)
            seen[key] = name
        report.samples += len(records)
        if source is not None:
            _check_records_against_source(str(source), records, name, report, follow_symlinks)


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


def _check_records_against_source(
    source: Path, records: list[dict], name: str, report: VerifyReport, follow_symlinks: bool
) -> None:

    from .sources import SourceReader

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
        try:
            same = bool(record["source_sha256"]) and src.source.sha256(src) == record["source_sha256"]
        except DecodeError:
            same = False
        if same:
            report.notes.append(f"{key}: touched or copied since it was extracted, same content")
        else:
            report.add("source_changed", f"{key} changed in {source} since it was extracted (in {name})", name, key)
