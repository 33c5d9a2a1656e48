"""The cache while it is being written: the committed state (manifest + sample table), what a
run adds, atomic commits, adoption of shards that no manifest names yet, repair of damaged
shards. extract.py drives it (reports.py: the merge of a multi-process run); nothing here
computes features.

Trust: every file this module deletes is one the cache's own records name, or one whose name
follows dinocache's own patterns, directly inside the cache's real folders (never through a
link); a shard is adopted only if its metadata matches the run's settings in full and its
tensors match the layout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ._version import __version__
from .errors import CacheError
from .faults import fault_point
from .fileio import (
    atomic_write_bytes,
    is_link,
    real_folder,
    remove_folder_if_empty,
    remove_owned,
    sha256_file,
)
from .index import SampleTable, record_from_json
from .layout import FORMAT_NAME, FORMAT_VERSION, Layout, parse_shard_metadata, shard_tensor_problems
from .manifest import (
    INDEX_DIR,
    MANIFEST_NAME,
    MAX_DETAIL_CHARS,
    NORM_FILE,
    OWNED,
    RANK_DIR,
    SHARD_DIR,
    STATS_DIR,
    TEMP,
    delete_owned,
    load_samples,
    read_manifest,
    settings_of,
    write_manifest,
)
from .names import table_name
from .stfile import SafetensorsError, SafetensorsFile
from .store import LocalShards
from .verify import _listed_shard_findings  # repair applies verify's own check of a listed shard

log = logging.getLogger("dinocache")
CACHE_FOLDERS = (SHARD_DIR, INDEX_DIR, RANK_DIR, STATS_DIR)


def settings_differences(old, new, prefix: str = "") -> list[str]:
    """The fields that differ, one line each (`buckets[3].width: cache has 832, this run has 896`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new), key=str):
            diffs += settings_differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return diffs
    if (
        isinstance(old, list)
        and isinstance(new, list)
        and len(old) == len(new)
        and any(isinstance(v, (dict, list)) for v in old + new)
        and _names(old) == _names(new)  # the same buckets in the same order: say which field changed
    ):
        diffs = []
        for i, (a, b) in enumerate(zip(old, new)):
            diffs += settings_differences(a, b, f"{prefix}[{i}]")
        return diffs
    if old != new:
        return [f"{prefix}: cache has {_brief(old)}, this run has {_brief(new)}"]
    return []


MODEL_NAMES = ("id", "revision", "weights_fingerprint")  # how a model was named: compared by `model_differences`


def model_differences(old, new) -> list[str]:
    """How two manifest `model` records differ as models. Everything that shapes the features
    must be equal; the model itself is the same when its weights' fingerprints are (however its
    path was spelled, wherever the folder is). A record without a fingerprint (a Hub id, random
    weights, a cache from dinocache < 0.3) is matched by its id and revision, a local path by
    the folder it resolves to."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return settings_differences(old, new, "model")
    from .families import family_of_record

    if family_of_record(old) != family_of_record(new):  # then every config field differs: say why
        return [
            f"model.family: cache has {_brief(family_of_record(old))}, this run has {_brief(family_of_record(new))}"
        ]
    diffs = settings_differences(
        {k: v for k, v in old.items() if k not in MODEL_NAMES},
        {k: v for k, v in new.items() if k not in MODEL_NAMES},
        "model",
    )
    if old.get("weights_fingerprint") and new.get("weights_fingerprint"):
        if old["weights_fingerprint"] != new["weights_fingerprint"]:
            diffs.append(
                f"model: the cache holds features of {_brief(old.get('id'))}, and {_brief(new.get('id'))} "
                "has other weights (fingerprint differs)"
            )
    elif not same_model_name(old, new):
        diffs.append(f"model.id: cache has {_brief(old.get('id'))}, this run has {_brief(new.get('id'))}")
    return diffs


def same_model_name(old: dict, new: dict) -> bool:
    """The same id and revision, or two spellings of one existing local folder or file."""
    if old.get("revision") != new.get("revision"):
        return False
    a, b = old.get("id"), new.get("id")
    if a == b:
        return True
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def cache_settings_differences(old: dict, new: dict) -> list[str]:
    """`settings_differences` of two settings (model, preprocessing, storage, buckets), the model
    compared as a model (`model_differences`)."""
    rest = sorted((set(old) | set(new)) - {"model"})
    return model_differences(old.get("model"), new.get("model")) + settings_differences(
        {k: old.get(k) for k in rest}, {k: new.get(k) for k in rest}
    )


def _names(items: list) -> list | None:
    return [v.get("name") if isinstance(v, dict) else None for v in items]


def _brief(value) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return (
            f"{len(value)} buckets ({', '.join(str(v['name']) for v in value[:6])}{', ...' if len(value) > 6 else ''})"
        )
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_cache_folders(root: Path) -> None:
    """The cache's own folders must be real folders inside it (never links), so that nothing
    dinocache writes or deletes lands elsewhere."""
    for name in CACHE_FOLDERS:
        real_folder(root / name, f"the cache's {name}/ folder")
    if is_link(root / MANIFEST_NAME):
        raise CacheError(
            f"{root / MANIFEST_NAME} is a symbolic link: dinocache writes and reads a cache's files only "
            "inside its folder",
            "replace the link with the file it points to",
        )


@dataclass
class Damage:
    """Shards whose bytes are not what the manifest recorded: index -> why."""

    shards: dict[int, str] = field(default_factory=dict)
    lost_keys: list[str] = field(default_factory=list)  # live rows of those shards
    checked: int = 0
    hashed: bool = False


class CacheState:
    """The cache while it is being written: the committed sample table plus what this run added.
    `commit` writes a new sample table, then the manifest that names it (both atomically)."""

    def __init__(self, root: Path, settings: dict, extras: dict | None = None, store: LocalShards | None = None):
        check_cache_folders(root)  # every writer, the ranks of --rank/--world-size included
        self.root = root
        self.store = store or LocalShards(root)
        self.settings = settings
        self.layout = Layout.from_record(settings["storage"])
        self.extras = extras or {}  # files the manifest names besides shards: {name: bytes} (final_norm)
        self.shards: list[dict] = []
        self.table = SampleTable.empty()
        self.pending: list[dict] = []  # sample records (with shard + row) not yet in `table`
        self.dropped: set[str] = set()  # keys to remove at the next commit (--prune, images that failed)
        self.failures: dict[str, dict] = {}
        self.runs: list[dict] = []
        self.statistics: list[dict] = []
        self.created = now()
        self.index_file: str | None = None
        self.index_info: dict | None = None  # manifest["samples"] of the committed table

    @classmethod
    def open(
        cls,
        root: Path,
        settings: dict,
        overwrite: bool,
        cleanup: bool = True,
        extras: dict | None = None,
        store: LocalShards | None = None,
    ) -> "CacheState":
        """Load the cache's committed state. `cleanup` removes temp files and unnamed sample
        tables: only for the lock holder while no other rank writes."""
        state = cls(root, settings, extras, store)
        if overwrite:
            clear_cache(root)
            if store is not None and hasattr(store, "clear"):
                store.clear()
        if (root / MANIFEST_NAME).exists():
            manifest = read_manifest(root)
            if manifest["format_version"] != FORMAT_VERSION:
                raise CacheError(
                    f"{root} was written by an older dinocache (format {manifest['format_version']}); "
                    f"this one writes format {FORMAT_VERSION} and reads the old one, but does not add to it",
                    "rebuild it with --overwrite, or extract into another --out",
                )
            diffs = cache_settings_differences(settings_of(manifest), settings)
            if diffs:
                shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
                raise CacheError(
                    f"{root} was built with different settings:\n    " + "\n    ".join(shown),
                    "use the same options as before, another --out, or --overwrite to rebuild it",
                )
            # The same model under another name: the cache keeps its record, so every shard's
            # settings stay the same and an older cache keeps the identity it was written with.
            state.settings = {**settings, "model": manifest["model"]}
            state.created = manifest.get("created", state.created)
            state.shards = manifest["shards"]
            state.runs = manifest.get("runs", [])
            state.statistics = manifest.get("statistics", [])
            state.table = load_samples(root, manifest)
            state.index_file = manifest["samples"]["file"]
            state.index_info = manifest["samples"]
            state.failures = {f["key"]: f for f in manifest["failures"]}
        if cleanup:
            state._remove_stale_files()
        return state

    def _remove_stale_files(self) -> None:
        """Sample tables of commits that died before their manifest landed, and temp files of
        cut-short writes (we hold the lock). Only names dinocache gives its own files."""
        current = self.index_file.split("/", 1)[1] if self.index_file else None
        folder = self.root / INDEX_DIR
        if folder.is_dir() and not is_link(folder):
            for entry in os.scandir(folder):
                if (
                    entry.name != current
                    and (OWNED[INDEX_DIR].fullmatch(entry.name) or TEMP.fullmatch(entry.name))
                    and entry.is_file(follow_symlinks=False)
                ):
                    os.unlink(entry.path)
        remove_owned(self.root / SHARD_DIR, TEMP)
        remove_owned(self.root, TEMP)

    def cached(self, key: str) -> dict | None:
        i = self.table.find(key)
        return self.table.record(i) if i >= 0 else None

    # ---- damaged shards ---------------------------------------------------------------------
    def find_damage(self, deep: bool = False) -> Damage:
        """Shards the table relies on that are missing or of the wrong size: cheap (one stat per
        shard). With `deep` (--repair), each one also gets verify's own check of a listed shard
        (sha256, header, layout, metadata, finite values): whatever verify or a reader would
        refuse is recomputed."""
        import numpy as np

        damage = Damage(hashed=deep)
        manifest = {**self.settings, "format_version": FORMAT_VERSION}
        remote = None if type(self.store) is LocalShards else self.store
        live = set(np.unique(np.asarray(self.table.columns["shard"])).tolist()) if len(self.table) else set()
        for index in sorted(live):
            if not 0 <= index < len(self.shards):
                continue  # verify reports it; nothing to recompute from
            shard = self.shards[index]
            damage.checked += 1
            size = self.store.size(shard["file"])
            if size is None:
                damage.shards[index] = "missing"
            elif size != shard["bytes"]:
                damage.shards[index] = f"{size} bytes, the manifest says {shard['bytes']}"
            elif deep:
                problems, _ = _listed_shard_findings(self.root, index, shard, manifest, self.layout, True, remote)
                if problems:
                    damage.shards[index] = problems[0].message
        if damage.shards:
            shard_col = np.asarray(self.table.columns["shard"])
            rows = np.flatnonzero(np.isin(shard_col, list(damage.shards)))
            damage.lost_keys = [self.table.key(int(i)) for i in rows]
        return damage

    def drop_damaged(self, damage: Damage) -> None:
        """Forget damaged shards (their live rows become uncached, so this run recomputes them)
        and delete their files: they are ours (named in the manifest) and proven bad."""
        if not damage.shards:
            return
        import numpy as np

        keep = [i for i in range(len(self.shards)) if i not in damage.shards]
        remap = np.full(len(self.shards), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        for index in damage.shards:
            self.store.delete(self.shards[index]["file"])
        self.table = self.table.merged([], set(damage.lost_keys)).with_shards_remapped(remap)
        self.shards = [self.shards[i] for i in keep]

    # ---- adoption -----------------------------------------------------------------------------
    def adopt_orphans(self, known_records: dict[str, dict] | None = None) -> int:
        """Shards that are durable on disk but not in the manifest: written by a run that died
        before committing, or by the other ranks of a multi-process run. Each must match this
        cache in full (model, preprocessing, storage, bucket, tensors, records); anything else is
        left alone for verify to report. `known_records` (from rank reports) spares re-hashing
        shards whose size still matches."""
        known_records = known_records or {}
        adopted = 0
        for file in self.store.orphans({s["file"] for s in self.shards}):
            reported = known_records.get(file)
            try:
                with self.store.local_copy(file, reported) as path:
                    bucket, samples = self._check_orphan(path)
                    size = path.stat().st_size
                    digest = reported["sha256"] if reported and reported.get("bytes") == size else sha256_file(path)
            except (ValueError, SafetensorsError, OSError, CacheError) as exc:  # not ours, or damaged
                log.warning("not adopting %s: %s", file, exc)
                continue
            self.add_shard(
                {"file": file, "bucket": bucket, "rows": len(samples), "bytes": size, "sha256": digest}, samples
            )
            adopted += 1
        if adopted:
            log.info("adopted %d shard(s) not yet in the manifest (other ranks, or an interrupted run)", adopted)
        return adopted

    def _check_orphan(self, path: Path) -> tuple[int, list[dict]]:
        if is_link(path) or not path.is_file():
            raise ValueError("it is not a regular file in the cache (a link?)")
        st = SafetensorsFile(path)
        meta = parse_shard_metadata(st.metadata)
        if meta.version != FORMAT_VERSION:
            raise ValueError(f"it was written in format {meta.version}")
        diffs = settings_differences(  # exactly: a shard's settings are those of the manifest
            {k: meta.settings[k] for k in ("model", "preprocessing", "storage")},
            {k: self.settings[k] for k in ("model", "preprocessing", "storage")},
        )
        if diffs:
            raise ValueError("made with other settings: " + "; ".join(diffs[:3]))
        index = meta.bucket.get("index")
        buckets = self.settings["buckets"]
        if not isinstance(index, int) or not 0 <= index < len(buckets) or meta.bucket != buckets[index]:
            raise ValueError(f"its bucket {meta.bucket_name} is not bucket {index} of this cache's table")
        samples = [record_from_json(s, len(buckets)) for s in meta.samples]
        if not samples or any(s["bucket"] != index for s in samples):
            raise ValueError("its rows are empty or name another bucket")
        if len({s["key"] for s in samples}) != len(samples):
            raise ValueError("it holds a key twice")
        model = self.settings["model"]
        specs = self.layout.tensors(model["hidden_size"], model["num_registers"], tuple(buckets[index]["stored_grid"]))
        problems = shard_tensor_problems(st.entries, specs, len(samples))
        if problems:
            raise ValueError("; ".join(problems[:3]))
        return index, samples

    # ---- changes --------------------------------------------------------------------------------
    def add_shard(self, record: dict, samples: list[dict]) -> None:
        index = len(self.shards)
        self.shards.append(record)
        for row, sample in enumerate(samples):
            # A recomputed image supersedes its old row: the old shard keeps the bytes, nobody references them.
            self.pending.append({**sample, "shard": index, "row": row})
            self.failures.pop(sample["key"], None)
            self.dropped.discard(sample["key"])

    def add_failure(self, key: str, source_bytes: int, source_mtime_ns: int, reason: str, detail: str) -> None:
        """Record an image that cannot be used. A sample is cached or failed, never both: if an
        older version of it was cached, those features describe content that is gone, so they
        are dropped."""
        self.failures[key] = failure_record(key, source_bytes, source_mtime_ns, reason, detail)
        if self.table.find(key) >= 0:
            self.dropped.add(key)

    def write_extras(self) -> None:
        for name, data in self.extras.items():
            path = self.root / name
            if not path.is_file() or is_link(path) or path.read_bytes() != data:
                if is_link(path):
                    path.unlink()
                atomic_write_bytes(path, data)

    def commit(self) -> None:
        """Sample table first (new name), then the manifest that points at it, then drop the old table."""
        if self.pending or self.dropped or self.index_file is None:
            self.table = self.table.merged(self.pending, self.dropped)
            self.pending, self.dropped = [], set()
            data = self.table.to_bytes()
            name = table_name(uuid.uuid4().hex[:12])
            (self.root / INDEX_DIR).mkdir(exist_ok=True)
            atomic_write_bytes(self.root / name, data)
            old, self.index_file = self.index_file, name
            self.index_info = {
                "file": name,
                "count": len(self.table),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        else:
            old = None
        self.write_extras()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "created": self.created,
            "updated": now(),
            **self.settings,
            "shards": self.shards,
            "samples": self.index_info,
            "failures": [self.failures[k] for k in sorted(self.failures)],
            "runs": self.runs,
            "statistics": self.statistics,
        }
        fault_point("manifest_write")
        write_manifest(self.root, manifest)
        # a remote cache: upload the table, then the manifest
        self.store.after_commit(list(self.extras) + ([self.index_file] if old != self.index_file else []), old)
        if old and old != self.index_file:
            delete_owned(self.root, old)


def failure_record(key: str, source_bytes, source_mtime_ns, reason: str, detail: str) -> dict:
    """A failure as the manifest records it. Size and mtime come from hints that may be
    anything (a list row's `size: 1e20`, a tar header's negative mtime): a value the schema
    would refuse is recorded as -1 (unknown), so one bad hint never makes the manifest unreadable."""
    size = source_bytes if _is_int(source_bytes, 0, 1 << 62) else -1
    mtime = source_mtime_ns if _is_int(source_mtime_ns, -(1 << 63), (1 << 63) - 1) else -1
    detail = str(detail)
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    return {"key": key, "reason": reason, "detail": detail, "source_bytes": size, "source_mtime_ns": str(mtime)}


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def clear_cache(root: Path) -> None:
    """--overwrite: delete the manifest and every file with one of dinocache's own names in the
    cache's folders. Anything else (a link, a foreign file) stays, and so does its folder."""
    check_cache_folders(root)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for name in CACHE_FOLDERS:
        remove_owned(root / name, OWNED[name])
        remove_owned(root / name, TEMP)
        remove_folder_if_empty(root / name)
    path = root / NORM_FILE
    if path.is_file() and not is_link(path):
        path.unlink()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
