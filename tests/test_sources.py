"""Web-scale sources (issue 16, part 1): webdataset tar shards and list files give the same
features as a folder, bit for bit, with keys that map one to one; damaged tars are recorded
failures; remote tars are read through fsspec."""

import csv
import io
import json
import os
import tarfile
import time

import pytest
import torch
from conftest import save_scene
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.extract import extract
from dinocache.manifest import read_manifest
from dinocache.sources import expand_braces, open_source
from dinocache.verify import verify_cache

BUCKETS = {"buckets": [[64, 64], [96, 48]]}
PICTURES = {"a.jpg": (64, 64), "sub/b.png": (100, 50), "sub/c.jpg": (70, 66), "d.png": (90, 46), "e.jpg": (64, 60)}
runner = CliRunner()


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    for i, (key, (w, h)) in enumerate(PICTURES.items()):
        save_scene(root / key, w, h, seed=i, **({"quality": 93} if key.endswith(".jpg") else {}))
    return root


def make_tars(folder, out, split=(3, 2)):
    """webdataset layout: each sample's members share a key (the path up to the first dot)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(PICTURES)
    tars, start = [], 0
    for n, count in enumerate(split):
        path = out / f"shard-{n:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in keys[start : start + count]:
                tar.add(folder / key, arcname=key)
                caption = f"a picture called {key}".encode()
                info = tarfile.TarInfo(key.rsplit(".", 1)[0] + ".txt")
                info.size = len(caption)
                tar.addfile(info, io.BytesIO(caption))
        tars.append(path)
        start += count
    return tars


def tar_key(key):
    """The folder key -> the tar key: '<tar name>/<path without extension>'."""
    index = sorted(PICTURES).index(key)
    return f"shard-{0 if index < 3 else 1:05d}.tar/{key.rsplit('.', 1)[0]}"


def run(source, out, model_dir, **kwargs):
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config(BUCKETS),
        model=str(model_dir),
        workers=0,
        progress=False,
        dtype="float32",
        storage_dtype="float32",
        **kwargs,
    )
    return extract(source, options)


def test_a_folder_tars_and_lists_give_bit_identical_features(folder, tmp_path, tiny_model_dir):
    run(folder, tmp_path / "from-folder", tiny_model_dir)
    make_tars(folder, tmp_path / "tars")
    run(str(tmp_path / "tars" / "shard-{00000..00001}.tar"), tmp_path / "from-tars", tiny_model_dir)
    rows = [{"key": k, "path": str(folder / k), "width": w, "height": h} for k, (w, h) in PICTURES.items()]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(str(tmp_path / "list.jsonl"), tmp_path / "from-jsonl", tiny_model_dir)
    with open(tmp_path / "list.csv", "w", newline="") as fh:  # relative paths: relative to the list
        writer = csv.DictWriter(fh, fieldnames=["path"])
        writer.writeheader()
        writer.writerows({"path": os.path.relpath(folder / k, tmp_path)} for k in PICTURES)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    run(str(tmp_path / "list.parquet"), tmp_path / "from-parquet", tiny_model_dir)
    reference = FeatureCache(tmp_path / "from-folder")
    assert sorted(reference.keys()) == sorted(PICTURES)
    mappings = {"from-tars": tar_key, "from-jsonl": lambda k: k, "from-parquet": lambda k: k}
    for name, to_key in mappings.items():
        cache = FeatureCache(tmp_path / name)
        assert sorted(cache.keys()) == sorted(to_key(k) for k in PICTURES), name  # one to one
        for key in PICTURES:
            mine, theirs = reference[key], cache[to_key(key)]
            assert torch.equal(mine["patches"], theirs["patches"]) and torch.equal(mine["cls"], theirs["cls"]), name
            assert reference.record(key)["source_sha256"] == cache.record(to_key(key))["source_sha256"]
    csv_cache = run(str(tmp_path / "list.csv"), tmp_path / "from-csv", tiny_model_dir)
    assert csv_cache.processed == len(PICTURES)
    keys = FeatureCache(tmp_path / "from-csv").keys()
    assert all(k.startswith("images/") for k in keys)  # no key column: the relative path is the key


def test_tar_reruns_skip_unchanged_members_and_recompute_changed_ones(folder, tmp_path, tiny_model_dir):
    make_tars(folder, tmp_path / "tars")
    pattern = str(tmp_path / "tars" / "*.tar")
    assert run(pattern, tmp_path / "out", tiny_model_dir).processed == 5
    again = run(pattern, tmp_path / "out", tiny_model_dir)
    assert (again.processed, again.skipped) == (0, 5)  # size + mtime from the tar headers
    time.sleep(1.1)  # tar mtimes have one-second resolution
    save_scene(folder / "a.jpg", 64, 64, seed=42, quality=93)  # a changed picture in a rebuilt tar
    make_tars(folder, tmp_path / "tars")
    changed = run(pattern, tmp_path / "out", tiny_model_dir)
    assert changed.processed >= 1 and verify_cache(tmp_path / "out").ok


def test_a_corrupt_member_and_a_truncated_tar_are_recorded_and_the_run_goes_on(folder, tmp_path, tiny_model_dir):
    tars = make_tars(folder, tmp_path / "tars")
    good = tmp_path / "tars" / "shard-00002.tar"
    with tarfile.open(good, "w") as tar:  # a member that is not a picture
        info = tarfile.TarInfo("broken.jpg")
        info.size = 12
        tar.addfile(info, io.BytesIO(b"not a jpeg!!"))
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    result = run(str(tmp_path / "tars" / "*.tar"), tmp_path / "out", tiny_model_dir)
    failures = {f["key"]: f["reason"] for f in read_manifest(tmp_path / "out")["failures"]}
    assert failures["shard-00002.tar/broken"] == "not_an_image"
    assert any(k.startswith("shard-00001.tar/") and r == "corrupt" for k, r in failures.items()), failures
    cached = set(FeatureCache(tmp_path / "out").keys())
    assert {tar_key(k) for k in sorted(PICTURES)[:3]} <= cached  # the intact tar, extracted
    assert result.processed == len(cached) and verify_cache(tmp_path / "out").ok


def test_plan_uses_list_sizes_without_reading_headers(folder, tmp_path):
    rows = [{"key": k, "path": str(folder / k), "width": 200, "height": 100} for k in PICTURES]  # all "wide"
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    result = runner.invoke(
        app, ["plan", str(tmp_path / "list.jsonl"), "-b", str(tmp_path / "b.yaml"), "--json", "-m", "random:vits16"]
    )
    assert result.exit_code == 0, result.output
    by_name = {b["name"]: b["images"] for b in json.loads(result.output)["buckets"]}
    assert by_name == {"64x64": 0, "96x48": 5}  # the list's sizes decided, not the files'
    make_tars(folder, tmp_path / "tars")
    tars = runner.invoke(
        app,
        [
            "plan",
            str(tmp_path / "tars" / "shard-{00000..00001}.tar"),
            "-b",
            str(tmp_path / "b.yaml"),
            "--json",
            "-m",
            "random:vits16",
        ],
    )
    assert tars.exit_code == 0 and json.loads(tars.output)["images"] == 5


def test_remote_tars_are_read_through_fsspec(folder, tmp_path, tiny_model_dir, monkeypatch):
    import fsspec

    monkeypatch.setenv("DINOCACHE_SPOOL", str(tmp_path / "spool"))
    memory = fsspec.filesystem("memory")
    for path in make_tars(folder, tmp_path / "tars"):
        memory.pipe(f"/bucket/{path.name}", path.read_bytes())
    result = run("memory://bucket/shard-{00000..00001}.tar", tmp_path / "out", tiny_model_dir)
    assert result.processed == 5
    assert len(list((tmp_path / "spool").glob("*.tar"))) == 2  # each tar fetched whole, once
    local = FeatureCache(tmp_path / "out")
    assert sorted(local.keys()) == sorted(tar_key(k) for k in PICTURES)
    report = verify_cache(
        tmp_path / "out", source="memory://bucket/shard-{00000..00001}.tar", recompute=2, device="cpu"
    )
    assert report.ok and report.recomputed == 2, report.messages()


def test_brace_patterns_and_what_a_source_is():
    assert list(expand_braces("d/{00008..00011}.tar")) == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert list(expand_braces("{a,b}/x-{1..2}.tar")) == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert open_source("s3://b/{000..009}.tar").kind == "tars"
    assert open_source("images.parquet").kind == "list" and open_source("data/images").kind == "folder"


def test_list_entries_without_a_key_get_one_from_their_path(folder, tmp_path):
    """Relative paths are relative to the list file and keep that form; a path outside the
    list's folder (absolute, or ../) is keyed by its absolute path without the leading '/'."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "local.png").write_bytes((folder / "d.png").read_bytes())
    absolute = folder / "a.jpg"
    rows = [{"path": "./local.png"}, {"path": str(absolute)}, {"path": "../images/sub/b.png"}]
    rows.append({"path": "gone.png"})
    (lists / "list.csv").write_text("path\n" + "".join(r["path"] + "\n" for r in rows))
    files = {s.key: s for s in open_source(str(lists / "list.csv")).scan()}
    outside = absolute.resolve().as_posix().lstrip("/")
    expected = ["gone.png", "local.png", outside, (folder / "sub" / "b.png").resolve().as_posix().lstrip("/")]
    assert sorted(files) == sorted(expected)
    assert files["gone.png"].problem[0] == "missing" and "does not exist" in files["gone.png"].problem[1]
    assert files["local.png"].problem is None
