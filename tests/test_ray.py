"""The Ray engine (issue 24) on a local Ray (2 CPUs, a small object store, no dashboard), CPU
and the tiny model: the same cache as one process, bit for bit, for a folder, tar shards and a
list file, to a folder and to S3 (moto); an actor killed in the middle of a unit; a rerun skips
what is committed. One Ray session for the module."""

import json
import tarfile

import pytest
import ray
import torch
from conftest import fresh_bucket
from moto_server import moto_server
from test_crash import N_IMAGES, assert_same_as_reference, dataset, extract_args, options  # noqa: F401
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.errors import ConfigError
from dinocache.extract import extract
from dinocache.ray_engine import RayOptions, group_units, unit_starts
from dinocache.sources import SourceFile
from dinocache.verify import verify_paths

URL = "s3://caches/ray"


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def on_ray(out, model_dir, unit_size=4, workers=2):
    return options(out, model_dir, engine=RayOptions(workers_max=workers, unit_size=unit_size))


def assert_same_cache(got, ref):
    got, ref = FeatureCache(got), FeatureCache(ref)
    assert got.keys() == ref.keys() and len(got) > 0
    for key in ref.keys():
        assert torch.equal(got[key]["patches"], ref[key]["patches"]), key
        assert torch.equal(got[key]["cls"], ref[key]["cls"]), key


def test_units_follow_the_sorted_scan_and_never_split_a_file():
    items = [SourceFile(f"{t}.tar/{i}", f"/d/{t}.tar", 1, 0) for t in "ab" for i in range(3)]
    items += [SourceFile(f"c/{i}", f"/d/c/{i}", 1, 0) for i in range(5)]
    starts = unit_starts(items, 2)
    assert starts == ["a.tar/0", "b.tar/0", "c/0", "c/2", "c/4"]  # a tar stays whole; files by twos
    by_bucket = sorted(items, key=lambda s: (hash(s.key) % 2, s.key))  # a work list: bucket, then key
    units = group_units(by_bucket, starts)
    assert [u for u, _ in units] == [0, 1, 2, 3, 4]
    assert sorted(i.key for _, unit in units for i in unit) == sorted(i.key for i in items)
    assert all(i.path == "/d/a.tar" for i in units[0][1])


@pytest.mark.filterwarnings("error::ray.util.annotations.RayDeprecationWarning")
def test_a_folder_on_ray_equals_one_process_and_a_rerun_skips_it(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    out = tmp_path / "out"
    result = extract(images, on_ray(out, tiny_model_dir))  # and no deprecated Ray call
    assert result.processed == N_IMAGES and result.shards_written >= 3
    assert_same_as_reference(root, out)
    (run,) = FeatureCache(out).manifest["runs"]  # one record for the job, not one per unit
    assert (run["engine"], run["units"], run["units_done"], run["processed"]) == ("ray", 3, 3, N_IMAGES)  # 3 of 4
    assert not (out / "ranks").exists()
    again = runner_cli(images, out, tiny_model_dir, root)
    assert again.exit_code == 0 and "0 extracted" in again.output, again.output


def runner_cli(images, out, model_dir, root):
    args = extract_args(root, images, out, model_dir) + ["--engine", "ray", "--workers-max", "2", "--unit-size", "4"]
    return CliRunner().invoke(app, args)


def make_tars(images, folder) -> str:
    """Three tar shards of four images (one unit each), as a brace pattern."""
    names = sorted(p.name for p in images.iterdir())
    for n in range(3):
        with tarfile.open(folder / f"part-{n}.tar", "w") as tar:
            for name in names[4 * n : 4 * n + 4]:
                tar.add(images / name, arcname=name)
    return str(folder / "part-{0..2}.tar")


@pytest.mark.parametrize("kind", ["tars", "list"])
def test_tars_and_a_list_file_on_ray_equal_one_process(dataset, tmp_path, tiny_model_dir, kind, caplog):
    _, images = dataset
    names = sorted(p.name for p in images.iterdir())
    if kind == "tars":
        source = make_tars(images, tmp_path)
    else:
        source = str(tmp_path / "list.jsonl")
        (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": str(images / n)}) + "\n" for n in names))
    assert extract(source, options(tmp_path / "one", tiny_model_dir)).processed == N_IMAGES
    caplog.set_level("INFO", logger="dinocache")
    result = extract(source, on_ray(tmp_path / "ray", tiny_model_dir, unit_size=3))
    assert result.processed == N_IMAGES
    units, largest = (3, 4) if kind == "tars" else (4, 3)  # a tar of four is one unit: the message says so
    assert f"{units} unit(s) on Ray, the largest of {largest} image(s) (--unit-size 3" in caplog.text
    assert verify_paths([tmp_path / "ray"]).ok
    assert_same_cache(tmp_path / "ray", tmp_path / "one")


@pytest.fixture()
def s3(tmp_path, monkeypatch):
    with moto_server() as endpoint:
        yield from fresh_bucket(endpoint, "caches", tmp_path, monkeypatch)


def test_tars_on_ray_to_s3_equal_one_process(dataset, s3, tmp_path, tiny_model_dir):
    """The issue's command: `extract 'data/{...}.tar' --engine ray --out s3://...`, from the CLI."""
    root, images = dataset
    fs, _ = s3
    source = make_tars(images, tmp_path)
    assert extract(source, options(tmp_path / "one", tiny_model_dir)).processed == N_IMAGES
    args = extract_args(root, images, URL, tiny_model_dir) + ["--engine", "ray", "--workers-max", "2"]
    args += ["--unit-size", "4"]  # a tar per unit
    args[1] = source
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0 and f"{N_IMAGES} extracted" in run.output, run.output
    assert not fs.exists(f"{URL}/.lock") and (not fs.exists(f"{URL}/ranks") or not fs.ls(f"{URL}/ranks"))
    assert verify_paths([URL]).ok
    assert_same_cache(URL, tmp_path / "one")


def test_an_actor_killed_in_the_middle_of_a_unit(dataset, tmp_path, tiny_model_dir, monkeypatch):
    """The actor dies at its third decode (its first unit half done, a shard of it written):
    Ray starts another and retries the unit; the run completes with the uninterrupted features."""
    root, images = dataset
    marker = tmp_path / "fired"
    monkeypatch.setenv("DINOCACHE_FAULT", "decode:3:kill")
    monkeypatch.setenv("DINOCACHE_FAULT_ONCE", str(marker))
    out = tmp_path / "out"
    result = extract(images, on_ray(out, tiny_model_dir, unit_size=6, workers=1))
    assert marker.exists()  # the fault did fire: an actor was killed
    assert result.processed >= N_IMAGES  # the retried unit's images were extracted again
    assert_same_as_reference(root, out)
    assert len(FeatureCache(out)) == N_IMAGES


def test_the_core_never_imports_ray_and_a_missing_ray_is_named(dataset, tmp_path, tiny_model_dir, monkeypatch):
    import subprocess
    import sys

    code = "import sys, dinocache.cli, dinocache.extract, dinocache.reader; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    root, images = dataset
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'dinocache\[ray\]'"):
        extract(images, on_ray(tmp_path / "out", tiny_model_dir))
    refused = CliRunner().invoke(app, ["extract", str(images), "-b", str(root / "buckets.yaml"), "--engine", "spark"])
    assert refused.exit_code == 2 and "--engine spark is not an engine" in refused.output
    opts = on_ray(tmp_path / "out", tiny_model_dir)
    opts.rank, opts.world_size = 0, 2
    with pytest.raises(ConfigError, match="--engine ray runs its own workers"):
        extract(images, opts)


def test_a_unit_that_raises_is_a_clear_error_and_what_finished_is_committed(dataset, tmp_path, tiny_model_dir):
    """--max-failures 0 and an image that fails only when decoded (its header is fine): the
    actor's unit stops; the driver commits what finished and says why, without a traceback."""
    import shutil

    from dinocache.errors import DinocacheError

    _, images = dataset
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    data = (folder / "img00.png").read_bytes()
    (folder / "img00.png").write_bytes(data[: len(data) // 2])  # cut in its pixel data
    opts = on_ray(tmp_path / "out", tiny_model_dir, unit_size=6, workers=1)
    opts.max_failures = 0
    with pytest.raises(DinocacheError, match="a work unit failed on Ray: stopped: 1 of .* over --max-failures 0"):
        extract(folder, opts)
    cache = FeatureCache(tmp_path / "out")
    assert [f["key"] for f in cache.manifest["failures"]] == ["img00.png"]


def test_ctrl_c_commits_every_finished_unit(dataset, tmp_path, tiny_model_dir):
    """SIGINT to the CLI once a unit's report is written: the driver stops the actors, folds
    what finished into the manifest (no periodic commit: --commit-every is an hour) and exits 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dinocache.reports import ReportFolder

    root, images = dataset
    out = tmp_path / "out"
    args = extract_args(root, images, out, tiny_model_dir) + ["--engine", "ray", "--unit-size", "1"]
    args += ["--ray-address", ray.get_runtime_context().gcs_address, "--commit-every", "3600"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINOCACHE_FAULT", "RAY_ADDRESS"))}
    proc = subprocess.Popen([sys.executable, "-m", "dinocache", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ReportFolder(out).names() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # polls for a finished unit; the assertions do not depend on timing
        finished = len(ReportFolder(out).names())
        assert finished and proc.poll() is None, "no unit finished while the job ran"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    cache = FeatureCache(out)
    assert len(cache) >= finished, stderr  # every unit seen finished (one image each) is committed
    assert f"interrupted: {len(cache)} image(s) kept; rerun the same command" in stderr, stderr
    assert not ReportFolder(out).names()  # folded, none left for a merge
    assert verify_paths([out]).ok


def test_a_ray_address_that_cannot_be_joined_is_a_clear_error(dataset, tmp_path, tiny_model_dir, monkeypatch):
    root, images = dataset
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as if no Ray yet: the CLI joins one
    args = extract_args(root, images, tmp_path / "out", tiny_model_dir) + ["--engine", "ray"]
    run = CliRunner().invoke(app, args + ["--ray-address", "ray://127.0.0.1:1"])
    assert run.exit_code == 2, run.output
    assert "cannot join the Ray cluster at ray://127.0.0.1:1" in run.output, run.output
    assert "pip install 'ray[client]'" in run.output and "Traceback" not in run.output, run.output


def test_a_worker_the_cluster_can_never_place_is_refused(dataset, tmp_path, tiny_model_dir):
    """The test cluster has 2 CPUs and no GPU: an actor asking for a GPU, or 4 CPUs, would wait forever."""
    _, images = dataset
    with pytest.raises(ConfigError, match=r"asks for 1 GPU \(the cluster has 0\).*") as refused:
        extract(images, options(tmp_path / "out", tiny_model_dir, engine=RayOptions(gpus_per_worker=1)))
    assert "--gpus-per-worker 0" in refused.value.hint
    with pytest.raises(ConfigError, match=r"asks for 4 CPU \(the cluster has 2\)"):
        extract(images, options(tmp_path / "out", tiny_model_dir, engine=RayOptions(cpus_per_worker=4)))


def test_ray_options_without_engine_ray_are_refused(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    args = extract_args(root, images, tmp_path / "out", tiny_model_dir)
    run = CliRunner().invoke(app, args + ["--gpus-per-worker", "1", "--unit-size", "10", "--ray-address", "x"])
    assert run.exit_code == 2, run.output
    assert "--ray-address, --gpus-per-worker, --unit-size only apply to the Ray engine" in run.output
    assert "add --engine ray" in run.output and not (tmp_path / "out").exists()
    for option in (["--workers-max", "4"], ["--cpus-per-worker", "2"]):
        assert CliRunner().invoke(app, args + option).exit_code == 2
