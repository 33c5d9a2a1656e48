"""Shard writer: rows of one bucket -> stacked safetensors files, durable before they are named.

A shard is written to a temp name, fsynced, renamed, and the folder fsynced; only then is it
reported back for the manifest. Shards are self-describing (their safetensors metadata holds the
bucket, grid and per-row sample records), so a shard that landed just before a crash can be
adopted by the next run instead of being recomputed. Writing happens on a background thread so
the model does not wait for the disk.
"""

from __future__ import annotations

import hashlib
import json
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
from .features import stored_grid
from .manifest import FORMAT_NAME, FORMAT_VERSION, SHARD_DIR, SHARD_SUFFIX, fsync_dir

log = logging.getLogger("dinocache")

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                  "float8_e4m3fn": torch.float8_e4m3fn}
FLOAT8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 with one float32 scale per row (sample): row = q.float() * scale."""
    amax = x.detach().float().abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax))
    q = (x.float() / scale.view(-1, *([1] * (x.dim() - 1)))).to(torch.float8_e4m3fn)
    return q, scale


@dataclass
class _Buffer:
    bucket: Bucket
    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per-batch chunks
    samples: list[dict] = field(default_factory=list)
    nbytes: int = 0


def _to_host(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A host copy in `dtype`. From a GPU: cast there (fewer bytes to move), then copy into pinned
    memory (about 25x faster than pageable; torch caches and reuses the pinned blocks)."""
    if x.device.type == "cuda":
        x = x.to(dtype)
        host = torch.empty(x.shape, dtype=dtype, pin_memory=True)
        return host.copy_(x)
    return x.to("cpu", dtype, copy=True)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Buffers rows per bucket and writes a shard when the buffer reaches `max_bytes` or on flush.

    `add` takes tensors on any device; it copies each row to CPU in the storage dtype (a fresh,
    contiguous tensor, so a saved row never keeps a whole batch's storage alive).
    Completed shards are collected with `completed()`, as (shard record, sample records).
    """

    def __init__(self, root: Path, storage_dtype: str = "bfloat16", max_bytes: int = 512 * 1024**2,
                 max_pending: int = 2, pool: int = 1):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {storage_dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
        self.root = Path(root)
        self.dtype = STORAGE_DTYPES[storage_dtype]
        self.max_bytes = max_bytes
        self.pool = pool  # for the stored grid recorded in each shard's metadata
        self.run_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self._buffers: dict[int, _Buffer] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinocache-writer")
        self._pending: list[Future] = []
        self._done: list[tuple[dict, list[dict]]] = []
        self._max_pending = max_pending
        self._wait_seconds = 0.0  # time the caller spent blocked on the disk (backpressure, close)
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def add(self, bucket: Bucket, tensors: dict[str, torch.Tensor], samples: list[dict]) -> None:
        """Queue one batch of rows for this bucket's current shard: `tensors` maps a name to a
        [batch, ...] tensor on any device (float8 storage adds a per-row `NAME_scale`)."""
        if self.dtype == torch.float8_e4m3fn:
            quantized = {}
            for name, x in tensors.items():
                quantized[name], quantized[f"{name}_scale"] = quantize_rows(x)
            tensors = quantized
        row_bytes = sum(x[0].numel() * _element_size(torch.float32 if name.endswith("_scale") else self.dtype)
                        for name, x in tensors.items())
        start = 0
        while start < len(samples):
            buf = self._buffers.setdefault(bucket.index, _Buffer(bucket))
            room = max(1, -(-(self.max_bytes - buf.nbytes) // row_bytes))  # rows until the shard is full
            stop = min(len(samples), start + room)
            # One copy per batch, owned by the shard (never a view that keeps the batch's storage alive).
            for name, x in tensors.items():
                dtype = torch.float32 if name.endswith("_scale") else self.dtype
                buf.tensors.setdefault(name, []).append(_to_host(x[start:stop], dtype))
            buf.samples.extend(samples[start:stop])
            buf.nbytes += (stop - start) * row_bytes
            if buf.nbytes >= self.max_bytes:
                self._submit(bucket.index)
            start = stop

    def flush(self, bucket_index: int | None = None) -> None:
        """Write out the partly filled shard of one bucket (or of all)."""
        for index in [bucket_index] if bucket_index is not None else list(self._buffers):
            if index in self._buffers and self._buffers[index].samples:
                self._submit(index)

    def completed(self) -> list[tuple[dict, list[dict]]]:
        """Shards that are durable on disk since the last call (raises a write error, e.g. ENOSPC)."""
        still = []
        for fut in self._pending:
            if fut.done():
                self._done.append(fut.result())
            else:
                still.append(fut)
        self._pending = still
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
            self._pool.shutdown(wait=True)

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
        self._pool.shutdown(wait=True)
        return landed

    def _submit(self, index: int) -> None:
        buf = self._buffers.pop(index)
        name = f"{SHARD_DIR}/b{buf.bucket.index:03d}-{buf.bucket.name}-{self.run_id}-{self._seq:05d}{SHARD_SUFFIX}"
        self._seq += 1
        began = time.perf_counter()
        while len(self._pending) >= self._max_pending:  # backpressure: bounded host memory
            self._done.append(self._pending.pop(0).result())
        self._wait_seconds += time.perf_counter() - began
        self._pending.append(self._pool.submit(self._write, name, buf))

    def _write(self, name: str, buf: _Buffer) -> tuple[dict, list[dict]]:
        from safetensors.torch import save_file

        rows, cols = stored_grid(buf.bucket.grid, self.pool)
        tensors = {}
        for tensor_name in list(buf.tensors):
            tensors[tensor_name] = torch.cat(buf.tensors.pop(tensor_name))  # the concatenated copy is all that is kept
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "bucket": buf.bucket.name,
            "grid": f"{rows}x{cols}",
            "samples": json.dumps(buf.samples, separators=(",", ":")),  # what a later run needs to adopt it
        }
        path = self.root / name
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=metadata)  # streams to disk: no second in-memory copy
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
        record = {"file": name, "bucket": buf.bucket.index, "rows": len(buf.samples), "bytes": path.stat().st_size,
                  "sha256": digest}
        return record, buf.samples
