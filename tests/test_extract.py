"""End-to-end extraction with a tiny random DINOv3 loaded by path, checked against plain transformers."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, NUM_REGISTERS, reference_forward, save_scene, token_cosine
from PIL import Image, ImageOps

from dinocache import FeatureCache
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import CacheError
from dinocache.extract import extract
from dinocache.imaging import IMAGENET_MEAN, IMAGENET_STD
from dinocache.manifest import read_manifest

BUCKETS = {"buckets": [[224, 224], [210, 300], [320, 224], [384, 192]]}


def run(images, out, model_dir, buckets=None, **kwargs):
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("device", DEVICE)  # TORCH_DEVICE=cuda runs the same checks on a GPU
    kwargs.setdefault("progress", False)
    options = ExtractOptions(out=out, buckets=parse_bucket_config(buckets or BUCKETS), model=str(model_dir), **kwargs)
    return extract(images, options)


def reference_pixels(path, box, size):
    """Independent of dinocache.imaging: PIL -> [0, 1] -> crop -> antialiased bilinear -> ImageNet norm."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    left, top, right, bottom = box
    x = F.interpolate(
        x[None, :, top:bottom, left:right],
        size=(size[1], size[0]),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0]
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def reference_tokens(images, cache, model_dir, key):
    record = cache.record(key)
    bucket = cache.manifest["buckets"][record["bucket"]]
    pixels = reference_pixels(images / key, record["box"], (bucket["input_width"], bucket["input_height"]))
    return reference_forward(model_dir, pixels[None])[0]


def test_images_land_in_expected_buckets_with_recorded_transform(mixed_images, tmp_path, tiny_model_dir):
    result = run(mixed_images, tmp_path / "out", tiny_model_dir)
    assert result.processed == 4 and result.failed == 0
    cache = FeatureCache(tmp_path / "out")
    assert sorted(cache.keys()) == ["square.png", "sub/landscape.jpg", "sub/tall.PNG", "wide.png"]
    expected = {
        "square.png": ("224x224", (14, 14)),
        "wide.png": ("384x192", (12, 24)),
        "sub/tall.PNG": ("210x300", (19, 13)),
        "sub/landscape.jpg": ("320x224", (14, 20)),
    }
    for key, (bucket, grid) in expected.items():
        item = cache[key]
        assert item["bucket"] == bucket and item["grid"] == grid
        assert item["patches"].shape == (*grid, 64) and item["cls"].shape == (64,)
    manifest = cache.manifest
    tall = manifest["buckets"][1]
    assert (tall["width"], tall["height"], tall["input_width"], tall["input_height"]) == (210, 300, 208, 304)
    record = cache.record("sub/tall.PNG")
    assert record["box"] == [0, 0, 280, 400]  # stretch: the whole picture
    assert record["source_size"] == [280, 400]
    assert record["source_sha256"] == hashlib.sha256((mixed_images / "sub/tall.PNG").read_bytes()).hexdigest()


def test_crop_mode_records_the_crop_box(mixed_images, tmp_path, tiny_model_dir):
    run(mixed_images, tmp_path / "out", tiny_model_dir, buckets={"buckets": [[224, 224]], "resize": "crop"})
    cache = FeatureCache(tmp_path / "out")
    assert cache.record("wide.png")["box"] == [150, 0, 450, 300]
    assert cache.record("sub/tall.PNG")["box"] == [0, 60, 280, 340]
    ref = reference_tokens(mixed_images, cache, tiny_model_dir, "wide.png")
    got = cache["wide.png"]["patches"].reshape(-1, 64)
    assert token_cosine(got, ref[1 + NUM_REGISTERS :]).min() >= 0.999


def test_features_match_plain_transformers_bf16_storage(mixed_images, tmp_path, tiny_model_dir):
    """fp32 compute, bf16 storage: cosine >= 0.999 for every token against the fp32 reference."""
    run(mixed_images, tmp_path / "out", tiny_model_dir, dtype="float32", batch_size=3)
    cache = FeatureCache(tmp_path / "out")
    for key in cache.keys():
        ref = reference_tokens(mixed_images, cache, tiny_model_dir, key)
        item = cache[key]
        assert item["cls"].dtype == torch.bfloat16
        assert token_cosine(item["cls"], ref[0]) >= 0.999
        cos = token_cosine(item["patches"].reshape(-1, 64), ref[1 + NUM_REGISTERS :])
        assert cos.min() >= 0.999, (key, cos.min())


def test_features_are_exact_for_fp32_compute_and_storage(mixed_images, tmp_path, tiny_model_dir):
    run(
        mixed_images,
        tmp_path / "out",
        tiny_model_dir,
        dtype="float32",
        storage_dtype="float32",
        batch_size=1,
        keep_registers=True,
    )
    cache = FeatureCache(tmp_path / "out")
    for key in cache.keys():
        ref = reference_tokens(mixed_images, cache, tiny_model_dir, key)
        item = cache[key]
        # Same pixels up to float rounding of two resize implementations: 1e-5 absolute.
        torch.testing.assert_close(item["cls"], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item["registers"], ref[1 : 1 + NUM_REGISTERS], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item["patches"].reshape(-1, 64), ref[1 + NUM_REGISTERS :], atol=1e-5, rtol=1e-5)


def test_bf16_compute_fidelity(mixed_images, tmp_path, tiny_model_dir):
    """The default on bf16-capable CPUs and GPUs: bf16 compute + storage, cosine >= 0.999 per token."""
    run(mixed_images, tmp_path / "out", tiny_model_dir, dtype="bfloat16")
    cache = FeatureCache(tmp_path / "out")
    assert cache.manifest["model"]["compute_dtype"] == "bfloat16"
    for key in cache.keys():
        ref = reference_tokens(mixed_images, cache, tiny_model_dir, key)
        assert token_cosine(cache[key]["patches"].reshape(-1, 64), ref[1 + NUM_REGISTERS :]).min() >= 0.999


def test_registers_never_appear_among_patches(mixed_images, tmp_path, tiny_model_dir):
    run(mixed_images, tmp_path / "out", tiny_model_dir, dtype="float32", storage_dtype="float32", keep_registers=True)
    cache = FeatureCache(tmp_path / "out")
    item = cache["square.png"]
    ref = reference_tokens(mixed_images, cache, tiny_model_dir, "square.png")
    patches = item["patches"].reshape(-1, 64)
    assert patches.shape[0] == 14 * 14 == ref.shape[0] - 1 - NUM_REGISTERS
    for register in item["registers"]:
        assert token_cosine(patches, register[None]).max() < 0.99
    # The integration guide's slice [1 : 1 + num_patches] would shift every patch by the 4 registers.
    guide_slice = ref[1 : 1 + patches.shape[0]]
    assert not torch.allclose(patches, guide_slice, atol=1e-3)
    torch.testing.assert_close(item["registers"], ref[1 : 1 + NUM_REGISTERS], atol=1e-5, rtol=1e-5)


def test_patch_order_is_spatial(tmp_path, tiny_model_dir):
    """Change only one 16x16 region of the picture: the patch at that (row, col) changes most."""
    base = np.asarray(Image.open(save_scene(tmp_path / "a" / "img.png", 320, 224, 3)).convert("RGB")).copy()
    row, col = 9, 4  # bucket 320x224 -> grid 14 rows x 20 cols; 16 px per patch at this exact size
    changed = base.copy()
    changed[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = [255, 0, 255]
    (tmp_path / "b").mkdir()
    Image.fromarray(changed).save(tmp_path / "b" / "img.png")
    for name in ("a", "b"):
        run(
            tmp_path / name,
            tmp_path / f"out-{name}",
            tiny_model_dir,
            buckets={"buckets": [[320, 224]]},
            dtype="float32",
            storage_dtype="float32",
        )
    pa = FeatureCache(tmp_path / "out-a")["img.png"]["patches"]
    pb = FeatureCache(tmp_path / "out-b")["img.png"]["patches"]
    assert pa.shape == (14, 20, 64)
    change = (pa - pb).norm(dim=-1)
    assert tuple(int(v) for v in np.unravel_index(int(change.argmax()), change.shape)) == (row, col)
    others = change.clone()
    others[row, col] = 0
    assert change[row, col] > 2 * others.max()


def test_failures_are_recorded_and_the_run_goes_on(mixed_images, tmp_path, tiny_model_dir):
    (mixed_images / "fake.jpg").write_text("this is not a jpeg")
    (mixed_images / "empty.png").write_bytes(b"")
    data = save_scene(tmp_path / "ok.jpg", 300, 200, quality=90).read_bytes()
    (mixed_images / "cut.jpg").write_bytes(data[: len(data) // 3])
    result = run(mixed_images, tmp_path / "out", tiny_model_dir)
    assert result.processed == 4
    failures = {f["key"]: f["reason"] for f in read_manifest(tmp_path / "out")["failures"]}
    assert failures == {"fake.jpg": "not_an_image", "empty.png": "empty", "cut.jpg": "corrupt"}


def test_rerun_skips_cached_and_recomputes_changed(mixed_images, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    run(mixed_images, out, tiny_model_dir)
    before = FeatureCache(out)["wide.png"]["cls"].clone()
    second = run(mixed_images, out, tiny_model_dir)
    assert (second.processed, second.skipped) == (0, 4)
    save_scene(mixed_images / "wide.png", 600, 300, seed=99)  # new content, new mtime
    save_scene(mixed_images / "new.png", 300, 300, seed=5)
    third = run(mixed_images, out, tiny_model_dir)
    assert (third.processed, third.skipped) == (2, 3)
    cache = FeatureCache(out)
    assert len(cache) == 5 and len(set(cache.keys())) == 5
    assert not torch.equal(cache["wide.png"]["cls"], before)


def test_changed_settings_are_refused_without_overwrite(mixed_images, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    run(mixed_images, out, tiny_model_dir)
    with pytest.raises(CacheError) as info:
        run(mixed_images, out, tiny_model_dir, storage_dtype="float32", buckets={"buckets": [[224, 224]]})
    message = str(info.value)
    assert "storage.dtype" in message and "buckets" in message and "--overwrite" in message
    result = run(mixed_images, out, tiny_model_dir, storage_dtype="float32", overwrite=True)
    assert result.processed == 4
    assert FeatureCache(out)["square.png"]["cls"].dtype == torch.float32


def test_worker_processes_and_small_shards(mixed_images, tmp_path, tiny_model_dir):
    """Decode in a DataLoader worker process; a shard limit smaller than one row gives one row per shard."""
    result = run(mixed_images, tmp_path / "out", tiny_model_dir, workers=1, shard_max_bytes=1)
    manifest = read_manifest(tmp_path / "out")
    assert result.processed == 4 and len(manifest["shards"]) == 4
    assert all(s["rows"] == 1 for s in manifest["shards"])
    assert json.loads(json.dumps(manifest)) == manifest


def test_preprocessor_config_mean_std_is_used(mixed_images, tmp_path, tiny_model_dir):
    import shutil

    model_dir = tmp_path / "sat-model"
    shutil.copytree(tiny_model_dir, model_dir)
    sat = {"image_mean": [0.430, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]}
    (model_dir / "preprocessor_config.json").write_text(json.dumps(sat))
    run(mixed_images, tmp_path / "out", model_dir)
    assert read_manifest(tmp_path / "out")["preprocessing"]["image_mean"] == sat["image_mean"]
    run(mixed_images, tmp_path / "out2", model_dir, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert read_manifest(tmp_path / "out2")["preprocessing"]["image_std"] == [0.5, 0.5, 0.5]


def test_superseded_rows_are_not_referenced(mixed_images, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    run(mixed_images, out, tiny_model_dir)
    old = FeatureCache(out).record("wide.png")
    save_scene(mixed_images / "wide.png", 600, 300, seed=77)
    run(mixed_images, out, tiny_model_dir)
    cache = FeatureCache(out)
    new = cache.record("wide.png")
    assert (new["shard"], new["row"]) != (old["shard"], old["row"])
    referenced = {(cache.record(k)["shard"], cache.record(k)["row"]) for k in cache.keys()}
    assert (old["shard"], old["row"]) not in referenced
    from dinocache.stats import cache_stats
    from dinocache.verify import verify_cache

    assert verify_cache(out).ok
    assert cache_stats(out)["unreferenced_shards"] == 1  # wide.png was alone in its old shard


def test_deleted_sources_are_reported_and_pruned(mixed_images, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    (mixed_images / "broken.jpg").write_text("x")
    run(mixed_images, out, tiny_model_dir)
    (mixed_images / "square.png").unlink()
    (mixed_images / "broken.jpg").unlink()
    kept = run(mixed_images, out, tiny_model_dir)
    assert sorted(kept.missing_sources) == ["broken.jpg", "square.png"] and kept.pruned == 0
    assert kept.missing_failed == 1  # broken.jpg was a failure, not cached features
    assert "square.png" in FeatureCache(out)
    pruned = run(mixed_images, out, tiny_model_dir, prune=True)
    assert pruned.pruned == 2 and pruned.missing_sources == []
    assert "square.png" not in FeatureCache(out) and len(FeatureCache(out)) == 3
    assert read_manifest(out)["failures"] == []


def test_a_new_mtime_alone_keeps_the_features_and_rehash_compares_content(mixed_images, tmp_path, tiny_model_dir):
    import os

    out = tmp_path / "out"
    path = save_scene(mixed_images / "pic.bmp", 300, 300, seed=1)  # BMP: the size depends on the dimensions only
    run(mixed_images, out, tiny_model_dir)
    os.utime(path, ns=(10**18, 10**18))  # touched (or copied): same bytes, new mtime
    touched = run(mixed_images, out, tiny_model_dir)  # same size, new mtime: the content decides
    assert (touched.processed, touched.skipped) == (0, 5)  # same content: kept, stamp refreshed
    assert FeatureCache(out).record("pic.bmp")["source_mtime_ns"] == 10**18
    os.utime(path, ns=(2 * 10**18, 2 * 10**18))
    rehashed = run(mixed_images, out, tiny_model_dir, rehash=True)
    assert (rehashed.processed, rehashed.skipped) == (0, 5)
    assert FeatureCache(out).record("pic.bmp")["source_mtime_ns"] == 2 * 10**18
    before = FeatureCache(out)["pic.bmp"]["cls"].clone()
    size = path.stat().st_size
    save_scene(path, 300, 300, seed=2)  # new content, same size...
    os.utime(path, ns=(2 * 10**18, 2 * 10**18))  # ...and the old mtime
    assert path.stat().st_size == size
    assert run(mixed_images, out, tiny_model_dir).processed == 0  # size + mtime cannot see it
    changed = run(mixed_images, out, tiny_model_dir, rehash=True)
    assert changed.processed == 1
    after = FeatureCache(out)["pic.bmp"]["cls"].clone()
    assert not torch.equal(after, before)
    save_scene(path, 300, 300, seed=3)  # new content, same size, new mtime: hashed, found changed
    os.utime(path, ns=(3 * 10**18, 3 * 10**18))
    assert run(mixed_images, out, tiny_model_dir).processed == 1
    assert not torch.equal(FeatureCache(out)["pic.bmp"]["cls"], after)
