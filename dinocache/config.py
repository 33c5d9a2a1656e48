"""The bucket config file (YAML) and the options of one extraction, validated up front.

Every error names the field, says what is wrong and how to fix it, so a bad config never
reaches the model (and never produces a traceback).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .buckets import MAX_SIDE, MIN_SIDE, RESIZE_MODES, generate_sizes
from .errors import ConfigError

CONFIG_KEYS = ("buckets", "generate", "resize", "batch_size")
GENERATE_KEYS = ("resolution", "step", "min_side", "max_side", "max_aspect")
EXAMPLE = "buckets: [[1024, 1024], [832, 1216], [1216, 832]]   # [width, height] pairs"


@dataclass(frozen=True)
class BucketConfig:
    """What a bucket config file says: the bucket sizes and how images are fitted to them."""

    sizes: list[tuple[int, int]]  # (width, height), the trainer's sizes, in table order
    resize: str = "stretch"
    batch_size: int | None = None  # None: chosen per bucket from its token count
    source: str = "<inline>"


@dataclass
class ExtractOptions:
    """Everything `extract` needs besides the input folder; the CLI fills it from flags."""

    out: Path
    buckets: BucketConfig
    model: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"  # compute dtype
    storage_dtype: str = "bfloat16"
    keep_registers: bool = False
    pool: int = 1  # average-pool the patch grid by pool x pool before storing
    layers: tuple[int, ...] = ()  # also store the (un-normed) outputs of these blocks, 1-based
    image_mean: tuple[float, float, float] | None = None  # None: from the checkpoint
    image_std: tuple[float, float, float] | None = None
    batch_size: int | None = None  # overrides the config's
    workers: int | None = None  # None: one per spare core, at most 8
    shard_max_bytes: int = 512 * 1024**2
    max_pixels: int = 178_956_970  # Pillow's own decompression-bomb limit, checked from the header
    overwrite: bool = False
    rehash: bool = False  # compare content hashes, not only size + mtime, to decide what is cached
    prune: bool = False  # drop cached images whose source file is gone
    max_failures: int | float | None = None  # a count, or a fraction of the images tried
    progress: bool = True
    commit_every_s: float = 30.0  # how often the manifest is rewritten during a run
    seed: int = 0  # for random:<arch> weights
    compile: bool = False  # torch.compile the model, one static graph per bucket shape
    sdpa_backend: str = "auto"
    rank: int | None = None  # explicit rank / world size (no process group; `dinocache merge` after)
    world_size: int | None = None
    jpeg_draft: bool = False  # let libjpeg decode at a reduced scale when the bucket is much smaller
    resize_on_device: bool | None = None  # None: on CUDA, workers only decode and the GPU resizes
    repair: bool = False  # hash every shard the cache relies on (a cheap size check always runs)
    flip: bool = False  # also store the features of the horizontally mirrored model input
    ln_stats: bool = True  # per-token final-norm statistics (the ln_noaffine / prenorm flavours)
    follow_symlinks: bool = False  # read links that lead outside the input folder
    crops: Path | None = None  # a JSONL file of the trainer's own crops (key, size, box)
    retry_failed: bool = False  # try every recorded failure again, changed or not
    new_source: bool = False  # accept a source other than the one the cache was built from
    preset: str | None = None  # a recipe's own preprocessing (presets.py)
    token_pixels: int | None = None  # pixels per DiT token (None: 16 for encoders whose patch is not 16; 0: off)
    engine: object = None  # where the work runs: None here, a ray_engine.RayOptions on a Ray cluster

    def layout(self):
        from .layout import Layout, storage_dtype

        storage_dtype(self.storage_dtype)  # a clear error for an unknown name
        return Layout(
            dtype=self.storage_dtype,
            registers=self.keep_registers,
            pool=self.pool,
            layers=tuple(self.layers),
            flip=self.flip,
            ln_stats=self.ln_stats,
        )


def parse_max_failures(text: str | None) -> int | float | None:
    """'100' -> 100 images; '0.05' or '5%' -> a fraction of the images tried."""
    if text is None:
        return None
    hint = "write a count (--max-failures 100) or a fraction (--max-failures 0.05 or 5%)"
    try:
        if text.endswith("%"):
            value: int | float = float(text[:-1]) / 100
        elif text.isdigit():
            value = int(text)
        else:
            value = float(text)
    except ValueError:
        raise ConfigError(f"--max-failures {text!r} is not a number", hint) from None
    if isinstance(value, float) and not 0 <= value < 1:
        raise ConfigError(f"--max-failures {text!r} must be a fraction below 1 (or a whole count)", hint)
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number, got {value!r}", "write it as e.g. 1024")
    if value <= 0:
        raise ConfigError(f"{where} must be positive, got {value}", "write a positive whole number")
    return value


def _side(value: Any, where: str) -> int:
    """A bucket side in pixels: the bounds the manifest check applies too."""
    value = _positive_int(value, where)
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise ConfigError(
            f"{where} is {value} pixels; a bucket side must be {MIN_SIDE}..{MAX_SIDE}",
            f"use a size between {MIN_SIDE} (one patch) and {MAX_SIDE}, e.g. 1024",
        )
    return value


def parse_bucket_config(data: Any, source: str = "<inline>") -> BucketConfig:
    """Validate the parsed YAML of a bucket config."""
    if data is None:
        raise ConfigError(f"{source} is empty", f"write for example:\n    {EXAMPLE}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source} must be a mapping at the top level, got {type(data).__name__}",
            f"write for example:\n    {EXAMPLE}",
        )
    unknown = sorted(set(map(str, data)) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}", f"allowed keys are {', '.join(CONFIG_KEYS)}"
        )
    has_list, has_gen = "buckets" in data, "generate" in data
    if has_list == has_gen:
        raise ConfigError(
            f"{source} must have exactly one of 'buckets' (an explicit list) or 'generate' (a rule)",
            f"write for example:\n    {EXAMPLE}",
        )
    sizes = _parse_bucket_list(data["buckets"], source) if has_list else _parse_generate(data["generate"], source)

    resize = data.get("resize", "stretch")
    if resize not in RESIZE_MODES:
        raise ConfigError(
            f"{source}: resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}",
            "use 'stretch' (whole image, no crop), 'crop' (cover + centre crop) or 'adm' (ADM's centre crop)",
        )
    batch_size = data.get("batch_size")
    if batch_size is not None:
        batch_size = _positive_int(batch_size, f"{source}: batch_size")
    return BucketConfig(sizes=sizes, resize=resize, batch_size=batch_size, source=source)


def _parse_bucket_list(items: Any, source: str) -> list[tuple[int, int]]:
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"{source}: 'buckets' must be a non-empty list of [width, height] pairs",
            f"write for example:\n    {EXAMPLE}",
        )
    sizes: list[tuple[int, int]] = []
    seen: dict[tuple[int, int], int] = {}
    for i, item in enumerate(items):
        where = f"{source}: buckets[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"{where} must be a [width, height] pair, got {item!r}", "write it as [1024, 1024]")
        w = _side(item[0], f"{where} width")
        h = _side(item[1], f"{where} height")
        if (w, h) in seen:
            raise ConfigError(f"{where} = [{w}, {h}] duplicates buckets[{seen[w, h]}]", "remove one of them")
        seen[w, h] = i
        sizes.append((w, h))
    return sizes


def _parse_generate(spec: Any, source: str) -> list[tuple[int, int]]:
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{source}: 'generate' must be a mapping",
            "write e.g. generate: {resolution: 1024, step: 64, max_aspect: 2.0}",
        )
    unknown = sorted(set(map(str, spec)) - set(GENERATE_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) under generate: {', '.join(unknown)}",
            f"allowed keys are {', '.join(GENERATE_KEYS)}",
        )
    if "resolution" not in spec:
        raise ConfigError(
            f"{source}: generate.resolution is missing", "add e.g. resolution: 1024 (side of the square bucket)"
        )
    kwargs = {
        k: (_positive_int if k == "step" else _side)(spec[k], f"{source}: generate.{k}")
        for k in GENERATE_KEYS[:4]
        if k in spec
    }
    if kwargs.get("step", 64) % 8:
        raise ConfigError(
            f"{source}: generate.step must be a multiple of 8 (a VAE's downsampling), got {kwargs['step']}",
            "use 64 (kohya's default), 32 or 16",
        )
    if "max_aspect" in spec:
        aspect = spec["max_aspect"]
        if isinstance(aspect, bool) or not isinstance(aspect, (int, float)) or aspect < 1:
            raise ConfigError(f"{source}: generate.max_aspect must be a number >= 1, got {aspect!r}", "use e.g. 2.0")
        kwargs["max_aspect"] = float(aspect)
    if kwargs.get("min_side", 256) > kwargs.get("max_side", 2048):
        raise ConfigError(f"{source}: generate.min_side is larger than generate.max_side", "swap them")
    sizes = generate_sizes(**kwargs)
    if not sizes:
        raise ConfigError(f"{source}: generate produced no bucket", "lower min_side or raise max_side / max_aspect")
    return sizes


def load_bucket_config(path: str | Path) -> BucketConfig:
    """Read and validate a bucket config file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"bucket config {path} {what}", "pass --buckets with a YAML file, e.g. configs/dit-1024.yaml")
    try:
        with path.open(encoding="utf-8") as fh:  # a file handle: YAML errors then name the file
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read bucket config {path}: {exc.strerror}", "check the file's permissions") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"bucket config {path} is not valid YAML: {exc}", f"write for example:\n    {EXAMPLE}"
        ) from None
    return parse_bucket_config(data, source=str(path))
