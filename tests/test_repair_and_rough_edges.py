"""Repair, interruption, failing fast, and the rough edges a newcomer hit (issue 10)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_scene
from test_crash import (  # noqa: F401
    N_IMAGES,
    assert_same_as_reference,
    dataset,
    durable_rows,
    extract_args,
    options,
    run_library,
)
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import CacheError, ConfigError, DinocacheError
from dinocache.extract import extract
from dinocache.manifest import read_manifest
from dinocache.verify import verify_cache

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli_env(**extra):
    env = dict(os.environ)
    env.pop("DINOCACHE_FAULT", None)
    env.update(extra)
    return env


# ---- repair -------------------------------------------------------------------------------------


def test_a_truncated_and_a_deleted_shard_are_recomputed_and_nothing_else(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    out = tmp_path / "out"
    run_library(images, out, tiny_model_dir)
    manifest = read_manifest(out)
    table = FeatureCache(out)
    first, second = manifest["shards"][0], manifest["shards"][1]
    (out / first["file"]).write_bytes((out / first["file"]).read_bytes()[:-100])
    (out / second["file"]).unlink()
    assert not verify_cache(out).ok
    with pytest.raises(CacheError, match="rerun the extract command"):
        shard_rows = [i for i in range(len(table)) if table.record(i)["shard"] == 1]
        FeatureCache(out)[shard_rows[0]]
    result = run_library(images, out, tiny_model_dir)
    assert set(result.repaired_shards) == {first["file"], second["file"]}
    assert result.processed == first["rows"] + second["rows"]  # exactly the lost rows
    assert not (out / first["file"]).exists()  # the damaged file is gone, not adopted again
    assert_same_as_reference(root, out)  # verify passes, features equal an uninterrupted run's


def test_repair_hashes_shards_and_catches_a_flipped_byte(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    out = tmp_path / "out"
    run_library(images, out, tiny_model_dir)
    shard = read_manifest(out)["shards"][2]
    path = out / shard["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # same size: only a checksum sees it
    path.write_bytes(bytes(data))
    assert run_library(images, out, tiny_model_dir).processed == 0  # the cheap check cannot see it
    assert any(p.kind == "checksum" for p in verify_cache(out).problems)
    repaired = extract(images, options(out, tiny_model_dir, repair=True))
    assert list(repaired.repaired_shards) == [shard["file"]] and repaired.processed == shard["rows"]
    assert_same_as_reference(root, out)


def test_an_image_that_became_unreadable_is_failed_not_cached(mixed_images, tmp_path, tiny_model_dir):
    def run():
        return extract(
            mixed_images,
            ExtractOptions(
                out=tmp_path / "out",
                buckets=parse_bucket_config({"buckets": [[224, 224], [384, 192]]}),
                model=str(tiny_model_dir),
                workers=0,
                progress=False,
            ),
        )

    run()
    assert "wide.png" in FeatureCache(tmp_path / "out")
    (mixed_images / "wide.png").write_bytes(b"this is no longer a picture")
    result = run()
    assert result.failures_this_run == {"not_an_image": 1}
    assert "wide.png" not in FeatureCache(tmp_path / "out")  # one rule: cached or failed, never both
    assert verify_cache(tmp_path / "out").ok
    save_scene(mixed_images / "wide.png", 600, 300, seed=2)  # fixed again: extracted again
    assert run().processed == 1 and verify_cache(tmp_path / "out").ok


def test_a_file_name_that_is_not_utf8_is_recorded_and_the_run_goes_on(mixed_images, tmp_path, tiny_model_dir):
    bad = os.path.join(os.fsencode(mixed_images), b"caf\xe9.png")
    save_scene(Path(os.fsdecode(bad)), 100, 100, seed=3)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "extract",
            str(mixed_images),
            "-b",
            str(REPO / "configs" / "example-small.yaml"),
            "-o",
            str(out),
            "-m",
            str(tiny_model_dir),
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    failures = {f["key"]: f["reason"] for f in read_manifest(out)["failures"]}
    assert failures == {"caf\\xe9.png": "bad_filename"} and len(FeatureCache(out)) == 4
    assert verify_cache(out).ok
    again = extract(
        mixed_images,
        ExtractOptions(
            out=out,
            buckets=parse_bucket_config({"buckets": [[224, 224], [210, 300], [320, 224], [384, 192]]}),
            model=str(tiny_model_dir),
            workers=0,
            progress=False,
        ),
    )
    assert again.failed_before == 1 and again.processed == 0


# ---- bounds, modes, messages ---------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[[4000000, 16]], [[8, 8]], [[16, 9000]]])
def test_bucket_sizes_outside_16_to_8192_are_refused_at_config_time(sizes):
    with pytest.raises(ConfigError, match="16..8192"):
        parse_bucket_config({"buckets": sizes})


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_shards_respect_the_umask(mixed_images, tmp_path, tiny_model_dir, umask):
    old = os.umask(umask)
    try:
        extract(
            mixed_images,
            ExtractOptions(
                out=tmp_path / "out",
                buckets=parse_bucket_config({"buckets": [[224, 224]]}),
                model=str(tiny_model_dir),
                workers=0,
                progress=False,
            ),
        )
    finally:
        os.umask(old)
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".lock"}
    assert modes == {0o666 & ~umask}


def test_show_explains_failed_and_unknown_keys_and_keys_lists_them(mixed_images, tmp_path, tiny_model_dir):
    (mixed_images / "notes.jpg").write_text("not a picture")
    out = tmp_path / "out"
    extract(
        mixed_images,
        ExtractOptions(
            out=out,
            buckets=parse_bucket_config({"buckets": [[224, 224]]}),
            model=str(tiny_model_dir),
            workers=0,
            progress=False,
        ),
    )
    failed = runner.invoke(app, ["show", str(out), "notes.jpg", "-o", str(tmp_path / "x.png")])
    assert failed.exit_code == 2 and "not_an_image" in failed.output
    typo = runner.invoke(app, ["show", str(out), "squar.png", "-o", str(tmp_path / "x.png")])
    assert typo.exit_code == 2 and "'square.png'" in typo.output and "dinocache keys" in typo.output
    listed = runner.invoke(app, ["keys", str(out)])
    assert listed.exit_code == 0 and "square.png" in listed.output.split()
    assert "notes.jpg\tnot_an_image" in runner.invoke(app, ["keys", str(out), "--failed"]).output
    assert (REPO / "configs" / "dit-1024.yaml").is_file()  # the file the help and errors point to


def test_every_help_fits_80_columns():
    env = cli_env(COLUMNS="80")
    for command in ["", "extract", "plan", "verify", "stats", "show", "keys", "merge"]:
        proc = subprocess.run(
            [sys.executable, "-m", "dinocache", *command.split(), "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert all(len(line) <= 80 for line in proc.stdout.splitlines()), (command, proc.stdout)
        assert "<bool>" not in proc.stdout and "{" not in proc.stdout.splitlines()[0], command
    version = subprocess.run([sys.executable, "-m", "dinocache", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("dinocache ")


# ---- failing fast --------------------------------------------------------------------------------


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    result = runner.invoke(
        app,
        [
            "extract",
            str(tmp_path / "empty"),
            "-b",
            str(REPO / "configs" / "example-small.yaml"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            "random:vits16",
        ],
    )
    assert result.exit_code == 2 and "no images found" in result.output and ".jpg" in result.output
    assert not (tmp_path / "out").exists()


def test_a_failed_device_check_leaves_no_output_folder(mixed_images, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid")
    result = runner.invoke(
        app,
        [
            "extract",
            str(mixed_images),
            "-b",
            str(REPO / "configs" / "example-small.yaml"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            "random:vits16",
            "--device",
            "cuda",
        ],
    )
    assert result.exit_code == 2 and "CUDA" in result.output
    assert not (tmp_path / "out").exists()


def test_weights_load_only_when_there_is_work(mixed_images, tmp_path, tiny_model_dir, monkeypatch):
    import dinocache.extract as extract_module

    out = tmp_path / "out"
    config = parse_bucket_config({"buckets": [[224, 224], [384, 192], [210, 300], [320, 224]]})
    first = extract(
        mixed_images, ExtractOptions(out=out, buckets=config, model=str(tiny_model_dir), workers=0, progress=False)
    )
    assert first.model_loaded and first.processed == 4

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(extract_module, "load_weights", no_weights)
    # Nothing to do: the weights are never loaded.
    again = extract(
        mixed_images, ExtractOptions(out=out, buckets=config, model=str(tiny_model_dir), workers=0, progress=False)
    )
    assert not again.model_loaded and again.processed == 0 and again.skipped == 4
    # Refused settings, and a cache another process holds, are refused before any weights load.
    with pytest.raises(CacheError, match="different settings"):
        extract(
            mixed_images,
            ExtractOptions(
                out=out, buckets=config, model=str(tiny_model_dir), workers=0, progress=False, storage_dtype="float16"
            ),
        )
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        save_scene(mixed_images / "new.png", 200, 200, seed=7)  # there is work, but the cache is busy
        with pytest.raises(CacheError, match="another dinocache process"):
            extract(
                mixed_images,
                ExtractOptions(out=out, buckets=config, model=str(tiny_model_dir), workers=0, progress=False),
            )
    finally:
        holder.kill()
        holder.wait()


# ---- interruption ---------------------------------------------------------------------------------


def run_faulted(root, images, out, model_dir, fault):
    cmd = [sys.executable, "-m", "dinocache", *extract_args(root, images, out, model_dir), "--commit-every", "1000"]
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(DINOCACHE_FAULT=fault), timeout=300)
    return proc, time.monotonic() - began


@pytest.mark.parametrize("signame, code", [("sigterm", 143), ("sigint", 130)])
def test_a_signal_stops_in_order_and_keeps_every_finished_image(dataset, tmp_path, tiny_model_dir, signame, code):
    root, images = dataset
    out = tmp_path / "out"
    proc, _ = run_faulted(root, images, out, tiny_model_dir, f"batch_done:5:{signame}")
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "interrupted" in proc.stderr
    kept = int(proc.stderr.split("interrupted: ")[1].split()[0])
    cache = FeatureCache(out)
    assert kept == len(cache) == 5  # batch size 1: the five finished images, all committed
    assert verify_cache(out).ok
    assert read_manifest(out)["runs"][-1]["interrupted"] == signame.upper()
    rerun = run_library(images, out, tiny_model_dir)
    assert rerun.processed == N_IMAGES - kept
    assert_same_as_reference(root, out)


def test_a_second_signal_exits_at_once_and_loses_nothing_committed(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    out = tmp_path / "out"
    # The first SIGINT after batch 3; the second while the stop is writing the last shard.
    proc, _ = run_faulted(root, images, out, tiny_model_dir, "batch_done:3:sigint,shard_write:2:sigint")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "again: exiting now" in proc.stderr and "Traceback" not in proc.stderr
    # What was committed is intact; the shard that landed after the last commit is only unlisted
    # (the rerun adopts it); a stop before the first commit with rows leaves an empty cache.
    assert {p.kind for p in verify_cache(out).problems} <= {"unlisted_shard", "empty"}
    rerun = run_library(images, out, tiny_model_dir)
    assert rerun.processed + rerun.skipped == N_IMAGES
    assert_same_as_reference(root, out)


def test_ctrl_c_while_starting_prints_no_traceback(tmp_path):
    for delay in (0.3, 0.6, 1.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "dinocache", "extract", str(tmp_path), "-b", "x.yaml"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (130, 2), (delay, proc.returncode, err)  # 2: it had already failed on x.yaml


def test_offline_hub_ids_fail_fast_with_one_message(mixed_images, tmp_path):
    env = cli_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    began = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinocache",
            "extract",
            str(mixed_images),
            "-b",
            str(REPO / "configs" / "example-small.yaml"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            "facebook/dinov3-vits16-pretrain-lvd1689m",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and time.monotonic() - began < 60
    assert "Retrying" not in proc.stderr and proc.stderr.count("error:") == 1
    assert "offline" in proc.stderr and "hf download" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- saying what happened --------------------------------------------------------------------------


def test_the_summary_separates_cached_failed_and_missing(mixed_images, tmp_path, tiny_model_dir):
    (mixed_images / "broken.jpg").write_text("x")
    args = [
        "extract",
        str(mixed_images),
        "-b",
        str(REPO / "configs" / "example-small.yaml"),
        "-o",
        str(tmp_path / "out"),
        "-m",
        str(tiny_model_dir),
        "--workers",
        "0",
        "--no-progress",
    ]
    first = runner.invoke(app, args)
    assert "4 extracted in" in first.output and "1 failed this run (not_an_image=1)" in first.output
    (mixed_images / "square.png").unlink()
    second = runner.invoke(app, args)
    assert "0 extracted, 3 already cached" in second.output
    assert "1 image(s) failed in an earlier run and are unchanged" in second.output
    assert "no longer in" in second.output and "square.png" in second.output
    stats = json.loads(runner.invoke(app, ["stats", str(tmp_path / "out"), "--json"]).output)
    run = stats["runs"][0]
    assert first.output.count(f"({run['images_per_second']:.1f} img/s)") == 1  # one figure, the same as stats


def test_a_settings_refusal_names_only_the_differing_fields(mixed_images, tmp_path, tiny_model_dir):
    config = {"buckets": [[224, 224], [384, 192], [210, 300], [320, 224]]}
    extract(
        mixed_images,
        ExtractOptions(
            out=tmp_path / "out",
            buckets=parse_bucket_config(config),
            model=str(tiny_model_dir),
            workers=0,
            progress=False,
        ),
    )
    config["buckets"][2] = [208, 300]
    with pytest.raises(DinocacheError) as info:
        extract(
            mixed_images,
            ExtractOptions(
                out=tmp_path / "out",
                buckets=parse_bucket_config(config),
                model=str(tiny_model_dir),
                workers=0,
                progress=False,
            ),
        )
    message = str(info.value)
    assert (
        "buckets: cache has 4 buckets (224x224, 384x192, 210x300, 320x224), this run has 4 buckets "
        "(224x224, 384x192, 208x300, 320x224)" in message
    )
    assert len(message) < 600, message
    config["buckets"][2] = [210, 300]  # the same table, one other option: just that field
    with pytest.raises(DinocacheError) as info:
        extract(
            mixed_images,
            ExtractOptions(
                out=tmp_path / "out",
                buckets=parse_bucket_config(config),
                model=str(tiny_model_dir),
                workers=0,
                progress=False,
                pool=2,
            ),
        )
    assert "storage.pool: cache has 1, this run has 2" in str(info.value)
    assert "stored_grid" in str(info.value) and len(str(info.value)) < 900
