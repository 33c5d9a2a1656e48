"""A cache folder is untrusted input (issue 17): links inside it, tampered manifests and tables,
hostile keys and shards. dinocache never writes or deletes outside OUT, never reads outside OUT
or the source folder, and turns every tampering into its own error or a verify finding."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_scene
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import CacheError, DinocacheError
from dinocache.extract import extract
from dinocache.index import SampleTable
from dinocache.manifest import load_samples, read_manifest
from dinocache.stats import cache_stats
from dinocache.verify import verify_cache

BUCKETS = {"buckets": [[64, 64], [96, 48]]}
runner = CliRunner()


def run(images, out, model_dir, **kwargs):
    kwargs.setdefault("workers", 0)
    options = ExtractOptions(
        out=out, buckets=parse_bucket_config(BUCKETS), model=str(model_dir), progress=False, dtype="float32", **kwargs
    )
    return extract(images, options)


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    for i, (w, h) in enumerate([(64, 64), (96, 48), (70, 64)]):
        save_scene(root / f"{i}.png", w, h, seed=i)
    return root


@pytest.fixture()
def cache(images, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    run(images, out, tiny_model_dir)
    return out


def precious_folder(tmp_path):
    """A folder outside any cache whose files must survive whatever a cache's links do."""
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    (target / "samples-0123456789ab.safetensors").write_text("named like ours, but not ours")
    (target / "sub").mkdir()
    (target / "sub" / "notes.txt").write_text("keep")
    return target


def assert_untouched(target):
    assert (target / "thesis.tex").read_text() == "years of work"
    assert (target / "samples-0123456789ab.safetensors").exists()
    assert (target / "sub" / "notes.txt").read_text() == "keep"


# ---- 1. deletion through a link --------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_linked_index_folder_is_refused_and_nothing_outside_is_deleted(images, tmp_path, tiny_model_dir, overwrite):
    target = precious_folder(tmp_path)
    out = tmp_path / "cache"
    if overwrite:
        run(images, out, tiny_model_dir)
        shutil.rmtree(out / "index")
    else:
        out.mkdir()
    os.symlink(target, out / "index")
    with pytest.raises(CacheError, match="symbolic link"):
        run(images, out, tiny_model_dir, overwrite=overwrite)
    assert_untouched(target)


# ---- 2. --overwrite with a linked shards/ and adoption of foreign shards ------------------------


def test_overwrite_with_a_linked_shards_folder_never_keeps_old_features(images, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    run(images, out, tiny_model_dir)
    moved = tmp_path / "elsewhere"
    shutil.move(out / "shards", moved)
    os.symlink(moved, out / "shards")
    with pytest.raises(CacheError, match="symbolic link"):
        run(images, out, tiny_model_dir, overwrite=True, storage_dtype="float32")
    assert len(list(moved.iterdir())) >= 1  # nothing deleted through the link


def test_orphan_shards_of_other_settings_are_not_adopted(images, tmp_path, tiny_model_dir):
    old = tmp_path / "old"
    run(images, old, tiny_model_dir)  # bfloat16
    new = tmp_path / "new"
    (new / "shards").mkdir(parents=True)
    for shard in (old / "shards").iterdir():  # as if a crashed run of other settings left them
        shutil.copy(shard, new / "shards" / shard.name)
    result = run(images, new, tiny_model_dir, storage_dtype="float32", image_mean=(0.5, 0.5, 0.5))
    assert result.shards_adopted == 0 and result.processed == 3
    fresh = FeatureCache(new)
    assert fresh.manifest["storage"]["dtype"] == "float32"
    assert all(fresh[k]["patches"].dtype == torch.float32 for k in fresh.keys())
    report = verify_cache(new)
    assert {p.kind for p in report.problems} == {"unlisted_shard"}  # the foreign files are reported, not used


def test_verify_checks_tensor_dtypes_against_the_manifest(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["storage"]["dtype"] = "float16"  # same size as bfloat16: shapes and bytes still agree
    (cache / "manifest.json").write_text(json.dumps(manifest))
    report = verify_cache(cache)
    assert any(p.kind == "layout" and "BF16" in p.message and "F16" in p.message for p in report.problems)
    with pytest.raises(CacheError, match="does not match the manifest"):
        FeatureCache(cache)[0]


# ---- 3. thin images: memory bounded by the output ---------------------------------------------

PEAK = """
import resource, sys
from dinocache.imaging import Preprocessing, model_input, read_source
data = read_source(sys.argv[1])
w, h = map(int, sys.argv[2:4])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = model_input(data, (w, h), (0, 0, w, h), (1024, 1024), Preprocessing(), 1 << 40)
assert x.shape == (3, 1024, 1024)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_mb(path, width, height):
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, str(path), str(width), str(height)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1])


def test_a_thin_strip_takes_no_more_memory_than_a_square_of_as_many_pixels(tmp_path):
    from PIL import Image

    thin, square = tmp_path / "thin.png", tmp_path / "square.png"
    Image.new("RGB", (4, 250_000), (120, 30, 200)).save(thin)  # 1M pixels, 4.9 KB
    Image.new("RGB", (1000, 1000), (120, 30, 200)).save(square)  # the same pixel count
    thin_mb, square_mb = peak_mb(thin, 4, 250_000), peak_mb(square, 1000, 1000)
    # Width-first resizing would build a 250,000 x 1024 intermediate: 3 GB. Bounded by the output:
    assert thin_mb < square_mb + 100, (thin_mb, square_mb)


# ---- 4. tampered manifests and tables: our own errors, never a traceback ------------------------


def tamper_manifest(cache, text):
    (cache / "manifest.json").write_text(text)


def rewrite_table(cache, build):
    """Replace the sample table by `build()`'s safetensors bytes, keeping the manifest consistent."""
    manifest = json.loads((cache / "manifest.json").read_text())
    data = build()
    (cache / manifest["samples"]["file"]).write_bytes(data)
    manifest["samples"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (cache / "manifest.json").write_text(json.dumps(manifest))


def table_arrays(cache):
    table = load_samples(cache, read_manifest(cache))
    arrays = {"key_bytes": np.array(table.key_bytes), "key_offsets": np.array(table.key_offsets)}
    arrays.update({n: np.array(c) for n, c in table.columns.items()})
    return arrays


def st_bytes(arrays, header_hook=None):
    from safetensors.numpy import save

    data = save(arrays)
    if header_hook is None:
        return data
    n = int.from_bytes(data[:8], "little")
    header = header_hook(json.loads(data[8 : 8 + n]))
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def manifest_with(cache, **changes):
    manifest = json.loads((cache / "manifest.json").read_text())
    for path, value in changes.items():
        target = manifest
        parts = path.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return json.dumps(manifest)


TAMPERINGS = {
    "json nested 100k deep": lambda c: tamper_manifest(c, "[" * 100_000 + "]" * 100_000),
    "a 5000-digit integer": lambda c: tamper_manifest(
        c, manifest_with(c).replace('"count": 3', '"count": ' + "9" * 5000)
    ),
    "storage.layers = 5": lambda c: tamper_manifest(c, manifest_with(c, storage__layers=5)),
    "storage.layers = null": lambda c: tamper_manifest(c, manifest_with(c, storage__layers=None)),
    "runs = 5": lambda c: tamper_manifest(c, manifest_with(c, runs=5)),
    "a run with seconds 'x'": lambda c: tamper_manifest(c, manifest_with(c, runs__0__seconds="x")),
    "table header is a list": lambda c: rewrite_table(c, lambda: st_bytes(table_arrays(c), lambda h: [1, 2])),
    "table header nested deep": lambda c: rewrite_table(
        c, lambda: st_bytes(table_arrays(c), lambda h: "[" * 50_000 + "]" * 50_000)
    ),
    "key bytes not UTF-8": lambda c: rewrite_table(
        c,
        lambda: st_bytes(
            {
                **table_arrays(c),
                "key_bytes": np.frombuffer(
                    table_arrays(c)["key_bytes"].tobytes().replace(b"0", b"\xff"), np.uint8
                ).copy(),
            }
        ),
    ),
    "2-D key_offsets": lambda c: rewrite_table(
        c, lambda: st_bytes({**table_arrays(c), "key_offsets": np.stack([table_arrays(c)["key_offsets"]] * 2)})
    ),
    "a shard listed twice": lambda c: tamper_manifest(c, _shard_twice(c)),
}


def _shard_twice(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"].append(dict(manifest["shards"][0]))
    return json.dumps(manifest)


def exercise_everything(cache):
    """Every entry point on a cache: only DinocacheError may escape; verify always reports."""
    try:
        fc = FeatureCache(cache)
        for i in range(len(fc)):
            fc[i]
        fc.keys()
    except DinocacheError:
        pass
    try:
        cache_stats(cache)
    except DinocacheError:
        pass
    return verify_cache(cache)


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampering_gives_our_error_and_a_verify_finding(cache, name):
    TAMPERINGS[name](cache)
    report = exercise_everything(cache)
    assert not report.ok, name
    for command in (["stats", str(cache)], ["verify", str(cache)], ["verify", str(cache), "--json"]):
        result = runner.invoke(app, command)
        output = result.output + (result.stderr if result.stderr_bytes else "")
        assert result.exception is None or isinstance(result.exception, SystemExit), (name, command, result.exception)
        assert "Traceback" not in output
        assert result.exit_code == (1 if command[0] == "verify" else 2), (name, command, output)


# ---- 5. keys must stay inside the source folder ------------------------------------------------


@pytest.mark.parametrize("bad", ["../outside/private.png", "/etc/passwd", "a/./b.png", "a//b.png", "back\\slash.png"])
def test_keys_outside_the_source_folder_are_refused(cache, images, tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_scene(outside / "private.png", 64, 64, seed=5)
    table = load_samples(cache, read_manifest(cache))
    records = [table.record(i) for i in range(len(table))]
    records[0]["key"] = bad
    rewrite_table(cache, lambda: SampleTable.from_records(records).to_bytes())
    report = verify_cache(cache, source=images, recompute=3)
    assert any(p.kind == "index" and "key" in p.message for p in report.problems), report.messages()
    assert report.recomputed == 0  # nothing was read from the sources of a cache with bad keys
    with pytest.raises(CacheError, match="key"):
        FeatureCache(cache).keys()
    result = runner.invoke(app, ["show", str(cache), bad, "-o", str(tmp_path / "x.png"), "--source", str(images)])
    assert result.exit_code == 2 and not (tmp_path / "x.png").exists()


def test_source_links_out_of_the_folder_are_not_followed_by_default(images, tmp_path, tiny_model_dir):
    outside = tmp_path / "outside"
    save_scene(outside / "private.png", 64, 64, seed=5)
    os.symlink(outside / "private.png", images / "link.png")
    result = run(images, tmp_path / "cache", tiny_model_dir)
    failures = {f["key"]: f["reason"] for f in read_manifest(tmp_path / "cache")["failures"]}
    assert failures == {"link.png": "outside_source"} and result.processed == 3
    followed = run(images, tmp_path / "cache2", tiny_model_dir, follow_symlinks=True)
    assert followed.processed == 4


# ---- 6. a linked shard pointing outside the cache -----------------------------------------------


def test_a_linked_shard_is_neither_adopted_nor_read(images, tmp_path, tiny_model_dir, cache):
    other = tmp_path / "other"
    run(images, other, tiny_model_dir, image_mean=(0.4, 0.4, 0.4))
    shard = next((other / "shards").iterdir())
    fresh = tmp_path / "fresh"
    (fresh / "shards").mkdir(parents=True)
    os.symlink(shard, fresh / "shards" / shard.name)
    result = run(images, fresh, tiny_model_dir, image_mean=(0.4, 0.4, 0.4))
    assert result.shards_adopted == 0 and result.processed == 3
    # A listed shard replaced by a link: reader and verify refuse it.
    listed = cache / read_manifest(cache)["shards"][0]["file"]
    moved = tmp_path / "moved.safetensors"
    shutil.move(listed, moved)
    os.symlink(moved, listed)
    assert any("symbolic link" in m for m in verify_cache(cache).messages())
    with pytest.raises(CacheError, match="symbolic link"):
        fc = FeatureCache(cache)
        for i in range(len(fc)):
            fc[i]


# ---- 7. smaller integrity gaps ------------------------------------------------------------------


def test_a_grid_that_disagrees_with_the_tensor_is_an_error_not_a_wrong_shape(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    bucket = manifest["buckets"][1]  # 96x48: a 3x6 grid of 18 patches
    bucket["grid"], bucket["stored_grid"] = [6, 3], [6, 3]  # same count, other shape
    bucket["input_width"], bucket["input_height"] = 48, 96
    (cache / "manifest.json").write_text(json.dumps(manifest))
    fc = FeatureCache(cache)
    key = next(k for k in fc.keys() if fc.record(k)["bucket"] == 1)
    with pytest.raises(CacheError):
        fc[key]  # its shard's metadata says 3x6: refused, not reshaped to 6x3
    assert not verify_cache(cache).ok


def test_hidden_size_mismatch_and_foreign_tensor_names_are_refused(cache):
    from safetensors.torch import load_file, save_file

    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["model"]["hidden_size"] = 32
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="hidden 32"):
        FeatureCache(cache)[0]
    manifest["model"]["hidden_size"] = 64
    shard = manifest["shards"][0]
    path = cache / shard["file"]
    tensors = load_file(str(path))
    tensors["key"] = torch.zeros(shard["rows"], 64, dtype=torch.bfloat16)  # would overwrite the item's key
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(path), metadata=meta)
    shard["bytes"], shard["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="unexpected key"):
        FeatureCache(cache)[int(np.flatnonzero(FeatureCache(cache).shard_indices() == 0)[0])]
    assert any(p.kind == "layout" for p in verify_cache(cache).problems)


def test_a_linked_manifest_is_refused(cache, tmp_path):
    real = tmp_path / "manifest-elsewhere.json"
    shutil.move(cache / "manifest.json", real)
    os.symlink(real, cache / "manifest.json")
    with pytest.raises(CacheError, match="symbolic link"):
        read_manifest(cache)
    assert not verify_cache(cache).ok


# ---- 8. --out inside the input folder ---------------------------------------------------------------


def test_an_out_folder_inside_the_input_is_not_scanned(images, tiny_model_dir):
    out = images / "features"
    run(images, out, tiny_model_dir)
    save_scene(out / "picture-written-by-show.png", 64, 64, seed=9)
    again = run(images, out, tiny_model_dir)
    assert again.scanned == 3 and again.processed == 0
    assert "features/picture-written-by-show.png" not in FeatureCache(out)
