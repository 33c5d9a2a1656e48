"""The shard layout, in one place: which tensors a shard holds for given storage options, their
dtypes and shapes per row, the bytes a row and a shard take, how rows are quantized and read
back, and the shard's self-describing metadata.

Writer, reader, verify, plan, state and the CLI ask this module; none restates it. A new
storage dtype is one row of STORAGE_DTYPES; a new tensor kind is one entry of FEATURES (plus
the code in features.py that computes it).

Names in a shard, for a feature F (cls, registers, patches, layer{k}_cls, layer{k}_patches;
for a model without a CLS token, SigLIP, pooled in place of cls and no layer{k}_cls) and a view
V ("" or "_flip"):
    F + V               the feature itself, in the storage dtype
    F + V + "_scale"    float32 [N]: one scale per row, for scaled (float8) storage
    F + V + "_lnstats"  float32 [N, tokens, 2]: per token (mean, std) of the final LayerNorm's
                        input, for the normed features (cls, registers, patches), so that the
                        `prenorm` flavour can be derived from one cache

The normed features hold the final LayerNorm's output without its affine (`ln_noaffine`, unit
variance per token; format 3): rounding then costs every flavour the storage dtype's own
relative precision, where storing `normed` = weight * z + bias (formats 1 and 2) made
`(normed - bias) / weight` lose it at channels whose bias is large against their weight.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .names import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS

MAX_LAYER = 1000
MAX_POOL = 64


@dataclass(frozen=True)
class StorageDtype:
    name: str
    torch_dtype: torch.dtype
    code: str  # safetensors dtype code
    itemsize: int
    scaled: bool  # stored with one float32 scale per row (`NAME_scale`); value = stored.float() * scale
    # A value is NaN or Inf exactly when these bits of it are all ones (verify checks the raw
    # integers: one AND and one max, ~9 GB/s, instead of a float conversion, ~0.6 GB/s).
    nonfinite_mask: int
    max_abs: float | None = None  # what the scale maps each row's largest magnitude to


STORAGE_DTYPES: dict[str, StorageDtype] = {
    d.name: d
    for d in (
        StorageDtype("bfloat16", torch.bfloat16, "BF16", 2, False, 0x7F80),
        StorageDtype("float16", torch.float16, "F16", 2, False, 0x7C00),
        StorageDtype("float32", torch.float32, "F32", 4, False, 0x7F800000),
        # e4m3fn has no infinity; its NaN is S.1111.111
        StorageDtype("float8_e4m3fn", torch.float8_e4m3fn, "F8_E4M3", 1, True, 0x7F, max_abs=448.0),
    )
}
# Every float code a cache file holds (shards' values and companions, statistics files' F64):
# safetensors code -> (itemsize, nonfinite mask), for verify's byte scan.
NONFINITE_BITS: dict[str, tuple[int, int]] = {
    d.code: (d.itemsize, d.nonfinite_mask) for d in STORAGE_DTYPES.values()
} | {"F64": (8, 0x7FF0000000000000)}
NORMED_VALUES = ("normed", "ln_noaffine")  # what the normed features hold: formats 1-2 / format 3
COMPANION_CODE = "F32"  # `_scale` and `_lnstats` tensors
COMPANION_ITEMSIZE = 4
VIEWS = ("", "_flip")
SUMMARIES = ("cls", "pooled")  # the single-token feature: a CLS token, or a pooling head's output


@dataclass(frozen=True)
class Feature:
    """One kind of stored token set. `tokens`: "one" (a single token: [D] per row), "registers"
    ([R, D]) or "grid" ([rows*cols, D], row-major, pooled with --pool)."""

    name: str
    tokens: str
    normed: bool  # after the final LayerNorm (the `_lnstats` companion applies)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    feature: Feature
    role: str  # "value", "scale" or "lnstats"
    row_shape: tuple[int, ...]
    code: str

    @property
    def itemsize(self) -> int:
        return (
            COMPANION_ITEMSIZE
            if self.role != "value"
            else next(d.itemsize for d in STORAGE_DTYPES.values() if d.code == self.code)
        )

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.itemsize


def storage_dtype(name: str) -> StorageDtype:
    from .errors import ConfigError

    if name not in STORAGE_DTYPES:
        raise ConfigError(f"unknown storage dtype {name!r}", f"use --storage-dtype {' / '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def stored_grid(grid: tuple[int, int] | list[int], pool: int) -> tuple[int, int]:
    """The patch grid after `pool` x `pool` average pooling (edge windows averaged over what exists)."""
    return math.ceil(grid[0] / pool), math.ceil(grid[1] / pool)


@dataclass(frozen=True)
class Layout:
    """The storage options of a cache; `tensors()` says exactly what a shard of it holds."""

    dtype: str = "bfloat16"
    registers: bool = False
    pool: int = 1
    layers: tuple[int, ...] = ()
    flip: bool = False
    ln_stats: bool = True
    normed_values: str = "ln_noaffine"  # the flavour stored for the normed features
    # the single-token feature: "cls", or "pooled" (the attention-pooling head's output of a
    # model without a CLS token, SigLIP: not a token of the final norm, so no flavours or stats)
    summary: str = "cls"

    @property
    def storage(self) -> StorageDtype:
        return STORAGE_DTYPES[self.dtype]

    def features(self) -> list[Feature]:
        out = [Feature(self.summary, "one", self.summary == "cls"), Feature("patches", "grid", True)]
        if self.registers:
            out.append(Feature("registers", "registers", True))
        for k in self.layers:
            if self.summary == "cls":
                out.append(Feature(f"layer{k}_cls", "one", False))
            out.append(Feature(f"layer{k}_patches", "grid", False))
        return out

    def views(self) -> tuple[str, ...]:
        return VIEWS if self.flip else ("",)

    def has_lnstats(self, feature: Feature) -> bool:
        # Stats belong to single tokens: pooled patches average tokens whose stats differ.
        return self.ln_stats and feature.normed and not (feature.tokens == "grid" and self.pool > 1)

    def tensors(self, hidden: int, num_registers: int, grid: tuple[int, int]) -> dict[str, TensorSpec]:
        """name -> spec for a shard of a bucket whose STORED grid is `grid` (rows, cols)."""
        tokens = {"one": None, "registers": num_registers, "grid": grid[0] * grid[1]}
        specs: dict[str, TensorSpec] = {}
        for view in self.views():
            for feature in self.features():
                name = feature.name + view
                n = tokens[feature.tokens]
                shape = (hidden,) if n is None else (n, hidden)
                specs[name] = TensorSpec(name, feature, "value", shape, self.storage.code)
                if self.storage.scaled:
                    specs[name + "_scale"] = TensorSpec(name + "_scale", feature, "scale", (), COMPANION_CODE)
                if self.has_lnstats(feature):
                    stats_shape = (2,) if n is None else (n, 2)
                    specs[name + "_lnstats"] = TensorSpec(
                        name + "_lnstats", feature, "lnstats", stats_shape, COMPANION_CODE
                    )
        return specs

    def row_bytes(self, hidden: int, num_registers: int, grid: tuple[int, int]) -> int:
        return sum(s.row_bytes for s in self.tensors(hidden, num_registers, grid).values())

    def record(self) -> dict:
        """The manifest's `storage` section."""
        return {
            "dtype": self.dtype,
            "registers": self.registers,
            "pool": self.pool,
            "layers": list(self.layers),
            "layers_normed": False,
            "scaled": self.storage.scaled,
            "flip": self.flip,
            "ln_stats": self.ln_stats,
            "normed_values": self.normed_values,
        } | ({"summary": self.summary} if self.summary != "cls" else {})  # a CLS cache's record as before

    @classmethod
    def from_record(cls, storage: dict) -> "Layout":
        """From a manifest's (or shard's) `storage` section, already schema-checked. Version 1
        caches have no `flip` and no `ln_stats`; versions 1 and 2 no `normed_values` (they store normed)."""
        return cls(
            dtype=storage["dtype"],
            registers=storage["registers"],
            pool=storage.get("pool", 1),
            layers=tuple(storage.get("layers", [])),
            flip=storage.get("flip", False),
            ln_stats=storage.get("ln_stats", False),
            normed_values=storage.get("normed_values", "normed"),
            summary=storage.get("summary", "cls"),
        )


def storage_problems(storage: Any, version: int = FORMAT_VERSION) -> list[str]:
    """Schema of a `storage` section (manifest or shard metadata) of a cache of format `version`."""
    if not isinstance(storage, dict):
        return ["storage is not an object"]
    problems = []
    if storage.get("dtype") not in tuple(STORAGE_DTYPES):
        problems.append(f"storage.dtype must be one of {', '.join(STORAGE_DTYPES)}")
    for key in ("registers", "flip", "ln_stats"):
        if not isinstance(storage.get(key, False), bool) or (key == "registers" and key not in storage):
            problems.append(f"storage.{key} must be true or false")
    pool = storage.get("pool", 1)
    if not _is_int(pool, 1, MAX_POOL):
        problems.append(f"storage.pool must be an integer 1..{MAX_POOL}")
    layers = storage.get("layers", [])
    if (
        not isinstance(layers, list)
        or not all(_is_int(k, 1, MAX_LAYER) for k in layers)
        or len(set(layers)) != len(layers)
    ):
        problems.append(f"storage.layers must be a list of distinct block numbers 1..{MAX_LAYER}")
    if (
        "scaled" in storage
        and storage.get("dtype") in tuple(STORAGE_DTYPES)
        and storage["scaled"] != STORAGE_DTYPES[storage["dtype"]].scaled
    ):
        problems.append("storage.scaled disagrees with storage.dtype")
    # Format 3 says what its normed features hold; older formats hold normed and do not say.
    if version >= 3 and storage.get("normed_values") not in NORMED_VALUES:
        problems.append(f"storage.normed_values must be one of {', '.join(NORMED_VALUES)}")
    if version < 3 and "normed_values" in storage:
        problems.append(f"storage.normed_values is not a field of format {version}")
    if storage.get("summary", "cls") not in SUMMARIES:
        problems.append(f"storage.summary must be one of {', '.join(SUMMARIES)}")
    return problems


def _is_int(value: Any, low: int, high: int = 1 << 62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# ---- values in and out ----------------------------------------------------------------------


def quantize_rows(x: torch.Tensor, dtype: StorageDtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled storage: (stored, float32 scale per row) with row = stored.float() * scale."""
    amax = x.detach().float().abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / dtype.max_abs, torch.ones_like(amax))
    q = (x.float() / scale.view(-1, *([1] * (x.dim() - 1)))).to(dtype.torch_dtype)
    return q, scale


def to_storage(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Named [B, ...] feature tensors (any float dtype; `_lnstats` already included) -> the
    tensors a shard stores, still on their device: cast, or quantized with their `_scale`."""
    out = {}
    for name, x in tensors.items():
        if name.endswith("_lnstats"):
            out[name] = x.float()
        elif layout.storage.scaled:
            out[name], out[name + "_scale"] = quantize_rows(x, layout.storage)
        else:
            out[name] = x.to(layout.storage.torch_dtype)
    return out


def dequantize(value: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored values back to numbers: scaled ones times their row's scale, in float32."""
    if scale is None:
        return value
    return value.float() * scale.float().view(-1, *([1] * (value.dim() - 1)))


def rows_per_shard(row_bytes: int, max_bytes: int) -> int:
    """How many rows a full shard holds: the writer cuts at exactly this many."""
    return max(1, -(-max_bytes // max(1, row_bytes)))


# ---- shard metadata -------------------------------------------------------------------------


def encode_json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def shard_metadata(settings: dict, bucket: dict, samples_json: str, pool: int) -> dict[str, str]:
    """A shard's `__metadata__`: enough to check and adopt it without any manifest. `settings`
    holds model, preprocessing and storage (as in the manifest); `bucket` the bucket record."""
    rows, cols = stored_grid(bucket["grid"], pool)
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "bucket": encode_json(bucket),
        "grid": f"{rows}x{cols}",
        "settings": encode_json({k: settings[k] for k in ("model", "preprocessing", "storage")}),
        "samples": samples_json,
    }


def shard_file_bytes(specs: dict[str, TensorSpec], rows: int, metadata: dict[str, str]) -> int:
    """Size of the safetensors file the writer produces for `rows` rows: 8-byte length, the JSON
    header (padded to 8 bytes) and the data. Used by `plan` to project exactly what extract writes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(specs):
        nbytes = rows * specs[name].row_bytes
        header[name] = {
            "dtype": specs[name].code,
            "shape": [rows, *specs[name].row_shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    length = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + length + (-length % 8) + offset


@dataclass
class ShardMeta:
    version: int
    bucket_name: str
    bucket: dict | None  # the bucket record (version 2 on)
    grid: tuple[int, int]
    settings: dict | None  # model, preprocessing, storage (version 2 on)
    samples: list = field(default_factory=list)


def parse_shard_metadata(meta: dict[str, str]) -> ShardMeta:
    """Check and decode a shard's metadata; ValueError says what is wrong."""
    from .stfile import parse_json_bounded

    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"metadata format is {meta.get('format')!r}, not {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version not in [str(v) for v in READABLE_VERSIONS]:
        raise ValueError(f"metadata format_version is {version!r}; this dinocache reads {READABLE_VERSIONS}")
    grid_text = meta.get("grid", "")
    parts = grid_text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) < 1 << 16 for p in parts):
        raise ValueError(f"metadata grid {grid_text!r} is not ROWSxCOLS")
    grid = (int(parts[0]), int(parts[1]))
    samples = parse_json_bounded(meta.get("samples", ""), "metadata samples")
    if not isinstance(samples, list):
        raise ValueError("metadata samples is not a list")
    if int(version) == 1:
        name = meta.get("bucket")
        if not isinstance(name, str):
            raise ValueError("metadata bucket is missing")
        return ShardMeta(1, name, None, grid, None, samples)
    bucket = parse_json_bounded(meta.get("bucket", ""), "metadata bucket")
    settings = parse_json_bounded(meta.get("settings", ""), "metadata settings")
    if not isinstance(bucket, dict) or not isinstance(bucket.get("name"), str):
        raise ValueError("metadata bucket is not a bucket record")
    if not isinstance(settings, dict) or not all(
        isinstance(settings.get(k), dict) for k in ("model", "preprocessing", "storage")
    ):
        raise ValueError("metadata settings lack model, preprocessing or storage")
    problems = storage_problems(settings["storage"], int(version))
    if problems:
        raise ValueError("metadata settings: " + "; ".join(problems))
    return ShardMeta(int(version), bucket["name"], bucket, grid, settings, samples)


def shard_identity_problems(
    meta: dict[str, str], bucket: dict, grid: tuple[int, int], version: int | None = None
) -> list[str]:
    """Whether a shard's own metadata says it is a dinocache shard of the manifest's format
    `version` that belongs to `bucket` with this stored grid (cheap: the samples are not
    parsed). Catches a manifest whose bucket table was edited so that a tensor would be
    reshaped to the wrong grid without any size mismatch."""
    problems = []
    if meta.get("format") != FORMAT_NAME:
        problems.append(f"the shard's metadata format is {str(meta.get('format'))[:40]!r}, not {FORMAT_NAME!r}")
    if version is not None and meta.get("format_version") != str(version):
        shown = str(meta.get("format_version"))[:20]
        problems.append(f"the shard's format_version is {shown!r}, the manifest's is {version} (a reader refuses it)")
    if meta.get("grid") != f"{grid[0]}x{grid[1]}":
        problems.append(
            f"the shard's grid is {meta.get('grid')!r}, the manifest's bucket {bucket.get('name')} says "
            f"{grid[0]}x{grid[1]}"
        )
    if meta.get("format_version") == "1":
        if meta.get("bucket") != bucket.get("name"):
            problems.append(f"the shard is bucket {meta.get('bucket')!r}, the manifest says {bucket.get('name')!r}")
        return problems
    try:
        recorded = json.loads(meta.get("bucket", ""))
    except ValueError:
        recorded = None
    if recorded != bucket:
        problems.append(f"the shard's bucket record differs from the manifest's bucket {bucket.get('name')}")
    return problems


def shard_tensor_problems(entries: dict, specs: dict[str, TensorSpec], rows: int | None) -> list[str]:
    """How a shard's tensors (name -> stfile.TensorEntry) differ from what the layout says:
    names, dtypes and shapes. `rows` None: any row count, the same for all tensors."""
    problems = []
    if set(entries) != set(specs):
        missing, extra = sorted(set(specs) - set(entries)), sorted(set(entries) - set(specs))
        problems.append(
            "tensors differ from the layout: "
            + ", ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unexpected {', '.join(extra)}"] if extra else [])
            )
        )
    counts = set()
    for name, spec in specs.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if entry.dtype != spec.code:
            problems.append(f"{name} is {entry.dtype}, expected {spec.code}")
        n = entry.shape[0] if entry.shape else None
        counts.add(n)
        expected = (rows if rows is not None else n, *spec.row_shape)
        if tuple(entry.shape) != expected:
            problems.append(f"{name} has shape {list(entry.shape)}, expected {list(expected)}")
    if rows is None and len(counts) > 1:
        problems.append(f"tensors disagree on the row count ({sorted(c for c in counts if c is not None)})")
    return problems
