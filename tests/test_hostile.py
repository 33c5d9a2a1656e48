"""Hostile input: every file yields correct features or a recorded failure, and the run goes on."""

import os

import numpy as np
import pytest
import torch
from hostile_corpus import cmyk_pattern, make_corpus
from PIL import Image

from dinocache import FeatureCache
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import DecodeError, DinocacheError
from dinocache.extract import extract
from dinocache.imaging import decode_image, read_source
from dinocache.manifest import read_manifest
from dinocache.stats import cache_stats
from dinocache.verify import verify_cache

BUCKETS = {"buckets": [[128, 128], [160, 96], [96, 160], [64, 512], [512, 64]]}


def run(images, out, model_dir, **kwargs):
    kwargs.setdefault("workers", 0)
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config(BUCKETS),
        model=str(model_dir),
        progress=False,
        dtype="float32",
        storage_dtype="float32",
        batch_size=1,
        max_pixels=50_000_000,
        **kwargs,
    )
    return extract(images, options)


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("hostile")
    expect = make_corpus(root / "images")
    result = run(root / "images", root / "out", tiny_model_dir, workers=1)  # decode in a worker process
    return root, expect, result


def test_every_file_has_the_expected_outcome(corpus_cache):
    root, expect, result = corpus_cache
    cache = FeatureCache(root / "out")
    failures = {f["key"]: f["reason"] for f in read_manifest(root / "out")["failures"]}
    outcome = {key: "ok" for key in cache.keys()} | failures
    assert outcome == expect
    for key in cache.keys():
        assert torch.isfinite(cache[key]["patches"]).all(), key
    assert verify_cache(root / "out").ok


def test_stats_show_failures_with_key_and_reason(corpus_cache):
    root, expect, _ = corpus_cache
    stats = cache_stats(root / "out")
    wanted = {}
    for reason in expect.values():
        if reason != "ok":
            wanted[reason] = wanted.get(reason, 0) + 1
    assert stats["failures_by_reason"] == wanted
    assert {f["key"] for f in stats["failures"]} == {k for k, v in expect.items() if v != "ok"}
    assert all(f["detail"] for f in stats["failures"])


def test_all_eight_exif_orientations_give_the_upright_features(corpus_cache):
    root, _, _ = corpus_cache
    cache = FeatureCache(root / "out")
    upright = cache["orientation/upright.png"]
    for orientation in range(1, 9):
        item = cache[f"orientation/o{orientation}.png"]
        assert item["bucket"] == upright["bucket"]
        assert torch.equal(item["patches"], upright["patches"]), orientation
        assert cache.record(f"orientation/o{orientation}.png")["source_size"] == [80, 48]


def test_animations_use_their_first_frame(corpus_cache, tmp_path, tiny_model_dir):
    root, _, _ = corpus_cache
    first = tmp_path / "first"
    first.mkdir()
    for name in ("animated.gif", "animated.webp"):
        with Image.open(root / "images" / name) as img:
            img.seek(0)
            img.convert("RGB").save(first / (name + ".png"))
    run(first, tmp_path / "out", tiny_model_dir)
    alone, cache = FeatureCache(tmp_path / "out"), FeatureCache(root / "out")
    for name in ("animated.gif", "animated.webp"):
        assert torch.equal(cache[name]["patches"], alone[name + ".png"]["patches"]), name


def test_sixteen_bit_rgb_equals_its_eight_bit_content(corpus_cache):
    root, _, _ = corpus_cache
    from hostile_corpus import picture

    expected = torch.from_numpy(np.asarray(picture(96, 64, 6), dtype=np.float32) / 255.0).permute(2, 0, 1)
    torch.testing.assert_close(decode_image(str(root / "images" / "rgb16.png"), 10**9), expected)


def test_ycck_decodes_like_the_same_cmyk(corpus_cache):
    root, _, _ = corpus_cache
    ycck = decode_image(str(root / "images" / "ycck.jpg"), 10**9)
    cmyk = decode_image(str(root / "images" / "cmyk.jpg"), 10**9)
    assert (ycck - cmyk).abs().max() <= 3 / 255  # JPEG rounding at quality 100
    naive = torch.from_numpy(np.asarray(Image.fromarray(cmyk_pattern(), "CMYK").convert("RGB"), np.float32) / 255)
    torch.testing.assert_close(ycck, naive.permute(2, 0, 1), atol=3 / 255, rtol=0)


def test_a_file_without_read_permission_is_a_recorded_failure(tmp_path):
    """Root reads everything, so as root the check runs in a child that drops to user nobody."""
    folder = tmp_path / "perm"
    folder.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(folder, 0o755)
    path = folder / "secret.png"
    Image.new("RGB", (8, 8)).save(path)
    os.chmod(path, 0)
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            read_source(str(path))
            code = 1
        except DecodeError as exc:
            code = 0 if exc.reason == "unreadable" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_max_failures_stops_a_mostly_broken_dataset(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 100, 0, 0)).save(images / f"good{i}.png")
    for i in range(6):
        (images / f"bad{i}.jpg").write_text("broken")
    with pytest.raises(DinocacheError, match="max-failures"):
        run(images, tmp_path / "out", tiny_model_dir, max_failures=3)
    # what was done is kept and intact (it stopped before any good image: an empty cache, which verify names)
    assert [p.kind for p in verify_cache(tmp_path / "out").problems] in ([], ["empty"])
    with pytest.raises(DinocacheError, match="6 of 8"):
        run(images, tmp_path / "out2", tiny_model_dir, max_failures=0.5)
    result = run(images, tmp_path / "out3", tiny_model_dir, max_failures=6)
    assert result.processed == 2 and result.failed == 6
