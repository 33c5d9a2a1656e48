"""Batch sizes from memory, and a run that survives running out of it (issue 14, CPU parts)."""

import os
import subprocess
import sys

import torch
from test_crash import dataset, extract_args  # noqa: F401

from dinocache import FeatureCache
from dinocache.buckets import make_buckets
from dinocache.decoding import BatchSizes
from dinocache.manifest import read_manifest
from dinocache.verify import verify_cache


def run_cli(root, images, out, model_dir, batch, fault=None):
    env = dict(os.environ)
    env.pop("DINOCACHE_FAULT", None)
    if fault:
        env["DINOCACHE_FAULT"] = fault
    args = extract_args(root, images, out, model_dir)
    args[args.index("--batch-size") + 1] = str(batch)
    return subprocess.run(
        [sys.executable, "-m", "dinocache", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_out_of_memory_halves_the_batch_and_loses_no_image(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    clean = run_cli(root, images, tmp_path / "clean", tiny_model_dir, batch=4)
    assert clean.returncode == 0, clean.stderr[-2000:]
    hit = run_cli(root, images, tmp_path / "oom", tiny_model_dir, batch=4, fault="forward:1:oom")
    assert hit.returncode == 0, hit.stderr[-2000:]
    assert "out of memory with 4 images" in hit.stderr and "batches of 2" in hit.stderr
    run = read_manifest(tmp_path / "oom")["runs"][-1]
    assert run["oom_retries"] == 1 and set(run["batch_sizes"].values()) == {2}
    assert verify_cache(tmp_path / "oom").ok
    a, b = FeatureCache(tmp_path / "clean"), FeatureCache(tmp_path / "oom")
    assert a.keys() == b.keys() and len(b) == 12  # every image, once
    for key in a.keys():  # fp32: the same features (batch size only reorders reductions)
        torch.testing.assert_close(a[key]["patches"], b[key]["patches"], atol=1e-5, rtol=1e-5)


def test_one_image_that_does_not_fit_is_a_clear_error(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    hit = run_cli(root, images, tmp_path / "oom", tiny_model_dir, batch=1, fault="forward:1:oom")
    assert hit.returncode == 2 and "Traceback" not in hit.stderr
    assert "runs out of memory on a single" in hit.stderr and str(tiny_model_dir) in hit.stderr
    assert "bucket 128x128" in hit.stderr or "bucket 160x96" in hit.stderr
    assert "Tried to allocate" in hit.stderr  # the memory it needed, as torch reported it


def test_batch_sizes_come_from_measured_memory_on_gpus():
    bucket = make_buckets([(1024, 1024)], 16)[0]
    gpu = BatchSizes(None, "cuda")
    assert gpu.for_bucket(bucket) == 16  # the first guess: 64k patch tokens
    assert gpu.learn(bucket, images=16, activation_bytes=16 * 2**30, budget_bytes=60 * 2**30) == 48
    assert gpu.for_bucket(bucket) == 48 and not gpu.needs_measuring(bucket)
    gpu.halved[bucket.index] = 24  # an out-of-memory later wins
    assert gpu.for_bucket(bucket) == 24
    fixed = BatchSizes(8, "cuda")
    assert fixed.learn(bucket, 8, 2**30, 2**40) is None and fixed.for_bucket(bucket) == 8
    cpu = BatchSizes(None, "cpu")
    assert not cpu.needs_measuring(bucket) and cpu.for_bucket(bucket) == 1  # 4k tokens on a CPU
    tiny = BatchSizes(None, "cuda")
    assert tiny.learn(bucket, 1, 2**20, 2**40) == BatchSizes.MAX  # capped
