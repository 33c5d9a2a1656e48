"""The `dinocache` command: parses options, calls the library, maps outcomes to exit codes.

Exit codes, the same for every command: 0 success (verify: intact), 1 problems found (verify;
extract: every image it tried failed), 2 a usage or input error (message + fix, no traceback),
130 / 143 interrupted by SIGINT / SIGTERM after committing what was done.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ._version import __version__
from .errors import DinocacheError
from .names import DEFAULT_MODEL, DEFAULT_OUT

EXIT_PROBLEMS, EXIT_USAGE = 1, 2

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="Cache DINOv3 features (CLS + patch tokens) per aspect bucket for DiT training.",
)


def _plain_usage_names() -> None:
    """Typer writes a required argument as {NAME} in the usage line; the convention is NAME."""
    from typer.core import TyperArgument

    original = getattr(TyperArgument, "_usage_display_name", None)
    if original is None or getattr(original, "_dinocache", False):
        return

    def plain(self) -> str:
        name = original(self)
        return name[1:].replace("}", "", 1) if name.startswith("{") else name

    plain._dinocache = True
    TyperArgument._usage_display_name = plain


_plain_usage_names()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dinocache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Cache DINOv3 features (CLS + patch tokens) per aspect bucket for DiT training.

    Exit codes: 0 ok, 1 problems found (verify; extract: every image tried failed), 2 usage error,
    130/143 interrupted.
    """


def _fail(exc: DinocacheError) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"  fix: {exc.hint}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _layer_list(text: Optional[str]) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise DinocacheError(
            f"--layers must be block numbers separated by commas, got {text!r}", "e.g. --layers 8,16"
        ) from None


def _floats3(text: Optional[str], name: str):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise DinocacheError(
            f"{name} must be three comma-separated numbers, got {text!r}", f"e.g. {name} 0.485,0.456,0.406"
        )
    return values


OUT_ARG = typer.Argument(  # a str: a cache may be a URL (s3://...), which Path would mangle
    DEFAULT_OUT, metavar="OUT", show_default=False, help=f"Cache folder (default: ./{DEFAULT_OUT})."
)
STORAGE_HELP = "Stored dtype: bfloat16 (default), float16, float32 (exact parity), float8_e4m3fn (docs/FORMAT.md)."
POOL_HELP = "Average-pool the patch grid N x N (2: 4x smaller)."
PRESET_HELP = "A recipe's own preprocessing: repa, rae, rae-siglip2 or vavae (docs/TRAINING.md)."
TOKEN_PIXELS_HELP = "Pixels per DiT token: a patch-14 encoder sees 256 px as 224 (default 16 if patch != 16; 0: off)."
LAYERS_HELP = "Also store these blocks' outputs (1-based, not normed), e.g. 8,16."
REGISTERS_HELP = "Also store the register tokens."
FLIP_HELP = "Also store the features of the mirrored image."

# Options as types (typer reads the Annotated part); the default is given where each is used.
# Shared by extract and plan, which must mean the same by them:
Source = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE",
        show_default=False,
        help="Image folder, tar shards (data/{000..099}.tar), a .zip or a list file.",
    ),
]
StorageDtype = Annotated[str, typer.Option(metavar="DTYPE", help=STORAGE_HELP)]
Pool = Annotated[int, typer.Option(min=1, max=64, metavar="N", help=POOL_HELP)]
Layers = Annotated[Optional[str], typer.Option(metavar="K,K", help=LAYERS_HELP)]
KeepRegisters = Annotated[bool, typer.Option("--keep-registers", help=REGISTERS_HELP)]
Flip = Annotated[bool, typer.Option("--flip", help=FLIP_HELP)]
Preset = Annotated[Optional[str], typer.Option("--preset", metavar="NAME", help=PRESET_HELP)]
TokenPixels = Annotated[Optional[int], typer.Option("--token-pixels", min=0, metavar="PX", help=TOKEN_PIXELS_HELP)]
ShardSizeMb = Annotated[float, typer.Option(min=0.001, metavar="MB", help="Largest shard.")]
# extract's own:
Buckets = Annotated[
    Optional[Path], typer.Option("--buckets", "-b", metavar="YAML", help="Bucket config, e.g. configs/dit-1024.yaml.")
]
Crops = Annotated[
    Optional[Path], typer.Option("--crops", metavar="JSONL", help="The trainer's own crops: key, size, box per line.")
]
Out = Annotated[str, typer.Option("--out", "-o", metavar="OUT", help="Cache folder, or s3://... (any fsspec URL).")]
Model = Annotated[
    str, typer.Option("--model", "-m", metavar="MODEL", help="Hub id, local folder, official .pth, or random:<arch>.")
]
Revision = Annotated[Optional[str], typer.Option(metavar="REV", help="Hub branch, tag or commit.")]
Device = Annotated[str, typer.Option(metavar="DEV", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(metavar="DTYPE", help="Compute: auto, bfloat16, float16, float32.")]
BatchSize = Annotated[
    Optional[int], typer.Option(min=1, metavar="N", help="Images per forward (default: config's, else by size).")
]
Workers = Annotated[
    Optional[int], typer.Option(min=0, metavar="N", help="Decode processes (default: cores - 1, at most 8).")
]
ImageMean = Annotated[Optional[str], typer.Option(metavar="R,G,B", help="Override the checkpoint's mean.")]
ImageStd = Annotated[Optional[str], typer.Option(metavar="R,G,B", help="Override the checkpoint's std.")]
CommitEvery = Annotated[float, typer.Option(min=0, metavar="S", help="Seconds between manifest commits.")]
MaxPixels = Annotated[int, typer.Option(min=1, metavar="N", help="Refuse larger images (bombs).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Rebuild a cache made with other settings.")]
Rehash = Annotated[bool, typer.Option("--rehash", help="Decide what is cached by content hash.")]
Repair = Annotated[bool, typer.Option("--repair", help="Hash every shard; recompute damaged ones.")]
Prune = Annotated[bool, typer.Option("--prune", help="Drop cached images whose file is gone.")]
RetryFailed = Annotated[bool, typer.Option("--retry-failed", help="Try failed images again, changed or not.")]
NewSource = Annotated[bool, typer.Option("--new-source", help="Accept a source other than the cache's.")]
FollowSymlinks = Annotated[bool, typer.Option("--follow-symlinks", help="Read links that lead outside SOURCE.")]
MaxFailures = Annotated[Optional[str], typer.Option(metavar="N|F", help="Stop past N failures, or a fraction (5%).")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model (GPUs).")]
SdpaBackend = Annotated[str, typer.Option(metavar="NAME", help="Attention: auto, cudnn, flash, efficient, math.")]
JpegDraft = Annotated[bool, typer.Option("--jpeg-draft", help="Decode big JPEGs at reduced scale.")]
ResizeOnDevice = Annotated[
    Optional[bool],
    typer.Option(
        "--resize-on-device/--resize-in-workers", show_default=False, help="Where to resize (default: GPU if any)."
    ),
]
Rank = Annotated[Optional[int], typer.Option(min=0, metavar="I", help="This share, without torchrun.")]
WorldSize = Annotated[Optional[int], typer.Option(min=1, metavar="N", help="Number of shares, with --rank.")]
Engine = Annotated[str, typer.Option(metavar="NAME", help="local, or ray (a Ray cluster: dinocache[ray]).")]
RayAddress = Annotated[Optional[str], typer.Option(metavar="ADDR", help="Ray cluster to join (--engine ray).")]
GpusPerWorker = Annotated[float, typer.Option(min=0, metavar="N", help="GPUs per Ray actor (--engine ray).")]
CpusPerWorker = Annotated[float, typer.Option(min=0, metavar="N", help="CPUs per Ray actor, for decoding.")]
WorkersMax = Annotated[int, typer.Option(min=1, metavar="N", help="Ray actors at most (--engine ray).")]
UnitSize = Annotated[int, typer.Option(min=1, metavar="N", help="Images per Ray work unit (--engine ray).")]


EXTRACT_HELP = """Extract features for every image of SOURCE into OUT.

SOURCE is a folder (searched recursively), webdataset tar shards (a path, URL, glob or
brace pattern), a .zip of images, or a list file (.parquet, .jsonl, .csv) of paths or URLs.

\b
Examples:
  dinocache extract data/images --buckets configs/dit-1024.yaml -o cache/
  dinocache extract 'tars/{00000..00099}.tar' -b configs/dit-512.yaml -o out/
  dinocache extract data/images --crops crops.jsonl -o cache/
  dinocache extract imgs -b configs/dit-256.yaml \\
      --model facebook/dinov2-base --preset repa
  torchrun --nproc_per_node=8 -m dinocache extract data/images \\
      --buckets configs/dit-1024.yaml -o cache/
  dinocache extract 'tars/{000..099}.tar' -b configs/dit-512.yaml \\
      --engine ray --gpus-per-worker 1 --workers-max 64 -o s3://bucket/cache
"""  # the command's --help (a constant: the command itself is its options)


@app.command(no_args_is_help=True, help=EXTRACT_HELP)
def extract(
    ctx: typer.Context,
    input_dir: Source,
    buckets: Buckets = None,
    crops: Crops = None,
    out: Out = DEFAULT_OUT,
    model: Model = DEFAULT_MODEL,
    preset: Preset = None,
    token_pixels: TokenPixels = None,
    revision: Revision = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    storage_dtype: StorageDtype = "bfloat16",
    pool: Pool = 1,
    layers: Layers = None,
    keep_registers: KeepRegisters = False,
    flip: Flip = False,
    batch_size: BatchSize = None,
    workers: Workers = None,
    image_mean: ImageMean = None,
    image_std: ImageStd = None,
    shard_size_mb: ShardSizeMb = 512,
    commit_every: CommitEvery = 30.0,
    max_pixels: MaxPixels = 178_956_970,
    overwrite: Overwrite = False,
    rehash: Rehash = False,
    repair: Repair = False,
    prune: Prune = False,
    retry_failed: RetryFailed = False,
    new_source: NewSource = False,
    follow_symlinks: FollowSymlinks = False,
    max_failures: MaxFailures = None,
    progress: Progress = True,
    compile: Compile = False,
    sdpa_backend: SdpaBackend = "auto",
    jpeg_draft: JpegDraft = False,
    resize_on_device: ResizeOnDevice = None,
    rank: Rank = None,
    world_size: WorldSize = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    gpus_per_worker: GpusPerWorker = 0.0,
    cpus_per_worker: CpusPerWorker = 1.0,
    workers_max: WorkersMax = 1,
    unit_size: UnitSize = 1000,
):
    _run_extract(ctx.params)  # every option by name


# extract's options that ExtractOptions takes as they are given
_AS_GIVEN = (
    "out",
    "model",
    "revision",
    "device",
    "dtype",
    "storage_dtype",
    "keep_registers",
    "pool",
    "flip",
    "batch_size",
    "workers",
    "max_pixels",
    "overwrite",
    "rehash",
    "prune",
    "repair",
    "retry_failed",
    "new_source",
    "follow_symlinks",
    "progress",
    "compile",
    "sdpa_backend",
    "jpeg_draft",
    "rank",
    "world_size",
    "resize_on_device",
    "crops",
    "preset",
    "token_pixels",
)


def _run_extract(given: dict) -> None:
    from .distributed import LauncherEnv
    from .extract import Interrupted
    from .extract import extract as run_extract

    input_dir, out, rank, world_size = given["input_dir"], given["out"], given["rank"], given["world_size"]
    cores = os.cpu_count() or 1
    if given["workers"] is not None and given["workers"] > cores:
        typer.echo(
            f"warning: --workers {given['workers']} is more than the {cores} cores here: no faster decoding", err=True
        )
    try:
        result = run_extract(input_dir, _extract_options(given))
    except Interrupted as exc:
        _print_extract_summary(exc.result, input_dir, world_size, rank, out)
        typer.echo(f"interrupted: {exc.kept} image(s) kept; rerun the same command to resume", err=True)
        raise typer.Exit(exc.exit_code) from None
    except DinocacheError as exc:
        _fail(exc)
    _print_extract_summary(result, input_dir, world_size, rank, out)
    if result.extracted_nothing and LauncherEnv.read().rank == 0:
        typer.echo(f"error: no image was extracted: all {result.failed_this_run} tried failed", err=True)
        typer.echo(f"  fix: `dinocache keys {out} --failed` says why (paths relative to another folder?)", err=True)
        raise typer.Exit(EXIT_PROBLEMS)


def _extract_options(given: dict):
    """extract's options as one ExtractOptions, each checked (DinocacheError) before anything runs."""
    from .config import BucketConfig, ExtractOptions, load_bucket_config, parse_max_failures

    buckets, crops, preset = given["buckets"], given["crops"], given["preset"]
    if buckets is None and crops is None:
        raise DinocacheError(
            "extract needs --buckets (a bucket config), --crops (the trainer's crops), or both",
            "e.g. --buckets configs/dit-1024.yaml",
        )
    config = load_bucket_config(buckets) if buckets is not None else None
    if crops is not None:
        from .crops import buckets_for_crops

        config = buckets_for_crops(crops, config)
    options = ExtractOptions(
        **{name: given[name] for name in _AS_GIVEN},
        buckets=config or BucketConfig([]),
        layers=_layer_list(given["layers"]),
        image_mean=_floats3(given["image_mean"], "--image-mean"),
        image_std=_floats3(given["image_std"], "--image-std"),
        shard_max_bytes=int(given["shard_size_mb"] * 1024**2),
        commit_every_s=given["commit_every"],
        max_failures=parse_max_failures(given["max_failures"]),
        engine=_engine(given),
    )
    options.layout()  # an unknown --storage-dtype is reported before anything runs
    if preset is not None:
        from .presets import check_no_crops

        check_no_crops(preset, crops)
    return options


_RAY_OPTIONS = ("ray_address", "gpus_per_worker", "cpus_per_worker", "workers_max", "unit_size")


def _engine(given: dict):
    """None (this process and its ranks), or the Ray engine's options."""
    name = given["engine"]
    if name == "local":
        import inspect

        defaults = inspect.signature(extract).parameters  # the one place the Ray options' defaults are written
        ignored = [
            f"--{option.replace('_', '-')}"
            for option in _RAY_OPTIONS
            if given.get(option, defaults[option].default) != defaults[option].default
        ]
        if ignored:
            raise DinocacheError(
                f"{', '.join(ignored)} only apply to the Ray engine, and this run is local",
                "add --engine ray (or drop them)",
            )
        return None
    if name != "ray":
        raise DinocacheError(f"--engine {name} is not an engine", "pass --engine local (the default) or --engine ray")
    from .ray_engine import RayOptions

    return RayOptions(
        given["ray_address"],
        given["gpus_per_worker"],
        given["cpus_per_worker"],
        workers_max=given["workers_max"],
        unit_size=given["unit_size"],
    )


def _print_extract_summary(result, input_dir: str, world_size, rank, out: str) -> None:
    from .distributed import LauncherEnv

    if LauncherEnv.read().rank > 0:
        return  # under torchrun, rank 0 speaks for the job
    listed = 5
    for file, why in result.repaired_shards.items():
        typer.echo(f"repaired: {file} was damaged ({why}); its rows were recomputed")
    if result.lost:
        typer.echo(
            f"lost: {len(result.lost)} image(s) of damaged shards have no source any more: "
            + ", ".join(result.lost[:listed])
            + (" ..." if len(result.lost) > listed else "")
        )
    if result.shards_adopted:
        typer.echo(f"kept {result.shards_adopted} shard(s) finished by an interrupted run")
    if result.job_processed is not None:
        typer.echo(
            f"{result.job_processed} extracted by {LauncherEnv.read().world_size} ranks, {result.skipped} "
            f"already cached -> {result.out}"
        )
    else:
        rate = f" in {result.seconds:.1f} s ({result.images_per_second:.1f} img/s)" if result.processed else ""
        typer.echo(f"{result.processed} extracted{rate}, {result.skipped} already cached -> {result.out}")
    if result.failed_this_run:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(result.failures_this_run.items()))
        typer.echo(f"{result.failed_this_run} failed this run ({reasons}): `dinocache stats {out}` lists them")
    if result.failed_before:
        typer.echo(
            f"{result.failed_before} image(s) failed in an earlier run and are unchanged "
            "(not retried; --retry-failed tries them again)"
        )
    if result.missing_sources:
        gone = result.missing_sources
        cached = len(gone) - result.missing_failed
        what = f"{cached} cached" + (f" and {result.missing_failed} failed" if result.missing_failed else "")
        typer.echo(
            f"{what} image(s) are no longer in {input_dir}: "
            + ", ".join(gone[:listed])
            + (" ..." if len(gone) > listed else "")
            + " (--prune drops them)"
        )
    if result.pruned:
        typer.echo(f"{result.pruned} image(s) whose source is gone were dropped from the cache")
    if result.stale_statistics:
        typer.echo(
            f"the cache's statistics ({', '.join(result.stale_statistics)}) no longer cover every sample: "
            f"rerun `dinocache norm-stats {out}` (with the same --flavour) before training with normalize=True"
        )
    if world_size and world_size > 1:
        typer.echo(f"rank {rank} of {world_size} done: run `dinocache merge {out}` once every rank has finished")


# plan's own:
PlanBuckets = Annotated[Optional[Path], typer.Option("--buckets", "-b", metavar="YAML", help="Bucket config.")]
PlanCrops = Annotated[Optional[Path], typer.Option("--crops", metavar="JSONL", help="The trainer's own crops.")]
PlanModel = Annotated[
    str,
    typer.Option("--model", "-m", metavar="MODEL", help="Only its shape matters (Hub id, folder, random:<arch>)."),
]
PlanOut = Annotated[Path, typer.Option("--out", "-o", metavar="OUT", help="Where the cache would go (free space).")]
PlanJson = Annotated[bool, typer.Option("--json", help="Print JSON (lists every file).")]


@app.command(no_args_is_help=True)
def plan(
    input_dir: Source,
    buckets: PlanBuckets = None,
    crops: PlanCrops = None,
    model: PlanModel = DEFAULT_MODEL,
    storage_dtype: StorageDtype = "bfloat16",
    pool: Pool = 1,
    layers: Layers = None,
    keep_registers: KeepRegisters = False,
    flip: Flip = False,
    preset: Preset = None,
    token_pixels: TokenPixels = None,
    shard_size_mb: ShardSizeMb = 512,
    out: PlanOut = Path(DEFAULT_OUT),
    as_json: PlanJson = False,
):
    """Show what extract would do, without a model: buckets, distortion, size, time.

    \b
    Example:
      dinocache plan data/images --buckets configs/dit-1024.yaml -m random:vitl16
    """
    import dataclasses

    from .layout import Layout
    from .layout import storage_dtype as check_dtype
    from .plan import format_plan, plan_extraction

    try:
        config, crop_table = _plan_buckets(input_dir, buckets, crops, out)
        check_dtype(storage_dtype)
        layout = Layout(dtype=storage_dtype, registers=keep_registers, pool=pool, layers=_layer_list(layers), flip=flip)
        if preset is not None:
            from .presets import check_no_crops

            check_no_crops(preset, crops)
        report = plan_extraction(
            input_dir,
            config,
            model,
            layout,
            out,
            shard_max_bytes=int(shard_size_mb * 1024**2),
            crops=crop_table,
            preset=preset,
            token_pixels=token_pixels,
        )
    except DinocacheError as exc:
        _fail(exc)
    typer.echo(
        json.dumps(dataclasses.asdict(report), indent=2)
        if as_json
        else format_plan(report, config, model, storage_dtype)
    )


def _plan_buckets(input_dir: str, buckets: Optional[Path], crops: Optional[Path], out: Path):
    """(the bucket config, the --crops table or None) plan works with, as extract would read them."""
    from .config import load_bucket_config

    if buckets is None and crops is None:
        raise DinocacheError("plan needs --buckets, --crops, or both", "e.g. --buckets configs/dit-1024.yaml")
    config = load_bucket_config(buckets) if buckets is not None else None
    crop_table = None
    if crops is not None:
        from .crops import buckets_for_crops, load_crops
        from .sources import open_source

        config = buckets_for_crops(crops, config)
        crop_table = load_crops(crops, config, open_source(input_dir, exclude=[out]).scan())
    return config, crop_table


@app.command(no_args_is_help=True)
def show(
    out: str = typer.Argument(..., metavar="OUT", show_default=False, help="Cache folder (or URL)."),
    key: str = typer.Argument(
        ..., metavar="KEY", show_default=False, help="The image's path relative to the input folder."
    ),
    output: Path = typer.Option(Path("dinocache_show.png"), "--output", "-o", metavar="PNG", help="Picture to write."),
    source: Optional[str] = typer.Option(
        None, "--source", metavar="DIR", help="Image folder (default: the recorded one)."
    ),
):
    """Write the image beside an RGB picture of its features (PCA of the patches).

    \b
    Example:
      dinocache show dinocache_out photos/cat.jpg -o cat-features.png
    """
    from PIL import Image

    from .show import render

    Image.init()
    if output.suffix.lower() not in Image.EXTENSION:  # checked before the work, not after it
        _fail(
            DinocacheError(
                f"cannot write {output}: {output.suffix or 'no extension'} is not a picture format",
                "end --output in .png (or .jpg, .webp)",
            )
        )
    try:
        picture = render(out, key, source)
        picture.save(output)
    except DinocacheError as exc:
        _fail(exc)
    except (OSError, ValueError) as exc:
        _fail(
            DinocacheError(
                f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}",
                "pass a writable --output path ending in .png",
            )
        )
    typer.echo(f"wrote {output} ({picture.width}x{picture.height})")


@app.command()
def keys(
    out: str = OUT_ARG,
    match: Optional[str] = typer.Option(None, "--match", metavar="GLOB", help="Only keys matching, e.g. 'cats/*'."),
    failed: bool = typer.Option(False, "--failed", help="List failed images with their reason instead."),
    as_json: bool = typer.Option(False, "--json", help="One JSON value per line (any file name round-trips)."),
):
    """List the cached keys (or the failed images), one per line.

    A key holding a tab, newline or carriage return prints it as \\t, \\n or \\r (keys never
    hold a backslash, so this is unambiguous); --failed prints key, reason and detail
    separated by tabs.

    \b
    Example:
      dinocache keys dinocache_out --match 'photos/*.jpg'
    """
    import fnmatch

    from .location import local_view
    from .manifest import read_manifest

    def line(*fields: str) -> str:
        return "\t".join(f.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r") for f in fields)

    try:
        out = local_view(out)
        listed = 0
        if failed:
            for f in read_manifest(out)["failures"]:
                if match is None or fnmatch.fnmatchcase(f["key"], match):
                    entry = {"key": f["key"], "reason": f["reason"], "detail": f.get("detail", "")}
                    typer.echo(json.dumps(entry) if as_json else line(*entry.values()))
                    listed += 1
        else:
            from .manifest import load_samples

            table = load_samples(out, read_manifest(out))
            for key in table.iter_keys():
                if match is None or fnmatch.fnmatchcase(key, match):
                    typer.echo(json.dumps(key) if as_json else line(key))
                    listed += 1
        if not listed:  # on stderr: a script reading stdout still sees an empty list
            what = "failed images recorded" if failed else "cached keys"
            typer.echo(f"no {what}{f' match {match!r}' if match else ''} in {out}", err=True)
    except DinocacheError as exc:
        _fail(exc)


@app.command("norm-stats")
def norm_stats(
    out: str = OUT_ARG,
    flavour: str = typer.Option("normed", metavar="NAME", help="normed, ln_noaffine (RAE) or prenorm."),
    views: str = typer.Option("both", metavar="WHICH", help="plain, flip or both (a --flip cache)."),
    per_position: Optional[bool] = typer.Option(
        None,
        "--per-position/--per-channel",
        help="Per position (one grid only) or per channel. Default: with --export, the --style's recipe "
        "(rae: per position, svg: per channel); else per channel.",
    ),
    eps: Optional[float] = typer.Option(
        None,
        "--eps",
        help="What normalize= adds to the variance. Default: with --export, the --style's recipe "
        "(rae 1e-5, svg 0); else 1e-6, or what was recorded.",
    ),
    recompute: bool = typer.Option(False, "--recompute", help="Recompute even if fresh ones are stored."),
    export: Optional[Path] = typer.Option(None, "--export", metavar="FILE", help="Also write them for a trainer."),
    style: str = typer.Option("rae", metavar="STYLE", help="--export format: rae (stat.pt), svg or json."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Dataset mean and variance of the cached tokens, stored in the cache.

    One streaming pass (float64, Chan's merge) over every live sample: per channel (or per
    position) of the patch tokens and of CLS, for a flavour and the views chosen.
    FeatureCache(root, flavour=..., normalize=True) then applies (x - mean) / sqrt(var + eps).
    --export writes them as the recipe's own code loads them: rae (stat.pt: mean, var [C, H, W])
    or svg (dinov3_sp_stats.pt: dinov3_sp_mean, dinov3_sp_std [1, 1, C]).

    \b
    Examples:
      dinocache norm-stats cache/ --flavour ln_noaffine \\
          --export stat.pt --style rae
      dinocache norm-stats cache/ --export dinov3_sp_stats.pt --style svg
    """
    from .normstats import check_export_target, export_statistics, require_local, resolve_style_defaults

    try:
        require_local(out)
        if export is not None:
            check_export_target(export, style)
        recipe = style if export is not None and style != "json" else None  # RAE's or SVG's own defaults
        eps_chosen = eps is not None or recipe is not None  # else a fresh entry keeps its eps
        per_position, eps = resolve_style_defaults(recipe, per_position, eps)
        _store_norm_stats(out, flavour, views, per_position, eps, eps_chosen, recompute, progress)
        if export is not None:
            export_statistics(out, export, style, flavour, per_position, views)
            container = "JSON" if style == "json" else "torch.save"
            kind = "per position" if per_position else "per channel"
            typer.echo(f"wrote {export} ({style}, {container}, {views} views, {kind})")
    except DinocacheError as exc:
        _fail(exc)


def _store_norm_stats(
    out: str, flavour: str, views: str, per_position: bool, eps: float, eps_chosen: bool, recompute: bool, progress
) -> None:
    """norm-stats without --recompute keeps fresh statistics (recording a newly chosen eps);
    else it computes them."""
    from .manifest import read_manifest
    from .normstats import compute_statistics, fresh_statistics, recorded_eps, set_recorded_eps

    manifest = read_manifest(out)
    fresh = None if recompute else fresh_statistics(manifest, flavour, views, per_position)
    kind = "per position" if per_position else "per channel"
    if fresh is not None:
        typer.echo(f"statistics for {flavour} ({views} views, {kind}) are up to date: {fresh['file']}")
        if eps_chosen and recorded_eps(fresh) != eps:
            set_recorded_eps(out, fresh["file"], eps)
            typer.echo(f"normalize=True now adds eps {eps:g} to their variance")
    else:
        result = compute_statistics(out, flavour, views, per_position, progress, eps)
        typer.echo(f"{result.samples} samples, {result.patch_tokens} patch tokens ({kind}) -> {out}/{result.file}")


@app.command()
def crops(
    out: str = OUT_ARG,
    output: Path = typer.Option(..., "--output", "-o", metavar="JSONL", help="File to write ('-': standard output)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
):
    """Write every cached sample's bucket size and crop box, one JSON line each.

    The schema `extract --crops` reads: {"key", "size": [W, H], "box": [l, t, r, b]}, boxes
    in pixels of the upright source. A trainer can crop its latents the same way.

    \b
    Example:
      dinocache crops cache/ -o crops.jsonl
    """
    from .crops import crop_lines, export_crops

    try:
        _warn_if_crops_do_not_reproduce(out)
        if str(output) == "-":
            lines = crop_lines(out)
            sys.stdout.write("".join(lines))
            typer.echo(f"wrote {len(lines)} crop(s) to standard output", err=True)
            return
        count = export_crops(out, output, overwrite)
    except DinocacheError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(DinocacheError(f"cannot write {output}: {exc.strerror or exc}", "pass a writable --output"))
    typer.echo(f"wrote {count} crop(s) to {output}")


def _warn_if_crops_do_not_reproduce(out: str) -> None:
    """Boxes reproduce a cache's pixels only where its pixels come from a box (stretch, crop)."""
    from .location import local_view
    from .manifest import read_manifest

    prep = read_manifest(local_view(out))["preprocessing"]
    if prep.get("resize") == "adm":
        typer.echo(
            "warning: this cache uses ADM's centre crop (resize: adm); these boxes are the regions it "
            "covers, rounded to pixels. `extract --crops` with them resizes bilinearly and gives other "
            "features; rebuild such a cache with resize: adm instead",
            err=True,
        )


@app.command()
def merge(out: str = OUT_ARG):
    """Fold the shards and reports of a multi-process run into the manifest.

    torchrun runs do this by themselves; use it after ranks that ran separately
    (extract --rank I --world-size N, e.g. SLURM array tasks) or after a job died.

    \b
    Example:
      dinocache merge cache/
      dinocache merge s3://bucket/cache
    """
    from .reports import merge_cache

    try:
        result = merge_cache(out)
    except DinocacheError as exc:
        _fail(exc)
    typer.echo(
        f"merged {result.shards_adopted} shard(s) and {result.rank_reports} rank report(s): "
        f"{result.samples} samples in {out}"
    )
    for note in result.coverage_notes():
        typer.echo(f"note: {note}", err=True)


Paths = Annotated[
    Optional[List[str]],
    typer.Argument(
        metavar="PATH",
        show_default=False,
        help=f"Cache folders, shards/ folders or shard files (default: ./{DEFAULT_OUT}).",
    ),
]
VerifySource = Annotated[
    Optional[str],
    typer.Option("--source", metavar="SRC", help="The images (folder, tars, .zip, list): find missing and changed."),
]
Recompute = Annotated[int, typer.Option(min=0, metavar="N", help="Re-extract N random samples and compare.")]
Seed = Annotated[int, typer.Option(metavar="S", help="Which samples --recompute takes.")]
RecomputeDevice = Annotated[str, typer.Option(metavar="DEV", help="Device for --recompute.")]
SkipValues = Annotated[bool, typer.Option("--skip-values", help="Skip the NaN/Inf scan (checksums run).")]
SourceSymlinks = Annotated[bool, typer.Option("--follow-symlinks", help="Read --source links that lead outside it.")]
VerifyJson = Annotated[bool, typer.Option("--json", help="Print a JSON report.")]
Listed = Annotated[int, typer.Option(metavar="N", help="Problems to print (all with --json).")]


@app.command()
def verify(
    paths: Paths = None,
    source: VerifySource = None,
    recompute: Recompute = 0,
    seed: Seed = 0,
    device: RecomputeDevice = "auto",
    skip_values: SkipValues = False,
    follow_symlinks: SourceSymlinks = False,
    as_json: VerifyJson = False,
    listed: Listed = 50,
):
    """Check that a cache (or loose shards) is complete and intact.

    Exit 0 if intact, 1 with a report of each problem (a cache without samples is one), 2 on a
    usage error.

    \b
    Examples:
      dinocache verify cache/ --source data/images --recompute 20
      dinocache verify cache/shards/            (the whole cache)
      dinocache verify copied-shards/*.safetensors --json
    """
    from .verify import verify_paths

    try:
        report = verify_paths(
            paths or [DEFAULT_OUT],
            check_values=not skip_values,
            source=source,
            recompute=recompute,
            seed=seed,
            device=device,
            follow_symlinks=follow_symlinks,
        )
    except DinocacheError as exc:
        _fail(exc)
    _print_verify_report(report, as_json, listed)


def _print_verify_report(report, as_json: bool, listed: int) -> None:
    """The report as text (or JSON), and the exit code: 0 intact, 1 problems."""
    from .verify import RECOMPUTE_MIN_COSINE

    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        raise typer.Exit(0 if report.ok else EXIT_PROBLEMS)
    where = ", ".join(report.paths)
    for note in report.notes:
        typer.echo(f"note: {note}")
    for skipped in report.skipped:
        typer.echo(f"skipped: {skipped}")
    if report.recomputed:
        typer.echo(
            f"recomputed {report.recomputed} sample(s) from their sources (pass: every token cosine >= "
            f"{RECOMPUTE_MIN_COSINE})"
        )
    if report.ok:
        what = "shard(s) checked on their own" if report.mode != "cache" else "shard(s) verified"
        typer.echo(f"OK: {report.samples} samples in {report.shards} {what} in {where}")
        return
    typer.echo(f"FAILED: {len(report.problems)} problem(s) in {where}", err=True)
    for problem in report.problems[:listed]:
        typer.echo(f"  - {problem.message}", err=True)
    if len(report.problems) > listed:
        typer.echo(f"  ... and {len(report.problems) - listed} more (--json lists all)", err=True)
    raise typer.Exit(EXIT_PROBLEMS)


@app.command()
def stats(out: str = OUT_ARG, as_json: bool = typer.Option(False, "--json", help="Print JSON (lists every failure).")):
    """Report what a cache holds: images per bucket, failures, bytes, model, runs.

    \b
    Example:
      dinocache stats cache/ --json
    """
    from .stats import cache_stats, format_stats

    try:
        result = cache_stats(out)
    except DinocacheError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2) if as_json else format_stats(result))


def _quiet_hub() -> None:
    """Hub retries and transformers' progress bars say nothing our own error does not: keep them
    quiet, and make huggingface_hub give up at once when offline (HF_HUB_OFFLINE is honoured)."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    warnings.filterwarnings("ignore", module="huggingface_hub")
    # botocore and s3fs log where they found credentials at INFO on every S3 command
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock", "botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main() -> None:
    import logging
    import signal

    from .interrupt import quit_on_signal

    signal.signal(signal.SIGINT, quit_on_signal)  # also when cli.main is called directly
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_hub()
    app()


if __name__ == "__main__":
    main()
