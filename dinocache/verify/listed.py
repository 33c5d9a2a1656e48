"""The shards a manifest lists: size, sha256 and values in one pass (bytescan), then the header
against the layout and the shard's own metadata against the manifest."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheError
from ..layout import Layout, parse_shard_metadata, shard_identity_problems, shard_tensor_problems
from ..manifest import settings_of, shard_path
from ..stfile import SafetensorsError, SafetensorsFile
from .bytescan import scan_shard
from .report import Problem, VerifyReport


@dataclass
class ListedShards:
    """What checking a cache's listed shards needs; `store` reads a remote cache's shards."""

    root: Path
    manifest: dict
    layout: Layout
    check_values: bool
    store: object = None

    def all_findings(self) -> list[tuple[list[Problem], int]]:
        """(problems, bytes read) per shard, in the manifest's order. Shards are checked
        concurrently: hashing (~1.5 GB/s a core) would otherwise be slower than the disk;
        hashlib and numpy release the GIL."""
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            return list(pool.map(lambda item: self.findings(*item), enumerate(self.manifest["shards"])))

    def findings(self, index: int, shard: dict) -> tuple[list[Problem], int]:
        """(problems, bytes read) for one shard; runs in a worker thread. A remote shard is
        checked through a temporary local copy."""
        local = VerifyReport()
        if self.store is None:
            self.check(index, shard, local)
            return local.problems, local.bytes_read
        name = shard["file"]
        size = self.store.size(name)
        if size is None or size != shard["bytes"]:
            what = "is missing" if size is None else f"has {size} bytes, the manifest says {shard['bytes']}"
            local.add(
                "missing_shard" if size is None else "size",
                f"shard {name} {what} (rerun the extract command: it recomputes its rows)",
                name,
            )
            return local.problems, 0
        try:
            with self.store.local_copy(name) as path:
                self.check(index, shard, local, path=path)
        except (CacheError, OSError) as exc:
            local.add("unreadable", f"shard {name} cannot be downloaded: {exc}", name)
        return local.problems, local.bytes_read

    def check(self, index: int, shard: dict, report: VerifyReport, path: Path | None = None) -> None:
        name = shard["file"]
        path = self._intact_size(index, shard, report, path)
        if path is None:
            return
        try:
            digest, header, value_problems, read = scan_shard(path, self.check_values)
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
        self._check_header(shard, header, report)
        for problem in value_problems:
            report.add("values", f"shard {name}: {problem}", name)
        self._check_metadata(shard, header, report)

    def _intact_size(self, index: int, shard: dict, report: VerifyReport, path: Path | None) -> Path | None:
        """The shard's file when it is there with the recorded size (None: a problem is reported)."""
        name = shard["file"]
        try:
            path = path or shard_path(self.root, name)
        except CacheError as exc:
            report.add("path", f"shard #{index}: {exc.message}", name)
            return None
        if not path.is_file():
            report.add(
                "missing_shard", f"shard {name} is missing (rerun the extract command: it recomputes its rows)", name
            )
            return None
        size = path.stat().st_size
        if size != shard["bytes"]:
            report.add(
                "size",
                f"shard {name} has {size} bytes, the manifest says {shard['bytes']} (truncated or "
                "replaced; rerun the extract command: it recomputes its rows)",
                name,
            )
            return None
        return path

    def _check_header(self, shard: dict, header: SafetensorsFile, report: VerifyReport) -> None:
        """Names, dtypes and shapes against the layout; the shard's identity against its bucket."""
        name, manifest, layout = shard["file"], self.manifest, self.layout
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

    def _check_metadata(self, shard: dict, header: SafetensorsFile, report: VerifyReport) -> None:
        """From format 2 on, a shard's own settings, bucket and row count agree with the manifest."""
        name, manifest = shard["file"], self.manifest
        bucket = manifest["buckets"][shard["bucket"]]
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
