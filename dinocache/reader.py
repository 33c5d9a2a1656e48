"""Read a cache back in a training loop.

    cache = FeatureCache("dinocache_out")
    sampler = BucketBatchSampler(cache, batch_size=32, seed=0, rank=rank, world_size=world)
    loader = DataLoader(cache, batch_sampler=sampler, collate_fn=collate_features, num_workers=4)

Rows are memory-mapped and gathered a batch at a time (one copy per tensor per shard, via
`__getitems__`); nothing is unpickled. Every shard is checked against the layout when first
opened (tensor names, dtypes, shapes), so a damaged or foreign file is an error, never a
wrongly shaped tensor.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import CacheError, ConfigError
from .fileio import contained_file
from .flavours import FLAVOURS, affine, apply_flavour, flavour_problem, in_float32
from .layout import Layout, TensorSpec, dequantize, shard_identity_problems, shard_tensor_problems
from .location import CacheLocation
from .manifest import DEFAULT_OUT, NORM_FILE, load_samples, read_manifest, shard_path
from .remote import ShardCache
from .statsfile import load_statistics
from .stfile import DTYPES, SafetensorsError, SafetensorsFile

_SHAPES = {"one": lambda grid, r: (), "registers": lambda grid, r: (r,), "grid": lambda grid, r: tuple(grid)}
_TORCH = {code: torch_dtype for code, (_, torch_dtype) in DTYPES.items()}
_NUMPY_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}  # numpy has neither


class Sample(dict):
    """One sample: a plain dict of its fields. Samples read in one call also know the batch
    tensors their values are views of, so collate_features can hand those over uncopied."""

    __slots__ = ("_batch", "_slot")


@dataclass
class _Shard:
    file: SafetensorsFile
    specs: dict[str, TensorSpec]
    grid: tuple[int, int]
    bucket_index: int


class FeatureCache(Dataset):
    """A read-only view of a cache.

    `cache[key]` or `cache[i]` -> dict with "cls" [D], "patches" [rows, cols, D], optionally
    "registers" [R, D], "layer{k}_cls" / "layer{k}_patches" (--layers k, not normed), and with a
    --flip cache the same names ending in "_flip"; plus "key", "bucket" (its name),
    "bucket_index" and "grid" (the stored grid: halved by --pool 2).
    `cache[(i, True)]` gives the flipped view under the plain names (and "flipped": True):
    what `BucketBatchSampler(..., flip=True)` asks for.

    `flavour`: "normed" (last_hidden_state), "ln_noaffine" (RAE; what a format-3 cache stores)
    or "prenorm" (hidden_states[-1]); see flavours.py. `normalize=True` (or "channel", or
    "position") applies the cache's dataset statistics for that flavour (`dinocache norm-stats`):
    (x - mean) / sqrt(var + eps) on cls and patches, with the eps norm-stats recorded (RAE's 1e-5
    for --style rae, 0 for --style svg, else 1e-6) or `normalize_eps`. float8 caches are
    dequantized on read.

    `dtype` None: values come back in the storage dtype (float32 for float8 storage), normed
    and ln_noaffine included, except float32 for prenorm, for ln_noaffine of a format-1/2 cache,
    and for normalized cls and patches. Any other `dtype`: every value is computed in float32
    and cast once.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_OUT,
        dtype: torch.dtype | None = None,
        max_open_shards: int = 64,
        flavour: str = "normed",
        normalize: bool | str = False,
        normalize_eps: float | None = None,
    ):
        location = CacheLocation(root)
        self.url = location.name
        self.root = location.local_view()  # object storage: a local mirror, its metadata pulled
        # ... and its shards fetched (and checked) when first read
        self._shard_cache = ShardCache(location.remote, self.root) if location.is_remote else None
        self.dtype = dtype
        self.manifest, self.table = _open_generation(self.root)  # the table is memory-mapped, sorted by key
        problem = self.table.order_problem()  # binary search and row reads rely on it (docs/FORMAT.md)
        if problem:
            raise CacheError(
                f"the sample table of {self.url} cannot be used: {problem}", "run `dinocache verify` for details"
            )
        self._shard_col = self.table.columns["shard"]
        self._row_col = self.table.columns["row"]
        self._bucket_col = self.table.columns["bucket"]
        self.buckets = self.manifest["buckets"]
        self.shards = self.manifest["shards"]
        self.layout = Layout.from_record(self.manifest["storage"])
        model = self.manifest["model"]
        self.hidden_size, self.num_registers = model["hidden_size"], model["num_registers"]
        self._set_flavour(flavour)
        self.statistics = self._statistics(normalize, normalize_eps) if normalize else None
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._max_open = max_open_shards

    def _set_flavour(self, flavour: str) -> None:
        """The flavour read (checked against what the cache stores), the final norm it needs, and
        the dtype a flavour derived on read is rounded to before normalize and the final cast."""
        if flavour not in FLAVOURS:
            raise ConfigError(f"unknown flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
        self.flavour = flavour
        stored = self.layout.normed_values
        self._norm = self._load_norm() if flavour != stored else None
        self._derived_dtype = (
            torch.float32
            if self.dtype is not None or self.layout.storage.scaled or in_float32(flavour, stored)
            else self.layout.storage.torch_dtype
        )
        problem = flavour_problem(
            flavour,
            stored,
            self._norm is not None or "final_norm" in self.manifest["model"],
            self.layout.ln_stats and self.layout.pool == 1,
            self.layout.pool,
        )
        if problem:
            raise CacheError(
                f"{self.root}: {problem}",
                "rebuild the cache with the current dinocache "
                "(extract --overwrite, without --pool for prenorm) or read flavour='normed'",
            )

    def _statistics(self, normalize: bool | str, eps: float | None):
        if normalize not in (True, "channel", "position"):
            raise CacheError(f"normalize={normalize!r}", "use True (per channel), 'channel' or 'position'")
        return load_statistics(
            self.root, self.manifest, self.flavour, per_position=normalize == "position", eps=eps, name=self.url
        )

    # ---- the index --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    def keys(self) -> list[str]:
        """All keys, sorted (index i of this list is sample i)."""
        return self.table.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.table.find(key) >= 0

    def bucket_of(self, item: int | str) -> int:
        """The bucket index (into manifest["buckets"]) of a sample, by position or key."""
        return int(self._bucket_col[self.position(item)])

    def bucket_indices(self) -> np.ndarray:
        """The bucket of every sample, as an array (for samplers)."""
        return np.asarray(self._bucket_col)

    def shard_indices(self) -> np.ndarray:
        """The shard of every sample, as an array (for locality-aware samplers)."""
        return np.asarray(self._shard_col)

    def record(self, item: int | str) -> dict:
        """The sample's bookkeeping: source size/mtime/sha256, upright size, crop box, shard, row, bucket."""
        return self.table.record(self.position(item))

    def position(self, item: int | str) -> int:
        """A sample's position: its key looked up, or an integer index (negative counts from the
        end, as for a list). Anything else is a TypeError, not a silent int() of a float."""
        if isinstance(item, str):
            return self.index_of(item)
        try:
            i = operator.index(item)
        except TypeError:
            raise TypeError(f"a sample is a key (str) or an integer index, not {type(item).__name__}") from None
        n = len(self.table)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a cache of {n} samples")
        return i + n if i < 0 else i

    def index_of(self, key: str) -> int:
        i = self.table.find(key)
        if i < 0:
            close = self.close_keys(key)
            hint = "; did you mean " + " or ".join(map(repr, close)) + "?" if close else ""
            raise KeyError(f"{key!r} is not in the cache at {self.root}{hint}")
        return i

    def close_keys(self, key: str, n: int = 3) -> list[str]:
        """Keys that look like `key` (a typo, another extension), for error messages; none past
        200k samples, where comparing every key would take seconds."""
        import difflib

        return difflib.get_close_matches(key, self.keys(), n=n) if len(self) <= 200_000 else []

    # ---- reading ----------------------------------------------------------------------------
    def __getitem__(self, item) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list) -> list[dict]:
        """Read a batch at once. For each bucket the batch gets one tensor per feature, and each
        shard's rows are gathered straight into it (one copy, in file order when the sampler
        sorted the batch); items are views of those tensors, so collate_features stacks nothing."""
        resolved = [self._resolve(item) for item in items]
        n = len(resolved)
        idx = np.fromiter((i for i, _ in resolved), dtype=np.int64, count=n)
        flips = [f for _, f in resolved]
        shard_of = np.asarray(self._shard_col)[idx].astype(np.int64)
        row_of = np.asarray(self._row_col)[idx].astype(np.int64)
        bucket_of = np.asarray(self._bucket_col)[idx].astype(np.int64)
        out: list[Sample | None] = [None] * n
        for bucket_index in np.unique(bucket_of).tolist():
            if not 0 <= bucket_index < len(self.buckets):
                raise CacheError(
                    f"{self.root}: a sample names bucket {bucket_index}, which does not exist",
                    "run `dinocache verify` for details",
                )
            positions = np.flatnonzero(bucket_of == bucket_index)
            batch: dict[str, torch.Tensor] = {}
            grid = None
            for shard_index in np.unique(shard_of[positions]).tolist():
                chosen = positions[shard_of[positions] == shard_index]
                shard = self._handle(shard_index)
                grid = shard.grid
                rows = row_of[chosen]
                if (
                    shard.bucket_index != bucket_index
                    or rows.min() < 0
                    or rows.max() >= self.shards[shard_index]["rows"]
                ):
                    raise CacheError(
                        f"{self.root}: a sample points outside {self.shards[shard_index]['file']} "
                        "(wrong row or bucket)",
                        "run `dinocache verify` for details",
                    )
                local = np.searchsorted(positions, chosen)
                for view in {flips[p] for p in chosen.tolist()}:
                    pick = np.array([flips[p] is view or flips[p] == view for p in chosen.tolist()])
                    self._gather(batch, shard, shard_index, rows[pick], local[pick], len(positions), view)
            bucket = self.buckets[bucket_index]
            for j, p in enumerate(positions.tolist()):
                i, flipped = resolved[p]
                item = Sample(key=self.table.key(i), bucket=bucket["name"], bucket_index=bucket_index, grid=grid)
                for name, value in batch.items():
                    item[name] = (
                        value[j]
                        if value.dim() < 3 or not name.endswith(("patches", "patches_flip"))
                        else value[j].view(grid[0], grid[1], value.shape[-1])
                    )
                if flipped is not None:
                    item["flipped"] = flipped
                item._batch, item._slot = batch, j
                out[p] = item
        return out  # type: ignore[return-value]

    def _gather(
        self,
        batch: dict,
        shard: _Shard,
        shard_index: int,
        rows: np.ndarray,
        local: np.ndarray,
        total: int,
        view: bool | None,
    ) -> None:
        """Rows of one shard into the batch tensors at `local`. `view` None: every stored view
        under its own name; False/True: the plain/flipped view under the plain names."""
        wanted = self.layout.views() if view is None else ("_flip",) if view else ("",)
        contiguous = len(local) and local[-1] - local[0] == len(local) - 1 and bool(np.all(np.diff(local) == 1))
        try:
            for name, spec in shard.specs.items():
                if spec.role != "value" or self._view_of(name) not in wanted:
                    continue
                target = name if view is None else name.removesuffix("_flip")
                path = self._fast_path(spec)
                if path is not None:  # straight from the map into the batch
                    source = shard.file.array(name)
                    dest = batch.get(target)
                    if dest is None:
                        dtype = self.dtype if self.dtype is not None else _TORCH[shard.file.entries[name].dtype]
                        dest = batch[target] = batch_buffer((total, *source.shape[1:]), dtype)
                    if path == "affine":
                        affine_rows(_mapped(shard.file, name), rows, dest, local, *self._norm)
                        continue
                    dest_np = dest.view(_NUMPY_VIEW.get(dest.dtype, dest.dtype)).numpy()
                    if contiguous:
                        parallel_take(source, rows, dest_np[local[0] : local[0] + len(local)])
                    else:
                        dest_np[local] = np.take(source, rows, axis=0, mode="clip")
                    continue
                value = self._value(shard, name, spec, rows)
                dest = batch.get(target)
                if dest is None:
                    dest = batch[target] = batch_buffer((total, *value.shape[1:]), value.dtype)
                dest[torch.from_numpy(local)] = value
        except (SafetensorsError, ValueError, OSError, RuntimeError) as exc:
            raise CacheError(
                f"cannot read rows of {self.shards[shard_index]['file']}: {str(exc).splitlines()[0]}",
                "run `dinocache verify` for details",
            ) from None

    def _fast_path(self, spec: TensorSpec) -> str | None:
        """How `_gather` can fill a feature's batch tensor without the per-feature float32 pass:
        "copy" (the stored values are what is asked for), "affine" (normed from a format-3
        cache: weight * z + bias a chunk at a time), or None."""
        if self.layout.storage.scaled or self.statistics is not None:
            return None
        stored = self.layout.normed_values
        if not spec.feature.normed or self.flavour == stored:
            return "copy" if self.dtype in (None, self.layout.storage.torch_dtype) else None
        return "affine" if (stored, self.flavour) == ("ln_noaffine", "normed") else None

    def _flavoured(self, value: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        """A normed feature's stored values -> the flavour asked for, in `_derived_dtype`."""
        weight, bias = self._norm if self._norm is not None else (None, None)
        value = apply_flavour(self.flavour, value, self.layout.normed_values, weight, bias, stats)
        return value.to(self._derived_dtype)

    def _value(self, shard: _Shard, name: str, spec: TensorSpec, rows: np.ndarray) -> torch.Tensor:
        """One feature's rows, dequantized, flavoured, normalized and cast: [k, *stored shape]."""
        value = shard.file.tensor(name, rows)
        if name + "_scale" in shard.specs:
            value = dequantize(value, shard.file.tensor(name + "_scale", rows))
        if spec.feature.normed and self.flavour != self.layout.normed_values:
            stats = shard.file.tensor(name + "_lnstats", rows) if name + "_lnstats" in shard.specs else None
            value = self._flavoured(value, stats)
        if self.statistics is not None:
            value = self.statistics.apply(spec.feature, value)
        return value.to(self.dtype) if self.dtype is not None else value

    def _resolve(self, item) -> tuple[int, bool | None]:
        flipped = None
        if isinstance(item, tuple):
            item, flipped = item
            if flipped and not self.layout.flip:
                raise CacheError(f"{self.root} holds no flipped view", "extract with --flip to store one")
            flipped = bool(flipped)
        return self.position(item), flipped

    @staticmethod
    def _view_of(name: str) -> str:
        return "_flip" if name.endswith("_flip") else ""

    def _read(
        self, shard: _Shard, shard_index: int, rows: np.ndarray, views: set[str], only: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Gather `rows` of every feature tensor of the wanted views (of the features in `only`):
        dequantized, flavoured, normalized, shaped per row, cast to `dtype`."""
        if len(rows) > 1 and np.any(rows[1:] < rows[:-1]):
            order = np.argsort(rows, kind="stable")
            sorted_rows, inverse = rows[order], torch.from_numpy(np.argsort(order, kind="stable"))
        else:  # already in file order: gather straight into place
            sorted_rows, inverse = rows, None

        def gather(tensor_name: str) -> torch.Tensor:
            value = shard.file.tensor(tensor_name, _as_index(sorted_rows))
            return value if inverse is None else value[inverse]

        out = {}
        try:
            for name, spec in shard.specs.items():
                if spec.role != "value" or self._view_of(name) not in views:
                    continue
                if only is not None and spec.feature.name not in only:
                    continue
                value = gather(name)
                scale_name = name + "_scale"
                if scale_name in shard.specs:
                    value = dequantize(value, gather(scale_name))
                if spec.feature.normed and self.flavour != self.layout.normed_values:
                    stats_name = name + "_lnstats"
                    stats = gather(stats_name) if stats_name in shard.specs else None
                    value = self._flavoured(value, stats)
                if self.statistics is not None:
                    value = self.statistics.apply(spec.feature, value)
                shape = _SHAPES[spec.feature.tokens](shard.grid, self.num_registers)
                value = value.reshape(len(rows), *shape, value.shape[-1])
                out[name] = value.to(self.dtype) if self.dtype is not None else value
        except (SafetensorsError, ValueError, OSError, RuntimeError) as exc:
            raise CacheError(
                f"cannot read rows of {self.shards[shard_index]['file']}: {str(exc).splitlines()[0]}",
                "run `dinocache verify` for details",
            ) from None
        return out

    def iter_shard_rows(self, views=("",), only: set[str] | None = None, chunk_rows=lambda grid: 1024):
        """Every live row once, shard by shard (in shard order), each shard's rows in file order:
        a streaming pass over the whole cache (norm-stats). Yields (grid, chunks) per shard that
        holds live rows; `chunks` yields the rows chunk_rows(grid) at a time, as a dict of every
        feature tensor of `views` ("" plain, "_flip") whose feature is in `only` (None: all),
        valued as `cache[i]` gives them, with a leading axis of rows."""
        shard_col, row_col = np.asarray(self._shard_col), np.asarray(self._row_col)
        order = np.argsort(shard_col, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_col[order])) + 1
        for members in np.split(order, bounds) if len(order) else []:
            shard_index = int(shard_col[members[0]])
            rows = np.sort(row_col[members].astype(np.int64))
            shard = self._handle(shard_index)
            yield shard.grid, self._chunks(shard, shard_index, rows, set(views), only, chunk_rows(shard.grid))

    def _chunks(self, shard: _Shard, shard_index: int, rows: np.ndarray, views: set[str], only, size: int):
        for start in range(0, len(rows), size):
            yield self._read(shard, shard_index, rows[start : start + size], views, only)

    def _handle(self, shard_index: int) -> _Shard:
        shard = self._open.get(shard_index)
        if shard is not None:
            self._open.move_to_end(shard_index)
            return shard
        if not 0 <= shard_index < len(self.shards):
            raise CacheError(
                f"{self.root}: a sample points at shard #{shard_index}, which does not exist",
                "run `dinocache verify` for details",
            )
        record = self.shards[shard_index]
        if self._shard_cache is not None:
            self._shard_cache.fetch(record)
        path = shard_path(self.root, record["file"])
        try:
            file = SafetensorsFile(path)
        except SafetensorsError as exc:
            hint = (
                "rerun the extract command: it recomputes the rows of missing or damaged shards"
                if not path.exists() or path.stat().st_size != record["bytes"]
                else "run `dinocache verify`; rerun extract with --repair to recompute damaged shards"
            )
            raise CacheError(f"cannot open shard {record['file']}: {exc}", hint) from None
        bucket = self.buckets[record["bucket"]]
        grid = tuple(bucket["stored_grid"]) if "stored_grid" in bucket else tuple(bucket["grid"])
        specs = self.layout.tensors(self.hidden_size, self.num_registers, grid)
        problems = shard_tensor_problems(file.entries, specs, record["rows"]) + shard_identity_problems(
            file.metadata, bucket, grid, self.manifest["format_version"]
        )
        if problems:
            raise CacheError(
                f"shard {record['file']} does not match the manifest ({bucket['name']}, grid "
                f"{grid[0]}x{grid[1]}, hidden {self.hidden_size}): {'; '.join(problems[:3])}",
                "run `dinocache verify`; rerun extract with --repair to recompute it",
            )
        shard = _Shard(file, specs, grid, record["bucket"])
        self._open[shard_index] = shard
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)[1].file.close()
        return shard

    def _load_norm(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        info = self.manifest["model"].get("final_norm")
        if info is None:
            return None
        path = self._root_file(info["file"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CacheError(
                f"cannot read {info['file']}: {exc.strerror}", "rebuild the cache with extract --overwrite"
            ) from None
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CacheError(f"{info['file']} fails its sha256 checksum", "rerun extract to rewrite it")
        try:
            file = SafetensorsFile(path)
            weight, bias = file.tensor("weight").float(), file.tensor("bias").float()
        except (SafetensorsError, KeyError) as exc:
            raise CacheError(f"{info['file']} is not a final-norm file: {exc}", "rerun extract to rewrite it") from None
        if weight.shape != (self.hidden_size,) or bias.shape != (self.hidden_size,):
            raise CacheError(
                f"{info['file']} holds a norm of {list(weight.shape)}, the manifest says hidden {self.hidden_size}",
                "rebuild the cache with extract --overwrite",
            )
        return weight, bias

    def _root_file(self, name: str) -> Path:
        if name != NORM_FILE:
            raise CacheError(f"the manifest names {name!r} as the final norm", "the manifest was edited or is corrupt")
        return contained_file(self.root, name, "final-norm file")

    # ---- pickling for DataLoader workers ------------------------------------------------------
    def __getstate__(self):  # workers reopen their own memory maps
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        for name in ("table", "_shard_col", "_row_col", "_bucket_col"):
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.table = load_samples(self.root, self.manifest)  # the generation the parent opened
        self._shard_col, self._row_col, self._bucket_col = (self.table.columns[n] for n in ("shard", "row", "bucket"))


AFFINE_STEP = 32767  # float32 elements per step of affine_rows: under torch's grain, so one thread per op


def affine_rows(source: torch.Tensor, rows: np.ndarray, dest: torch.Tensor, local: np.ndarray, weight, bias) -> None:
    """dest[local[i]] = weight * source[rows[i]] + bias, computed in float32 a step at a time in
    one cache-resident buffer and rounded once into dest, with no batch-sized float32 temporary.
    Steps stay under torch's parallel grain: on busy cores its OpenMP teams stalled single-item
    reads 30x (docs/PERFORMANCE.md). torch.addcmul over a whole bf16 batch ran at 0.7 GB/s
    (mixed dtypes take torch's scalar path). Values equal flavours.apply_flavour's."""
    dim = source.shape[-1]
    src = source.reshape(source.shape[0], -1, dim)  # [N, tokens, D]
    out = dest.view(dest.shape[0], -1, dim)
    tokens = src.shape[1]
    per_step = AFFINE_STEP // (tokens * dim)
    if per_step >= 1:  # whole rows per step (cls, registers, small grids)
        for start in range(0, len(rows), per_step):
            pick = torch.from_numpy(rows[start : start + per_step])
            value = affine(src.index_select(0, pick).float(), weight, bias)
            out.index_copy_(0, torch.from_numpy(local[start : start + per_step]), value.to(out.dtype))
        return
    step = max(1, AFFINE_STEP // dim)  # tokens per step of one row
    buffer = torch.empty(min(step, tokens), dim)
    last = buffer[: tokens % step or step]
    for row, slot in zip(rows.tolist(), local.tolist()):
        for part, target in zip(src[row].split(step), out[slot].split(step)):
            work = buffer if len(part) == len(buffer) else last
            work.copy_(part)  # converts; reads the map, never writes it
            target.copy_(affine(work, weight, bias))


def _mapped(file: SafetensorsFile, name: str) -> torch.Tensor:
    """A zero-copy torch view of a tensor in the shard's read-only map (read, never written)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": we only read it
        mapped = torch.from_numpy(file.array(name))
    return mapped.view(_TORCH[file.entries[name].dtype])


PARALLEL_BYTES = 8 * 1024 * 1024  # a gather this large is split across threads
_gather_pool: tuple[int, object] | None = None  # (pid, executor): a forked DataLoader worker makes its own


def parallel_take(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[:] = source[rows], the rows split across two threads when the copy is large: one
    core's copy is bound by its memory latency, and numpy releases the GIL while it copies."""
    global _gather_pool
    threads = min(2, os.cpu_count() or 1)
    if out.nbytes < PARALLEL_BYTES or threads < 2 or len(rows) < 2:
        np.take(source, rows, axis=0, out=out, mode="clip")
        return
    if _gather_pool is None or _gather_pool[0] != os.getpid():  # threads do not survive a fork
        from concurrent.futures import ThreadPoolExecutor

        _gather_pool = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="dinocache-gather"))
    half = len(rows) // 2
    other = _gather_pool[1].submit(np.take, source, rows[half:], 0, out[half:], "clip")
    np.take(source, rows[:half], axis=0, out=out[:half], mode="clip")
    other.result()


HUGE_PAGE = 2 * 1024 * 1024
LARGE_BATCH = 8 * 1024 * 1024


_recycled: dict[tuple[int, int], list[np.ndarray]] = {}  # (pid, bytes) -> huge-page regions we made
RECYCLE = 4  # regions kept per size: enough for a prefetching loader and a training step


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch. A large one comes from a 2 MB-aligned anonymous
    mapping marked for transparent huge pages, and is reused once nothing refers to it any more:
    a fresh 48 MB torch.empty costs ~12k page faults per batch, which capped the loader at
    ~1.3 GB/s on a machine whose page cache reads at 7-9 GB/s."""
    import math
    import mmap
    import sys

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < LARGE_BATCH or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    pool = _recycled.setdefault((os.getpid(), nbytes), [])
    # A region is free when only this pool and getrefcount hold it: every tensor or view handed
    # out keeps a reference to it (torch.from_numpy keeps its array, which keeps this base).
    raw = next((region for region in pool if sys.getrefcount(region) <= 3), None)
    if raw is None:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(region, dtype=np.uint8)
        offset = (-whole.ctypes.data) % HUGE_PAGE
        try:
            region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes - nbytes % HUGE_PAGE)
        except OSError:  # huge pages unavailable here: an ordinary (slower to fault) mapping
            pass
        raw = whole[offset : offset + nbytes]
        if len(pool) < RECYCLE:
            pool.append(raw)
    return torch.from_numpy(raw).view(dtype).view(shape)


def _open_generation(root: Path):
    """The manifest and the sample table it names. An extract committing meanwhile may replace
    the table between the two reads: then the manifest is read again (see FORMAT.md)."""
    for attempt in range(3):
        manifest = read_manifest(root)
        try:
            return manifest, load_samples(root, manifest)
        except CacheError:
            if attempt == 2 or read_manifest(root)["samples"] == manifest["samples"]:
                raise
    raise AssertionError("unreachable")


def _as_index(rows: np.ndarray):
    """A run of consecutive rows as a slice (one block copy), else the array (a gather)."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (len(rows) < 3 or np.all(np.diff(rows) == 1)):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


__all__ = ["FeatureCache", "FLAVOURS"]
