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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import CacheError
from .flavours import FLAVOURS, apply_flavour, flavour_problem
from .layout import Layout, TensorSpec, dequantize, shard_identity_problems, shard_tensor_problems
from .manifest import DEFAULT_OUT, NORM_FILE, load_samples, read_manifest, shard_path
from .stfile import SafetensorsError, SafetensorsFile

_SHAPES = {"one": lambda grid, r: (), "registers": lambda grid, r: (r,), "grid": lambda grid, r: tuple(grid)}


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

    `flavour`: "normed" (stored: last_hidden_state), "ln_noaffine" (RAE) or "prenorm"
    (hidden_states[-1]); see flavours.py. `normalize=True` (or "channel", or "position")
    applies the cache's dataset statistics for that flavour (`dinocache norm-stats`):
    (x - mean) / sqrt(var + 1e-6) on cls and patches. float8 caches are dequantized on read.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_OUT,
        dtype: torch.dtype | None = None,
        max_open_shards: int = 64,
        flavour: str = "normed",
        normalize: bool | str = False,
    ):
        self.root = Path(root)
        self.dtype = dtype
        self.manifest, self.table = _open_generation(self.root)  # the table is memory-mapped, sorted by key
        self._shard_col = self.table.columns["shard"]
        self._row_col = self.table.columns["row"]
        self._bucket_col = self.table.columns["bucket"]
        self.buckets = self.manifest["buckets"]
        self.shards = self.manifest["shards"]
        self.layout = Layout.from_record(self.manifest["storage"])
        model = self.manifest["model"]
        self.hidden_size, self.num_registers = model["hidden_size"], model["num_registers"]
        self.flavour = flavour
        self._norm = self._load_norm() if flavour != "normed" else None
        problem = flavour_problem(
            flavour,
            self._norm is not None or "final_norm" in model,
            self.layout.ln_stats and self.layout.pool == 1,
            self.layout.pool,
        )
        if problem:
            raise CacheError(
                f"{self.root}: {problem}",
                "rebuild the cache with the current dinocache "
                "(extract --overwrite, without --pool for prenorm) or read flavour='normed'",
            )
        self.statistics = None
        if normalize:
            from .normstats import load_statistics

            if normalize not in (True, "channel", "position"):
                raise CacheError(f"normalize={normalize!r}", "use True (per channel), 'channel' or 'position'")
            self.statistics = load_statistics(self.root, self.manifest, flavour, per_position=normalize == "position")
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._max_open = max_open_shards

    # ---- the index --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    def keys(self) -> list[str]:
        """All keys, sorted (index i of this list is sample i)."""
        return self.table.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.table.find(key) >= 0

    def bucket_of(self, i: int) -> int:
        return int(self._bucket_col[i])

    def bucket_indices(self) -> np.ndarray:
        """The bucket of every sample, as an array (for samplers)."""
        return np.asarray(self._bucket_col)

    def shard_indices(self) -> np.ndarray:
        """The shard of every sample, as an array (for locality-aware samplers)."""
        return np.asarray(self._shard_col)

    def record(self, item: int | str) -> dict:
        """The sample's bookkeeping: source size/mtime/sha256, upright size, crop box, shard, row, bucket."""
        return self.table.record(self.index_of(item) if isinstance(item, str) else int(item))

    def index_of(self, key: str) -> int:
        i = self.table.find(key)
        if i < 0:
            raise KeyError(f"{key!r} is not in the cache at {self.root}")
        return i

    # ---- reading ----------------------------------------------------------------------------
    def __getitem__(self, item) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list) -> list[dict]:
        """Read many samples at once: rows of one shard are gathered with one copy per tensor."""
        resolved = [self._resolve(item) for item in items]
        by_shard: dict[int, list[int]] = {}
        for pos, (i, _) in enumerate(resolved):
            by_shard.setdefault(int(self._shard_col[i]), []).append(pos)
        out: list[dict | None] = [None] * len(items)
        for shard_index, positions in by_shard.items():
            shard = self._handle(shard_index)
            rows = np.array([int(self._row_col[resolved[p][0]]) for p in positions], dtype=np.int64)
            if rows.min() < 0 or rows.max() >= self.shards[shard_index]["rows"]:
                raise CacheError(
                    f"{self.root}: a sample points past the end of {self.shards[shard_index]['file']}",
                    "run `dinocache verify` for details",
                )
            views = {view for p in positions for view in self._views(resolved[p][1])}
            batch = self._read(shard, shard_index, rows, views)
            bucket = self.buckets[shard.bucket_index]
            for j, p in enumerate(positions):
                i, flipped = resolved[p]
                item = {
                    "key": self.table.key(i),
                    "bucket": bucket["name"],
                    "bucket_index": shard.bucket_index,
                    "grid": shard.grid,
                }
                if flipped is None:
                    item.update({name: value[j] for name, value in batch.items()})
                else:
                    suffix = "_flip" if flipped else ""
                    item.update(
                        {
                            name[: len(name) - len(suffix)] if suffix else name: value[j]
                            for name, value in batch.items()
                            if self._view_of(name) == suffix
                        }
                    )
                    item["flipped"] = bool(flipped)
                out[p] = item
        return out  # type: ignore[return-value]

    def _resolve(self, item) -> tuple[int, bool | None]:
        flipped = None
        if isinstance(item, tuple):
            item, flipped = item
            if flipped and not self.layout.flip:
                raise CacheError(f"{self.root} holds no flipped view", "extract with --flip to store one")
            flipped = bool(flipped)
        i = self.index_of(item) if isinstance(item, str) else int(item)
        if not 0 <= i < len(self.table):
            raise IndexError(f"index {i} out of range for a cache of {len(self.table)} samples")
        return i, flipped

    def _views(self, flipped: bool | None) -> tuple[str, ...]:
        if flipped is None:
            return self.layout.views()
        return ("_flip",) if flipped else ("",)

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
                if spec.feature.normed and self.flavour != "normed":
                    stats_name = name + "_lnstats"
                    stats = gather(stats_name) if stats_name in shard.specs else None
                    value = apply_flavour(self.flavour, value, self._norm[0], self._norm[1], stats)
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
            file.metadata, bucket, grid
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
                f"{info['file']} holds a norm of {list(weight.shape)}, the model is {self.hidden_size} wide",
                "rebuild the cache with extract --overwrite",
            )
        return weight, bias

    def _root_file(self, name: str) -> Path:
        from .fileio import contained_file

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
