"""Storage options: pooling, float8 with per-row scales, intermediate layers, registers --
each recorded in the manifest, honoured by the reader and verify, checked against references."""

import torch
import torch.nn.functional as F
from conftest import NUM_REGISTERS, token_cosine
from test_extract import reference_pixels

from dinocache import FeatureCache
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.extract import extract
from dinocache.verify import verify_cache

BUCKETS = {"buckets": [[224, 224], [210, 300]]}  # 14x14 and an odd 19x13 grid


def run(images, out, model_dir, **kwargs):
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config(BUCKETS),
        model=str(model_dir),
        workers=0,
        progress=False,
        dtype="float32",
        **kwargs,
    )
    extract(images, options)
    assert verify_cache(out).ok
    return FeatureCache(out)


def test_pool_2_averages_each_2x2_window(mixed_images, tmp_path, tiny_model_dir, caplog):
    full = run(mixed_images, tmp_path / "full", tiny_model_dir, storage_dtype="float32")
    assert "partial window" not in caplog.text
    pooled = run(mixed_images, tmp_path / "pooled", tiny_model_dir, storage_dtype="float32", pool=2)
    assert "--pool 2 does not divide the patch grid of 1 bucket(s) (e.g. 210x300: 19x13)" in caplog.text
    assert pooled.manifest["storage"]["pool"] == 2
    for key in full.keys():
        grid = full[key]["grid"]
        item = pooled[key]
        assert item["grid"] == (
            (grid[0] + 1) // 2,
            (grid[1] + 1) // 2,
        )  # 19x13 -> 10x7: edges averaged over what exists
        expected = F.avg_pool2d(
            full[key]["patches"].permute(2, 0, 1)[None], 2, ceil_mode=True, count_include_pad=False
        )[0].permute(1, 2, 0)
        torch.testing.assert_close(item["patches"], expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(item["cls"], full[key]["cls"])


def test_float8_storage_with_per_row_scales(mixed_images, tmp_path, tiny_model_dir):
    ref = run(mixed_images, tmp_path / "bf16", tiny_model_dir)
    fp8 = run(mixed_images, tmp_path / "fp8", tiny_model_dir, storage_dtype="float8_e4m3fn")
    assert fp8.manifest["storage"]["scaled"] is True
    shard_bytes = lambda c: sum(s["bytes"] for s in c.manifest["shards"])  # noqa: E731
    assert shard_bytes(fp8) < 0.6 * shard_bytes(ref)
    for key in ref.keys():
        got = fp8[key]
        assert got["patches"].dtype == torch.float32  # dequantized on read
        cos = token_cosine(got["patches"].reshape(-1, 64), ref[key]["patches"].reshape(-1, 64))
        assert cos.min() >= 0.99, cos.min()  # e4m3 keeps 3 mantissa bits: ~0.998 typical


def test_intermediate_layers_match_transformers_hidden_states(mixed_images, tmp_path, tiny_model_dir):
    from transformers import DINOv3ViTModel

    cache = run(
        mixed_images, tmp_path / "layers", tiny_model_dir, storage_dtype="float32", layers=(1,), keep_registers=True
    )
    assert cache.manifest["storage"]["layers"] == [1] and cache.manifest["storage"]["layers_normed"] is False
    model = DINOv3ViTModel.from_pretrained(tiny_model_dir).eval()
    for key in cache.keys():
        record, item = cache.record(key), cache[key]
        bucket = cache.manifest["buckets"][record["bucket"]]
        pixels = reference_pixels(mixed_images / key, record["box"], (bucket["input_width"], bucket["input_height"]))
        with torch.no_grad():
            out = model(pixel_values=pixels[None], output_hidden_states=True)
        block1 = out.hidden_states[1][0]
        torch.testing.assert_close(item["layer1_cls"], block1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            item["layer1_patches"].reshape(-1, 64), block1[1 + NUM_REGISTERS :], atol=1e-5, rtol=1e-5
        )
        assert item["registers"].shape == (NUM_REGISTERS, 64)
        # not normed: the final LayerNorm output differs from the last block's raw output
        assert not torch.allclose(out.last_hidden_state[0], out.hidden_states[-1][0], atol=1e-3)


def test_layers_out_of_range_are_refused(mixed_images, tmp_path, tiny_model_dir):
    import pytest

    from dinocache.errors import ConfigError

    with pytest.raises(ConfigError, match="blocks 1..2"):
        run(mixed_images, tmp_path / "bad", tiny_model_dir, layers=(7,))
