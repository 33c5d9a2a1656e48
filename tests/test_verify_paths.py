"""`dinocache verify PATH...`: a cache, its shards/ folder, a bare folder of shards, single
files, a mix, and a path that is nothing; damaged bare shards; --json; exit codes (issue 15)."""

import json
import shutil

import pytest
import torch
from conftest import save_scene
from typer.testing import CliRunner

from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.extract import extract
from dinocache.manifest import read_manifest
from dinocache.verify import scan_shard

runner = CliRunner()


@pytest.fixture()
def cache(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    for i, (w, h) in enumerate([(64, 64), (96, 48), (70, 64), (100, 50)]):
        save_scene(images / f"{i}.png", w, h, seed=i)
    out = tmp_path / "cache"
    extract(
        images,
        ExtractOptions(
            out=out,
            buckets=parse_bucket_config({"buckets": [[64, 64], [96, 48]]}),
            model=str(tiny_model_dir),
            workers=0,
            progress=False,
        ),
    )
    return out


def verify(*args):
    result = runner.invoke(app, ["verify", *map(str, args)])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def bare_copy(cache, tmp_path):
    """Shards copied to another machine without their manifest."""
    folder = tmp_path / "copied"
    shutil.copytree(cache / "shards", folder)
    return folder


def test_a_cache_and_its_shards_folder(cache):
    code, out = verify(cache)
    assert code == 0 and "OK: 4 samples in 2 shard(s) verified" in out
    code, out = verify(cache / "shards")
    assert code == 0 and "verifying that whole cache" in out and "OK: 4 samples" in out


def test_a_bare_folder_and_single_files_are_checked_on_their_own(cache, tmp_path):
    folder = bare_copy(cache, tmp_path)
    code, out = verify(folder)
    assert code == 0 and "checked on their own" in out and "OK: 4 samples in 2" in out
    assert "skipped: checksums (needs the manifest)" in out
    one = sorted(folder.iterdir())[0]
    code, out = verify(one)
    assert code == 0 and "in 1 shard(s)" in out
    code, out = verify(cache, one)  # a mix: the cache, plus a copy of one of its shards
    assert code == 0 and "OK: 6 samples" in out


def test_nothing_there_is_a_usage_error(tmp_path):
    code, out = verify(tmp_path / "nothing")
    assert code == 2 and "does not exist" in out
    (tmp_path / "empty").mkdir()
    code, out = verify(tmp_path / "empty")
    assert code == 2 and "not a dinocache cache" in out
    (tmp_path / "notes.txt").write_text("x")
    code, out = verify(tmp_path / "notes.txt")
    assert code == 2 and "not a cache folder" in out
    result = runner.invoke(app, ["stats", str(tmp_path)])
    assert result.exit_code == 2


def nan_into(path):
    """Make the first bf16 value of `patches` a NaN: a flipped tensor byte, checksum or not."""
    from dinocache.stfile import SafetensorsFile

    header = SafetensorsFile(path)
    entry = header.entries["patches"]
    data = bytearray(path.read_bytes())
    at = header.data_start + entry.start
    data[at : at + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_damaged_bare_shards_are_caught(cache, tmp_path):
    folder = bare_copy(cache, tmp_path)
    first, second = sorted(folder.iterdir())
    nan_into(first)
    code, out = verify(folder)
    assert code == 1 and "patches contains NaN or Inf" in out and first.name in out
    second.write_bytes(second.read_bytes()[:-300])  # truncated
    code, out = verify(second)
    assert code == 1 and "not a readable safetensors file" in out


def rewrite_metadata(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    change(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def test_bare_metadata_and_record_problems(cache, tmp_path):
    folder = bare_copy(cache, tmp_path)
    first, second = sorted(folder.iterdir())

    def bad_record(meta, tensors):
        samples = json.loads(meta["samples"])
        samples[0]["box"] = [0, 0, 99999, 5]  # outside its source
        samples[-1]["key"] = "../escape.png"
        meta["samples"] = json.dumps(samples)

    rewrite_metadata(first, bad_record)

    def wrong_shape(meta, tensors):
        tensors["patches"] = tensors["patches"][:, :-1].contiguous()

    rewrite_metadata(second, wrong_shape)
    code, out = verify(folder)
    assert code == 1
    assert "box [0, 0, 99999, 5] is not inside" in out and "'../escape.png'" in out
    assert "patches has shape" in out and second.name in out


def test_keys_must_be_unique_across_the_given_shards(cache, tmp_path):
    folder = bare_copy(cache, tmp_path)
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / ("b000-64x64-00000000-99999" + ".safetensors"))
    code, out = verify(folder)
    assert code == 1 and "is in both" in out


def test_json_report_for_scripts(cache, tmp_path):
    folder = bare_copy(cache, tmp_path)
    nan_into(sorted(folder.iterdir())[0])
    result = runner.invoke(app, ["verify", str(folder), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False and report["mode"] == "shards"
    (problem,) = report["problems"]
    assert problem["kind"] == "values" and problem["path"].endswith(".safetensors") and "NaN" in problem["message"]
    assert any("checksums" in s for s in report["skipped"])
    clean = runner.invoke(app, ["verify", str(cache), "--json"])
    assert clean.exit_code == 0 and json.loads(clean.output)["ok"] is True


def test_bare_shards_against_their_sources(cache, tmp_path):
    folder = bare_copy(cache, tmp_path)
    images = tmp_path / "images"
    code, out = verify(folder, "--source", images)
    assert code == 0, out
    save_scene(images / "0.png", 64, 64, seed=42)  # rewritten
    code, out = verify(folder, "--source", images)
    assert code == 1 and "0.png changed" in out


def test_streamed_scan_matches_sha256_and_a_full_load(cache):
    """One pass: the same digest as hashlib over the file, the same NaN verdict as loading it,
    whatever the window size (tensors straddle windows)."""
    import hashlib

    shard = cache / read_manifest(cache)["shards"][0]["file"]
    nan_into(shard)
    for window in (64, 1000, 4096, 1 << 20):
        digest, _, problems, read = scan_shard(shard, True, window=window)
        assert digest == hashlib.sha256(shard.read_bytes()).hexdigest() and read == shard.stat().st_size
        assert problems == ["patches contains NaN or Inf"], window


@pytest.mark.parametrize("storage", sorted(__import__("dinocache.layout").layout.STORAGE_DTYPES))
def test_a_nan_is_found_in_every_storage_dtype(tmp_path, tiny_model_dir, storage):
    """verify's byte scan is driven by the layout's dtype table: a NaN injected into a shard of
    every storage dtype is found (the NaN's bytes are torch's own for that dtype)."""
    from dinocache.layout import STORAGE_DTYPES
    from dinocache.stfile import SafetensorsFile

    images = tmp_path / "images"
    save_scene(images / "a.png", 64, 64, seed=1)
    out = tmp_path / "cache"
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config({"buckets": [[64, 64]]}),
        model=str(tiny_model_dir),
        storage_dtype=storage,
        workers=0,
        progress=False,
    )
    extract(images, options)
    assert verify(out)[0] == 0
    shard = next((out / "shards").iterdir())
    entry = SafetensorsFile(shard).entries["patches"]
    data = bytearray(shard.read_bytes())
    nan = torch.tensor([float("nan")]).to(STORAGE_DTYPES[storage].torch_dtype).view(torch.uint8).numpy().tobytes()
    at = SafetensorsFile(shard).data_start + entry.start
    data[at : at + len(nan)] = nan
    shard.write_bytes(bytes(data))
    code, text = verify(bare_copy(out, tmp_path))  # without the manifest's checksum to fail first
    assert code == 1 and "patches contains NaN or Inf" in text


@pytest.mark.parametrize("special", ["nan", "-nan", "inf", "-inf"])
@pytest.mark.parametrize("storage", sorted(__import__("dinocache.layout").layout.STORAGE_DTYPES))
def test_the_byte_scan_finds_nan_and_inf_in_every_storage_dtype(tmp_path, storage, special):
    """Every row of the layout's dtype table (a new row is covered by being added): a single NaN
    (either sign), +Inf or -Inf among finite values, first, inside or last, straddling scan
    windows or not, is found by the streamed scan; the same tensor without it is clean. torch
    decides what is not finite once stored (float8_e4m3fn has no Inf: it saturates to 448)."""
    from safetensors.torch import save_file

    from dinocache.layout import STORAGE_DTYPES

    dtype = STORAGE_DTYPES[storage].torch_dtype
    values = torch.linspace(-3, 3, 999)
    path = tmp_path / "x.safetensors"
    save_file({"cls": values[:7].to(dtype).clone(), "patches": values.to(dtype)}, path)
    assert scan_shard(path, True, window=256)[2] == []
    for at in (0, 500, 998):
        bad = values.clone()
        bad[at] = float(special)
        stored = bad.to(dtype)
        nonfinite = not bool(torch.isfinite(stored.float()).all())
        assert nonfinite or "inf" in special  # a NaN is always stored as one
        save_file({"cls": values[:7].to(dtype).clone(), "patches": stored}, path)
        for window in (256, 1 << 20):
            found = scan_shard(path, True, window=window)[2]
            assert found == (["patches contains NaN or Inf"] if nonfinite else []), (at, window)
        assert scan_shard(path, False)[2] == []  # --skip-values


def test_the_nonfinite_masks_agree_with_torch():
    """Each row's mask flags exactly the values torch calls NaN or Inf in that dtype, over every
    bit pattern of the 8- and 16-bit dtypes and special values of float32."""
    import numpy as np

    from dinocache.layout import NONFINITE_BITS, STORAGE_DTYPES
    from dinocache.verify import _finite

    for row in STORAGE_DTYPES.values():
        if row.itemsize <= 2:
            patterns = np.arange(1 << (8 * row.itemsize), dtype=np.uint8 if row.itemsize == 1 else np.uint16)
        else:
            patterns = np.array([0, 0x3F800000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00000001], np.uint32)
        values = torch.from_numpy(patterns.view(np.int8 if row.itemsize == 1 else patterns.dtype.str.replace("u", "i")))
        expected = ~torch.isfinite(values.view(row.torch_dtype).float())
        got = torch.tensor([not _finite(memoryview(p.tobytes()), row.code) for p in patterns])
        assert torch.equal(got, expected), row.name
        assert row.code in NONFINITE_BITS
