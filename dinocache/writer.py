"""Shard writer: rows of one bucket -> stacked safetensors files, durable before they are named.

A shard is written to a temp name, fsynced, renamed, and the folder fsynced; only then is it
reported back for the manifest. Shards are self-describing (their safetensors metadata holds the
bucket, grid and per-row sample records), so a shard that landed just before a crash can be
adopted by the next run instead of being recomputed. Writing happens on a background thread so
the model does not wait for the disk.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .buckets import Bucket
from .faults import fault_point
from .fileio import file_mode, fsync_dir, sha256_file
from .index import record_to_json
from .layout import Layout, encode_json, rows_per_shard, shard_metadata, to_storage
from .names import SHARD_DIR, shard_name

log = logging.getLogger("dinocache")


@dataclass
class _Buffer:
    bucket: Bucket
    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per-batch chunks
    samples: list[dict] = field(default_factory=list)


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A host copy. From a GPU: into pinned memory (about 25x faster than pageable; torch caches
    and reuses the pinned blocks)."""
    if x.device.type == "cuda":
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return host.copy_(x)
    return x.to("cpu", copy=True)


class ShardWriter:
    """Buffers rows per bucket and writes a shard when it holds `layout.rows_per_shard` rows, or
    on flush.

    `add` takes feature tensors on any device; it casts (or quantizes) them as the layout says
    and copies each batch to the host once (a fresh tensor, so a saved row never keeps a whole
    batch's storage alive). Completed shards are collected with `completed()`, as (shard record,
    sample records).
    """

    def __init__(
        self,
        root: Path,
        layout: Layout,
        settings: dict,
        hidden_size: int,
        num_registers: int,
        max_bytes: int = 512 * 1024**2,
        max_pending: int = 2,
        upload=None,
    ):
        self.root = Path(root)
        self.upload = upload  # remote caches: (local path, name) -> uploaded, local copy dropped
        self.layout = layout
        self.settings = settings  # model, preprocessing, storage, buckets: every shard records its part
        self.hidden_size, self.num_registers = hidden_size, num_registers
        self.max_bytes = max_bytes
        self.run_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self._buffers: dict[int, _Buffer] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinocache-writer")
        self._pending: list[Future] = []
        self._done: list[tuple[dict, list[dict]]] = []
        self._max_pending = max_pending
        self._wait_seconds = 0.0  # time the caller spent blocked on the disk (backpressure, close)
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def rows_per_shard(self, bucket: Bucket) -> int:
        grid = tuple(self.settings["buckets"][bucket.index]["stored_grid"])
        return rows_per_shard(self.layout.row_bytes(self.hidden_size, self.num_registers, grid), self.max_bytes)

    def add(self, bucket: Bucket, tensors: dict[str, torch.Tensor], samples: list[dict]) -> None:
        """Queue one batch of rows for this bucket's current shard: `tensors` maps a feature name
        to a [batch, ...] tensor on any device (features.stored_features)."""
        tensors = to_storage(tensors, self.layout)
        capacity = self.rows_per_shard(bucket)
        start = 0
        while start < len(samples):
            buf = self._buffers.setdefault(bucket.index, _Buffer(bucket))
            stop = min(len(samples), start + capacity - len(buf.samples))
            for name, x in tensors.items():
                buf.tensors.setdefault(name, []).append(_to_host(x[start:stop]))
            buf.samples.extend(samples[start:stop])
            if len(buf.samples) >= capacity:
                self._submit(bucket.index)
            start = stop

    def flush(self, bucket_index: int | None = None) -> None:
        """Write out the partly filled shard of one bucket (or of all)."""
        for index in [bucket_index] if bucket_index is not None else list(self._buffers):
            if index in self._buffers and self._buffers[index].samples:
                self._submit(index)

    def completed(self) -> list[tuple[dict, list[dict]]]:
        """Shards that are durable on disk since the last call (raises a write error, e.g. ENOSPC)."""
        while self._pending and self._pending[0].done():  # in order, so an error leaves the rest pending
            self._done.append(self._pending.pop(0).result())
        done, self._done = self._done, []
        return done

    def take_wait_seconds(self) -> float:
        """Seconds spent waiting for the disk since the last call."""
        waited, self._wait_seconds = self._wait_seconds, 0.0
        return waited

    def close(self) -> list[tuple[dict, list[dict]]]:
        """Flush everything, wait for the disk, and return the remaining completed shards."""
        try:
            self.flush()
            began = time.perf_counter()
            for fut in self._pending:
                self._done.append(fut.result())
            self._wait_seconds += time.perf_counter() - began
            self._pending = []
            return self.completed()
        finally:
            self._executor.shutdown(wait=True)

    def close_quietly(self) -> list[tuple[dict, list[dict]]]:
        """After an error: drop unwritten buffers, wait for writes in flight, keep those that landed."""
        self._buffers.clear()
        landed = list(self._done)
        self._done = []
        for fut in self._pending:
            try:
                landed.append(fut.result())
            except Exception as exc:
                log.error("a shard could not be written (%s); its rows will be recomputed by the next run", exc)
        self._pending = []
        self._executor.shutdown(wait=True)
        return landed

    def _submit(self, index: int) -> None:
        buf = self._buffers.pop(index)
        name = shard_name(buf.bucket.index, buf.bucket.name, self.run_id, self._seq)
        self._seq += 1
        began = time.perf_counter()
        while len(self._pending) >= self._max_pending:  # backpressure: bounded host memory
            self._done.append(self._pending.pop(0).result())
        self._wait_seconds += time.perf_counter() - began
        self._pending.append(self._executor.submit(self._write, name, buf))

    def _write(self, name: str, buf: _Buffer) -> tuple[dict, list[dict]]:
        from safetensors.torch import save_file

        tensors = {}
        for tensor_name in list(buf.tensors):
            tensors[tensor_name] = torch.cat(buf.tensors.pop(tensor_name))  # the concatenated copy is all that is kept
        samples_json = encode_json([record_to_json(s) for s in buf.samples])
        metadata = shard_metadata(
            self.settings, self.settings["buckets"][buf.bucket.index], samples_json, self.layout.pool
        )
        path = self.root / name
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=metadata)  # streams to disk: no second in-memory copy
            os.chmod(tmp, file_mode())  # safetensors creates 0600 files; a cache is shared like any file
            fault_point("shard_write")  # written but neither synced nor renamed
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            digest = sha256_file(tmp)  # read back from the page cache
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        fault_point("shard_renamed")
        size = path.stat().st_size
        if self.upload is not None:  # durable in storage before anything names it
            self.upload(path, name)
            fault_point("shard_uploaded")
        record = {
            "file": name,
            "bucket": buf.bucket.index,
            "rows": len(buf.samples),
            "bytes": size,
            "sha256": digest,
        }
        return record, buf.samples
