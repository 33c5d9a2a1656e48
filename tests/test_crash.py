"""Crash safety: SIGKILL at chosen moments of a real `dinocache extract` process, a full disk,
and the one-writer lock. After each, a rerun completes the cache with every image exactly once,
features equal to an uninterrupted run's, and without redoing finished work."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hostile_corpus import picture

from dinocache import FeatureCache
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import CacheError
from dinocache.extract import extract
from dinocache.manifest import LOCK_NAME
from dinocache.verify import verify_cache

BUCKETS = {"buckets": [[128, 128], [160, 96]]}
N_IMAGES = 12
SHARD_MB = 0.03  # two fp32 rows of the tiny model per shard, so a run writes several shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("crash")
    images = root / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        picture(128 if i % 2 else 160, 128 if i % 2 else 96, seed=i).save(images / f"img{i:02d}.png")
    (root / "buckets.yaml").write_text(json.dumps(BUCKETS))
    reference = run_library(images, root / "reference", tiny_model_dir)
    assert reference.processed == N_IMAGES
    return root, images


def options(out, model_dir, **kwargs):
    return ExtractOptions(
        out=out,
        buckets=parse_bucket_config(BUCKETS),
        model=str(model_dir),
        workers=0,
        progress=False,
        dtype="float32",
        storage_dtype="float32",
        batch_size=1,
        shard_max_bytes=int(SHARD_MB * 1024**2),
        commit_every_s=0,
        **kwargs,
    )


def run_library(images, out, model_dir):
    return extract(images, options(out, model_dir))


def run_cli(root, images, out, model_dir, fault=None):
    env = dict(os.environ)
    env.pop("DINOCACHE_FAULT", None)
    if fault:
        env["DINOCACHE_FAULT"] = fault
    cmd = [sys.executable, "-m", "dinocache", *extract_args(root, images, out, model_dir), "--commit-every", "0"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def extract_args(root, images, out, model_dir) -> list[str]:
    """The CLI form of `options()`: the same run, as a command line."""
    return [
        "extract",
        str(images),
        "--buckets",
        str(root / "buckets.yaml"),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--workers",
        "0",
        "--no-progress",
        "--dtype",
        "float32",
        "--storage-dtype",
        "float32",
        "--batch-size",
        "1",
        "--shard-size-mb",
        str(SHARD_MB),
    ]


def durable_rows(out: Path) -> int:
    """Rows in complete shard files on disk: what a rerun must not recompute."""
    from safetensors import safe_open

    total = 0
    for path in (out / "shards").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            total += fh.get_slice("cls").get_shape()[0]
    return total


def assert_same_as_reference(root, out):
    report = verify_cache(out)
    assert report.ok, report.problems
    got, ref = FeatureCache(out), FeatureCache(root / "reference")
    assert got.keys() == ref.keys() and len(got) == N_IMAGES
    for key in ref.keys():
        assert torch.equal(got[key]["patches"], ref[key]["patches"]), key
        assert torch.equal(got[key]["cls"], ref[key]["cls"]), key


@pytest.mark.parametrize(
    "fault",
    [
        "decode:7:kill",  # while decoding, with shards already written
        "shard_write:3:kill",  # third shard in its temp file, not yet synced or renamed
        "shard_renamed:3:kill",  # third shard durable and renamed, not yet in the manifest
        "manifest_write:3:kill",  # new sample index written, manifest not yet replaced
    ],
)
def test_kill_then_rerun_completes_without_redoing_work(dataset, tmp_path, tiny_model_dir, fault):
    root, images = dataset
    out = tmp_path / "out"
    killed = run_cli(root, images, out, tiny_model_dir, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done_before = durable_rows(out)
    assert done_before < N_IMAGES
    if fault.startswith("shard_"):  # the writer is sequential: shards 1 and 2 had landed
        assert done_before >= 4
    result = run_library(images, out, tiny_model_dir)
    assert result.processed == N_IMAGES - done_before  # finished work is adopted, not redone
    if fault.startswith("shard_renamed"):
        assert result.shards_adopted >= 1  # the renamed shard the manifest never named
    assert not list((out / "shards").glob(".*.tmp*"))
    assert len(list((out / "index").iterdir())) == 1
    assert_same_as_reference(root, out)


@pytest.mark.parametrize("action", ["enospc", "late_enospc"])
def test_disk_full_keeps_the_cache_and_a_rerun_completes(dataset, tmp_path, tiny_model_dir, action):
    """`late_enospc` fails the third shard only after the run has queued the fourth, which then
    lands after the error: it must be indexed too, not left behind as an unknown file."""
    root, images = dataset
    out = tmp_path / "out"
    full = run_cli(root, images, out, tiny_model_dir, f"shard_write:3:{action}")
    assert full.returncode == 2
    assert "disk" in full.stderr and "full" in full.stderr and "Traceback" not in full.stderr
    report = verify_cache(out)
    assert report.ok, report.problems  # what landed before (or beside) the error is intact and indexed
    kept = len(FeatureCache(out))
    assert kept == durable_rows(out) and kept >= 4  # at least the two shards of two rows before it
    result = run_library(images, out, tiny_model_dir)
    assert result.processed == N_IMAGES - kept
    assert_same_as_reference(root, out)


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(dataset, tmp_path, tiny_model_dir):
    _, images = dataset
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(CacheError, match="another dinocache process"):
            run_library(images, out, tiny_model_dir)
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its lock is stale and is taken over.
    result = run_library(images, out, tiny_model_dir)
    assert result.processed == N_IMAGES
    assert not (out / LOCK_NAME).exists()
