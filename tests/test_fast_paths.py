"""Speed options must not change what is cached beyond stated tolerances (timing lives in
scripts/bench.py, not here)."""

import pytest
import torch
from conftest import save_scene, token_cosine

from dinocache import FeatureCache
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.extract import extract


def run(images, out, model_dir, **kwargs):
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config({"buckets": [[224, 224], [320, 224]]}),
        model=str(model_dir),
        workers=0,
        progress=False,
        dtype="float32",
        storage_dtype="float32",
        **kwargs,
    )
    return extract(images, options)


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    for i, (w, h) in enumerate([(1600, 1200), (1200, 1200), (2000, 1400), (900, 900)]):
        save_scene(root / f"p{i}.jpg", w, h, seed=i, quality=92)
    return root


def test_jpeg_draft_stays_close_to_a_full_decode(photos, tmp_path, tiny_model_dir):
    run(photos, tmp_path / "full", tiny_model_dir)
    run(photos, tmp_path / "draft", tiny_model_dir, jpeg_draft=True)
    full, draft = FeatureCache(tmp_path / "full"), FeatureCache(tmp_path / "draft")
    assert draft.manifest["preprocessing"]["jpeg_draft"] is True  # recorded: never mixed with full decodes
    for key in full.keys():
        assert draft.record(key)["box"] == full.record(key)["box"]  # recorded in source pixels either way
        cos = token_cosine(draft[key]["patches"].reshape(-1, 64), full[key]["patches"].reshape(-1, 64))
        assert cos.mean() >= 0.99 and cos.min() >= 0.95, (key, cos.mean(), cos.min())


def test_forcing_the_math_attention_kernel_gives_the_same_features(photos, tmp_path, tiny_model_dir):
    run(photos, tmp_path / "auto", tiny_model_dir)
    run(photos, tmp_path / "math", tiny_model_dir, sdpa_backend="math")
    a, b = FeatureCache(tmp_path / "auto"), FeatureCache(tmp_path / "math")
    for key in a.keys():
        torch.testing.assert_close(a[key]["patches"], b[key]["patches"], atol=1e-4, rtol=1e-4)


def test_compiled_model_matches_eager(photos, tmp_path, tiny_model_dir):
    run(photos, tmp_path / "eager", tiny_model_dir)
    run(photos, tmp_path / "compiled", tiny_model_dir, compile=True)
    a, b = FeatureCache(tmp_path / "eager"), FeatureCache(tmp_path / "compiled")
    for key in a.keys():
        # fp32: inductor reorders reductions, so not bit-identical; 1e-4 is well inside bf16 storage error.
        torch.testing.assert_close(a[key]["patches"], b[key]["patches"], atol=1e-4, rtol=1e-4)
        assert token_cosine(a[key]["cls"], b[key]["cls"]) >= 0.9999


def test_resizing_on_the_device_matches_the_workers(photos, tmp_path, tiny_model_dir):
    """The GPU path (workers only decode and crop; the device resizes) run on the CPU device:
    same math, so the same features up to float rounding."""
    import numpy as np
    from PIL import Image

    gray16 = (np.arange(500 * 400, dtype=np.uint32).reshape(400, 500) % 65536).astype(np.uint16)
    Image.fromarray(gray16).save(photos / "gray16.png")  # decodes to float, not uint8: the mixed case
    run(photos, tmp_path / "workers", tiny_model_dir, resize_on_device=False, batch_size=3)
    run(photos, tmp_path / "device", tiny_model_dir, resize_on_device=True, batch_size=3)
    a, b = FeatureCache(tmp_path / "workers"), FeatureCache(tmp_path / "device")
    assert a.keys() == b.keys() and len(a) == 5
    for key in a.keys():
        torch.testing.assert_close(a[key]["patches"], b[key]["patches"], atol=1e-5, rtol=1e-5)


def test_verify_recompute_decodes_a_draft_cache_with_draft_decoding(photos, tmp_path, tiny_model_dir, monkeypatch):
    """One decode path: extract's workers and `verify --recompute` both honour jpeg_draft."""
    import dinocache.imaging as imaging
    from dinocache.verify import verify_cache

    run(photos, tmp_path / "draft", tiny_model_dir, jpeg_draft=True)
    seen = []
    real = imaging.decode_image

    def spy(source, max_pixels, background=imaging.WHITE, draft_size=None, keep_uint8=False):
        seen.append(draft_size)
        return real(source, max_pixels, background, draft_size, keep_uint8)

    monkeypatch.setattr(imaging, "decode_image", spy)
    report = verify_cache(tmp_path / "draft", source=photos, recompute=4, device="cpu")
    assert report.ok and report.recomputed == 4, report.messages()
    assert len(seen) == 4 and all(size is not None for size in seen)  # every recheck asked libjpeg for a draft
