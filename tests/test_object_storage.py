"""Caches on object storage (issue 16, part 2), against a real S3 API server on 127.0.0.1
(moto's standalone server, what s3fs tests itself against) through the client code users get:
s3fs via fsspec. Write, read, resume after a killed run, a corrupted object, the lock."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import fresh_bucket
from moto_server import moto_server
from test_crash import BUCKETS, N_IMAGES, dataset, extract_args, run_library  # noqa: F401
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.errors import CacheError
from dinocache.verify import verify_paths

runner = CliRunner()
URL = "s3://caches/run1"


@pytest.fixture(scope="module")
def s3_server():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture()
def s3(s3_server, tmp_path, monkeypatch):
    """A fresh bucket, credentials and endpoint in the environment (as a user would set them),
    and a private local mirror folder."""
    yield from fresh_bucket(s3_server, "caches", tmp_path, monkeypatch)


def run_cli(root, images, out, model_dir, env, fault=None):
    full = {**os.environ, **env}
    full.pop("DINOCACHE_FAULT", None)
    if fault:
        full["DINOCACHE_FAULT"] = fault
    cmd = [sys.executable, "-m", "dinocache", *extract_args(root, images, out, model_dir), "--commit-every", "0"]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)


def assert_equals_reference(root, url):
    got, ref = FeatureCache(url), FeatureCache(root / "reference")
    assert sorted(got.keys()) == sorted(ref.keys()) and len(got) == N_IMAGES
    for key in ref.keys():
        assert torch.equal(got[key]["patches"], ref[key]["patches"]), key
        assert torch.equal(got[key]["cls"], ref[key]["cls"]), key


def test_write_then_read_through_s3(dataset, s3, tiny_model_dir):
    root, images = dataset
    fs, env = s3
    proc = run_cli(root, images, URL, tiny_model_dir, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = fs.ls(f"{URL}/shards")
    assert len(names) >= 6 and fs.exists(f"{URL}/manifest.json") and not fs.exists(f"{URL}/.lock")
    assert_equals_reference(root, URL)
    report = verify_paths([URL])
    assert report.ok and report.shards == len(names), report.messages()
    stats = runner.invoke(app, ["stats", URL, "--json"])
    assert stats.exit_code == 0 and f'"images": {N_IMAGES}' in stats.output
    assert runner.invoke(app, ["keys", URL]).output.count(".png") == N_IMAGES
    again = run_cli(root, images, URL, tiny_model_dir, env)
    assert again.returncode == 0 and "0 extracted" in again.stdout


@pytest.mark.parametrize("fault", ["shard_uploaded:3:kill", "shard_renamed:3:kill"])
def test_a_killed_run_is_completed_by_a_rerun(dataset, s3, tiny_model_dir, fault):
    """Killed after the third shard reached storage (not yet in the manifest), or after it was
    durable locally but before its upload: the rerun adopts or uploads it, and finishes."""
    root, images = dataset
    fs, env = s3
    killed = run_cli(root, images, URL, tiny_model_dir, env, fault=fault)
    assert killed.returncode == -9
    fs.rm(f"{URL}/.lock")  # a dead writer's lock is removed by hand (docs/FORMAT.md)
    rerun = run_cli(root, images, URL, tiny_model_dir, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    extracted = int(rerun.stdout.split(" extracted")[0].split()[-1])
    assert extracted <= N_IMAGES - 4  # the two shards of two rows that landed were kept
    assert verify_paths([URL]).ok
    assert_equals_reference(root, URL)


def test_a_corrupted_object_is_caught_when_downloaded(dataset, s3, tiny_model_dir):
    root, images = dataset
    fs, env = s3
    assert run_cli(root, images, URL, tiny_model_dir, env).returncode == 0
    victim = sorted(fs.ls(f"{URL}/shards"))[0]
    data = bytearray(fs.cat_file(victim))
    data[-3] ^= 0x10
    fs.pipe_file(victim, bytes(data))
    report = verify_paths([URL])
    assert any(p.kind == "checksum" and victim.rsplit("/", 1)[-1] in p.message for p in report.problems)
    cache = FeatureCache(URL)
    with pytest.raises(CacheError, match="sha256"):
        for i in range(len(cache)):
            cache[i]
    result = runner.invoke(app, ["verify", URL])
    assert result.exit_code == 1


def test_one_writer_at_a_time(dataset, s3, tiny_model_dir):
    root, images = dataset
    fs, env = s3
    fs.pipe_file(f"{URL}/.lock", b'{"host": "elsewhere", "pid": 1}')
    refused = run_cli(root, images, URL, tiny_model_dir, env)
    assert refused.returncode == 2 and "being written by another dinocache process" in refused.stderr
    assert ".lock" in refused.stderr and not fs.exists(f"{URL}/manifest.json")
