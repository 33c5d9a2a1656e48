"""The `dinocache` command: parses options, calls the library, maps errors to exit codes.

Exit codes: 0 success, 1 the cache has problems (verify), 2 a user error (message + fix, no traceback).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import DinocacheError
from .manifest import DEFAULT_OUT

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache DINOv3 features (CLS + patch tokens) per aspect bucket for DiT training.")

OUT_HELP = f"Cache folder (default: ./{DEFAULT_OUT})."


def _fail(exc: DinocacheError) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"  fix: {exc.hint}", err=True)
    raise typer.Exit(2)


def _layer_list(text: Optional[str]) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise DinocacheError(f"--layers must be block numbers separated by commas, got {text!r}", "e.g. --layers 8,16") from None


def _floats3(text: Optional[str], name: str):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise DinocacheError(f"{name} must be three comma-separated numbers, got {text!r}", f"e.g. {name} 0.485,0.456,0.406")
    return values


@app.command()
def extract(
    input_dir: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    buckets: Path = typer.Option(..., "--buckets", "-b", help="Bucket config YAML (see configs/dit-buckets.yaml)."),
    out: Path = typer.Option(Path(DEFAULT_OUT), "--out", "-o", help=OUT_HELP),
    model: str = typer.Option("facebook/dinov3-vitl16-pretrain-lvd1689m", "--model", "-m",
                              help="Hub id, local HF folder, or random:<arch> (vits16, vitb16, vitl16, ...; random weights)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Compute dtype: auto (bf16 on CUDA and bf16-capable CPUs), bfloat16, float16, float32."),
    storage_dtype: str = typer.Option("bfloat16", help="Stored dtype: bfloat16, float16, float32, float8_e4m3fn "
                                      "(per-row scale, half of bf16's size)."),
    pool: int = typer.Option(1, min=1, max=64, help="Average-pool the patch grid by POOL x POOL before storing "
                             "(2: 4x smaller)."),
    layers: Optional[str] = typer.Option(None, help="Also store these blocks' outputs (1-based, not normed), "
                                         "e.g. 8,16 for REPA-style targets."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Images per batch (default: config's, else ~64k patch tokens per batch)."),
    workers: Optional[int] = typer.Option(None, min=0, help="Decode worker processes (default: cores - 1, at most 8)."),
    keep_registers: bool = typer.Option(False, "--keep-registers", help="Also store the register tokens."),
    image_mean: Optional[str] = typer.Option(None, help="Override the normalization mean, e.g. 0.485,0.456,0.406."),
    image_std: Optional[str] = typer.Option(None, help="Override the normalization std, e.g. 0.229,0.224,0.225."),
    shard_size_mb: float = typer.Option(512, min=0.001, help="Largest shard size in MB."),
    commit_every: float = typer.Option(30.0, min=0, help="Seconds between manifest commits during a run."),
    max_pixels: int = typer.Option(178_956_970, min=1, help="Refuse images with more pixels (decompression bombs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild a cache made with different settings."),
    rehash: bool = typer.Option(False, "--rehash", help="Decide what is cached by content hash, not size + mtime."),
    prune: bool = typer.Option(False, "--prune", help="Drop cached images whose source file is gone."),
    max_failures: Optional[str] = typer.Option(None, help="Stop when more images fail: a count (100) or a fraction (0.05, 5%)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (one static graph per bucket; "
                                 "pays off on GPUs for large datasets)."),
    sdpa_backend: str = typer.Option("auto", help="Attention kernel: auto, cudnn, flash, efficient, math."),
    jpeg_draft: bool = typer.Option(False, "--jpeg-draft", help="Decode large JPEGs at reduced scale (DCT scaling) "
                                    "when the bucket is much smaller: faster, slightly different pixels."),
    resize_on_device: Optional[bool] = typer.Option(None, "--resize-on-device/--resize-in-workers",
                                                    help="Where images are resized (default: on the GPU when "
                                                    "there is one, else in the decode workers)."),
    rank: Optional[int] = typer.Option(None, min=0, help="This process's share, without torchrun (e.g. a SLURM "
                                       "array task); run `dinocache merge OUT` when all ranks are done."),
    world_size: Optional[int] = typer.Option(None, min=1, help="Number of shares, with --rank."),
):
    """Extract features for every image in INPUT_DIR.

    Example: dinocache extract data/images --buckets configs/dit-1024.yaml --out cache/

    On 8 GPUs: torchrun --nproc_per_node=8 -m dinocache extract data/images --buckets configs/dit-1024.yaml --out cache/
    """
    from .config import ExtractOptions, load_bucket_config, parse_max_failures
    from .extract import extract as run_extract

    try:
        if storage_dtype not in ("bfloat16", "float16", "float32", "float8_e4m3fn"):
            raise DinocacheError(f"unknown --storage-dtype {storage_dtype!r}",
                                 "use bfloat16, float16, float32 or float8_e4m3fn")
        options = ExtractOptions(
            out=out, buckets=load_bucket_config(buckets), model=model, revision=revision, device=device,
            dtype=dtype, storage_dtype=storage_dtype, keep_registers=keep_registers, pool=pool,
            layers=_layer_list(layers),
            image_mean=_floats3(image_mean, "--image-mean"), image_std=_floats3(image_std, "--image-std"),
            batch_size=batch_size, workers=workers, shard_max_bytes=int(shard_size_mb * 1024**2),
            commit_every_s=commit_every,
            max_pixels=max_pixels, overwrite=overwrite, rehash=rehash, prune=prune,
            max_failures=parse_max_failures(max_failures), progress=progress, compile=compile,
            sdpa_backend=sdpa_backend, jpeg_draft=jpeg_draft, rank=rank, world_size=world_size,
            resize_on_device=resize_on_device)
        result = run_extract(input_dir, options)
    except DinocacheError as exc:
        _fail(exc)
    if int(os.environ.get("RANK", "0")) > 0:
        return  # under torchrun, rank 0 speaks for the job
    rate = result.processed / result.seconds if result.seconds else 0.0
    if result.job_processed is not None:
        typer.echo(f"{result.job_processed} extracted by {os.environ.get('WORLD_SIZE')} ranks, {result.skipped} "
                   f"already cached, {result.failed} failed in the cache -> {result.out}")
    else:
        typer.echo(f"{result.processed} extracted, {result.skipped} already cached, {result.failed_this_run} failed "
                   f"({rate:.1f} img/s overall) -> {result.out}")
    if result.shards_adopted:
        typer.echo(f"{result.shards_adopted} shard(s) finished by an interrupted run were kept")
    if result.failures_by_reason:
        typer.echo("failures: " + ", ".join(f"{r}={n}" for r, n in sorted(result.failures_by_reason.items()))
                   + "  (details: dinocache stats)")
    if result.missing_sources:
        typer.echo(f"{result.missing_sources} cached image(s) no longer exist in {input_dir} (--prune drops them)")
    if result.pruned:
        typer.echo(f"{result.pruned} image(s) whose source is gone were dropped from the cache")
    if world_size and world_size > 1:
        typer.echo(f"rank {rank} of {world_size} done: run `dinocache merge {out}` once every rank has finished")


@app.command()
def plan(
    input_dir: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    buckets: Path = typer.Option(..., "--buckets", "-b", help="Bucket config YAML."),
    model: str = typer.Option("facebook/dinov3-vitl16-pretrain-lvd1689m", "--model", "-m",
                              help="Only its shape matters: a Hub id naming the size, a local folder, or random:<arch>."),
    storage_dtype: str = typer.Option("bfloat16", help="Stored dtype (see extract)."),
    keep_registers: bool = typer.Option(False, "--keep-registers"),
    pool: int = typer.Option(1, min=1, max=64),
    layers: Optional[str] = typer.Option(None, help="Extra blocks to store, e.g. 8,16."),
    out: Path = typer.Option(Path(DEFAULT_OUT), "--out", "-o", help="Where the cache would go (for the free-space check)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
):
    """Show what an extraction would do, without loading a model: buckets, distortion, size, time.

    Example: dinocache plan data/images --buckets configs/dit-1024.yaml --model facebook/dinov3-vitl16-pretrain-lvd1689m
    """
    import dataclasses

    from .config import load_bucket_config
    from .plan import format_plan, plan_extraction

    try:
        config = load_bucket_config(buckets)
        report = plan_extraction(input_dir, config, model, storage_dtype, keep_registers, pool, _layer_list(layers), out)
    except DinocacheError as exc:
        _fail(exc)
    typer.echo(json.dumps(dataclasses.asdict(report), indent=2) if as_json else format_plan(report, config, model, storage_dtype))


@app.command()
def show(
    out: Path = typer.Argument(..., help="Cache folder."),
    key: str = typer.Argument(..., help="The image's key (its path relative to the input folder)."),
    output: Path = typer.Option(Path("dinocache_show.png"), "--output", "-o", help="PNG to write."),
    source: Optional[Path] = typer.Option(None, "--source", help="Image folder (default: the one the cache recorded)."),
):
    """Write the image beside an RGB picture of its features (first 3 PCA components of the patches).

    Example: dinocache show dinocache_out photos/cat.jpg -o cat-features.png
    """
    from .show import render

    try:
        picture = render(out, key, source)
        picture.save(output)
    except DinocacheError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(DinocacheError(f"cannot write {output}: {exc.strerror or exc}", "pass a writable --output path"))
    typer.echo(f"wrote {output} ({picture.width}x{picture.height})")


@app.command()
def merge(out: Path = typer.Argument(Path(DEFAULT_OUT), help=OUT_HELP)):
    """Fold the shards and reports of a multi-process run into the manifest.

    torchrun runs do this by themselves; use it after ranks that ran separately
    (extract --rank I --world-size N, e.g. SLURM array tasks) or after a job died.

    Example: dinocache merge cache/
    """
    from .extract import merge_cache

    try:
        result = merge_cache(out)
    except DinocacheError as exc:
        _fail(exc)
    typer.echo(f"merged {result.shards_adopted} shard(s) and {result.rank_reports} rank report(s): "
               f"{result.samples} samples in {out}")


@app.command()
def verify(out: Path = typer.Argument(Path(DEFAULT_OUT), help=OUT_HELP),
           source: Optional[Path] = typer.Option(None, "--source", help="Image folder: list images missing from the "
                                                 "cache and cached images whose source changed."),
           recompute: int = typer.Option(0, min=0, help="Re-extract N random samples from --source and compare features."),
           seed: int = typer.Option(0, help="Which random samples --recompute takes."),
           device: str = typer.Option("auto", help="Device for --recompute."),
           skip_values: bool = typer.Option(False, "--skip-values", help="Skip the NaN/Inf scan (checksums still run).")):
    """Check that a cache is complete and intact. Exit 0 if clean, 1 with a report if not.

    Example: dinocache verify cache/ --source data/images --recompute 20
    """
    from .verify import RECOMPUTE_MIN_COSINE, verify_cache

    try:
        report = verify_cache(out, check_values=not skip_values, source=source, recompute=recompute, seed=seed,
                              device=device)
    except DinocacheError as exc:
        _fail(exc)
    for note in report.notes:
        typer.echo(f"note: {note}")
    if report.recomputed:
        typer.echo(f"recomputed {report.recomputed} sample(s) from their sources (pass: every token cosine >= "
                   f"{RECOMPUTE_MIN_COSINE})")
    if report.ok:
        typer.echo(f"OK: {report.samples} samples in {report.shards} shard(s) verified in {out}")
        return
    typer.echo(f"FAILED: {len(report.problems)} problem(s) in {out}", err=True)
    for problem in report.problems[:200]:
        typer.echo(f"  - {problem}", err=True)
    if len(report.problems) > 200:
        typer.echo(f"  ... and {len(report.problems) - 200} more", err=True)
    raise typer.Exit(1)


@app.command()
def stats(out: Path = typer.Argument(Path(DEFAULT_OUT), help=OUT_HELP),
          as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
    """Report what a cache holds: images per bucket, failures by reason, bytes, model and dtype.

    Example: dinocache stats cache/ --json
    """
    from .stats import cache_stats, format_stats

    try:
        result = cache_stats(out)
    except DinocacheError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2) if as_json else format_stats(result))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # retries are reported by our own error
    app()


if __name__ == "__main__":
    main()
