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
from test_crash import BUCKETS, N_IMAGES, dataset, extract_args, options, run_library  # noqa: F401
from test_distributed import torchrun
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.errors import CacheError
from dinocache.extract import extract
from dinocache.manifest import OWNED
from dinocache.reports import merge_cache
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


def run_cli(root, images, out, model_dir, env, fault=None, extra=()):
    full = {**os.environ, **env}
    full.pop("DINOCACHE_FAULT", None)
    if fault:
        full["DINOCACHE_FAULT"] = fault
    cmd = [
        sys.executable,
        "-m",
        "dinocache",
        *extract_args(root, images, out, model_dir),
        "--commit-every",
        "0",
        *extra,
    ]
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


# ---- many writers, one manifest (issue 24) ------------------------------------------------------


def test_explicit_ranks_to_s3_then_merge(dataset, s3, tiny_model_dir):
    """--rank/--world-size processes write their shards and a report straight to the bucket
    (no lock, no manifest); `dinocache merge s3://...` folds them into one manifest."""
    root, images = dataset
    fs, _ = s3
    for rank in (1, 0):
        opts = options(URL, tiny_model_dir)
        opts.rank, opts.world_size = rank, 2
        extract(images, opts)
    assert not fs.exists(f"{URL}/manifest.json") and not fs.exists(f"{URL}/.lock")
    assert len(fs.ls(f"{URL}/ranks")) == 2
    merged = runner.invoke(app, ["merge", URL])
    assert merged.exit_code == 0, merged.output
    assert f"{N_IMAGES} samples" in merged.output and not fs.exists(f"{URL}/.lock")
    assert not fs.exists(f"{URL}/ranks") or not fs.ls(f"{URL}/ranks")
    assert verify_paths([URL]).ok
    assert_equals_reference(root, URL)


def test_a_writer_of_many_never_lists_the_bucket(dataset, s3, tiny_model_dir, monkeypatch):
    """A rank (or a Ray unit) only PUTs: a LIST of shards/ is one request per 1,000 shards, and
    100,000 writers listing 450,000 shards would be 45M requests."""
    from dinocache.remote import Remote

    _, images = dataset
    monkeypatch.setattr(Remote, "listing", lambda *a, **k: pytest.fail("a writer listed the bucket"))
    opts = options(URL, tiny_model_dir)
    opts.rank, opts.world_size = 1, 2
    assert extract(images, opts).processed == N_IMAGES // 2


def test_merge_reads_only_the_headers_of_reported_shards(dataset, s3, tiny_model_dir, monkeypatch):
    """A shard a rank report describes is adopted from its header (two range reads), never
    downloaded whole: at 100M images the shards are terabytes, the headers megabytes."""
    from dinocache.remote import Remote

    root, images = dataset
    for rank in (0, 1):
        opts = options(URL, tiny_model_dir)
        opts.rank, opts.world_size = rank, 2
        extract(images, opts)
    with monkeypatch.context() as patch:
        patch.setattr(Remote, "download", lambda *a, **k: pytest.fail("merge downloaded a whole object"))
        merged = merge_cache(URL)
    assert merged.shards_adopted >= 6 and merged.samples == N_IMAGES
    assert verify_paths([URL]).ok  # every shard hashed whole by verify: the reports' hashes were right
    assert_equals_reference(root, URL)


@pytest.mark.parametrize("fault", ["shard_write:2:kill", "shard_uploaded:2:kill"])
def test_a_rank_killed_mid_shard_leaves_nothing_the_manifest_names(dataset, s3, tiny_model_dir, fault):
    """Rank 1 dies while writing its second shard (not yet renamed), or once it is in the bucket
    but in no report: merge names only whole shards, the rerun fills the gap, and every image
    is in the cache exactly once."""
    root, images = dataset
    fs, env = s3
    killed = run_cli(root, images, URL, tiny_model_dir, env, fault=fault, extra=["--rank", "1", "--world-size", "2"])
    assert killed.returncode == -9
    opts = options(URL, tiny_model_dir)
    opts.rank, opts.world_size = 0, 2
    extract(images, opts)
    merged = merge_cache(URL)
    assert merged.rank_reports == 1 and merged.samples < N_IMAGES
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{URL}/shards")}
    assert all(OWNED["shards"].fullmatch(n) for n in names)  # no partial object: a PUT is whole or absent
    named = {s["file"].rsplit("/", 1)[-1] for s in FeatureCache(URL).manifest["shards"]}
    assert named <= names and verify_paths([URL]).ok
    rerun = run_cli(root, images, URL, tiny_model_dir, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{N_IMAGES - merged.samples} extracted" in rerun.stdout  # what landed is not redone
    assert verify_paths([URL]).ok
    assert_equals_reference(root, URL)


def test_two_torchrun_ranks_to_s3_equal_one_process(dataset, s3, tiny_model_dir):
    root, images = dataset
    fs, _ = s3
    proc = torchrun(root, images, URL, tiny_model_dir, 2)
    assert proc.returncode == 0, proc.stderr[:3000]
    assert f"{N_IMAGES} extracted by 2 ranks" in proc.stdout
    runs = FeatureCache(URL).manifest["runs"]
    assert sorted(r["rank"] for r in runs[-2:]) == [0, 1]
    assert not fs.exists(f"{URL}/.lock") and (not fs.exists(f"{URL}/ranks") or not fs.ls(f"{URL}/ranks"))
    assert verify_paths([URL]).ok
    assert_equals_reference(root, URL)
