"""`plan` (no model) and `show` (a picture of the features)."""

import json

import numpy as np
import pytest
from PIL import Image
from test_verify_stats_cli import REPO, extract_cli
from typer.testing import CliRunner

from dinocache.cli import app

runner = CliRunner()


def test_plan_counts_buckets_sizes_and_warns_about_disk(mixed_images, tmp_path, monkeypatch):
    (mixed_images / "broken.jpg").write_text("x")
    result = runner.invoke(
        app,
        [
            "plan",
            str(mixed_images),
            "--buckets",
            str(REPO / "configs" / "example-small.yaml"),
            "--model",
            "random:vitl16",
            "--json",
            "--out",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    by_name = {b["name"]: b for b in report["buckets"]}
    assert report["images"] == 4 and report["unreadable"] == {"not_an_image": 1}
    assert by_name["384x192"]["images"] == 1 and by_name["210x300"]["images"] == 1
    # 210x300 runs at 208x304: 19x13 patches + CLS, 1024 wide, bf16 -> 2 bytes, plus per-token
    # float32 (mean, std) and the safetensors header (tests/test_layout.py checks against extract)
    assert (1 + 19 * 13) * 1024 * 2 < by_name["210x300"]["bytes"] < 1.05 * (1 + 19 * 13) * 1024 * 2
    assert report["projected_bytes"] == sum(b["bytes"] for b in report["buckets"])
    # the others fit their buckets exactly; 330x230 (1.4348) into 320x224 (1.4286) changes the aspect by 0.43%
    assert report["worst_key"] == "sub/landscape.jpg"
    assert abs(report["worst_distortion"] - (330 / 230) / (320 / 224) + 1) < 1e-9
    assert 0 <= report["mean_distortion"] <= report["worst_distortion"]
    assert report["estimated_gpu_seconds"] > 0
    import dinocache.plan as plan_module

    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    full = runner.invoke(
        app,
        [
            "plan",
            str(mixed_images),
            "--buckets",
            str(REPO / "configs" / "example-small.yaml"),
            "--model",
            "random:vitl16",
            "--out",
            str(tmp_path / "cache"),
        ],
    )
    assert "WARNING: the cache would need" in full.output


def test_plan_options_change_the_projection(mixed_images):
    def size(*extra):
        result = runner.invoke(
            app,
            [
                "plan",
                str(mixed_images),
                "--buckets",
                str(REPO / "configs" / "example-small.yaml"),
                "--model",
                "random:vits16",
                "--json",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["projected_bytes"]

    base = size()
    assert size("--storage-dtype", "float32") == pytest.approx(2 * base, rel=0.03)
    assert size("--pool", "2") < 0.35 * base
    assert size("--layers", "4,8") == pytest.approx(3 * base, rel=0.03)
    assert size("--flip") == pytest.approx(2 * base, rel=0.01)
    args = ["plan", str(mixed_images), "-b", str(REPO / "configs" / "example-small.yaml"), "-m", "random:vits16"]
    pooled = runner.invoke(app, [*args, "--pool", "2", "--json"])
    by_name = {b["name"]: b for b in json.loads(pooled.output)["buckets"]}
    assert by_name["210x300"]["grid"] == "19x13" and by_name["210x300"]["stored_grid"] == "10x7"  # as stats says
    table = runner.invoke(app, [*args, "--pool", "2"]).output.splitlines()[0].split()
    assert table[:4] == ["bucket", "input", "grid", "stored"]


def test_plan_needs_no_weights_but_a_shape(mixed_images):
    result = runner.invoke(
        app,
        [
            "plan",
            str(mixed_images),
            "--buckets",
            str(REPO / "configs" / "example-small.yaml"),
            "--model",
            "someone/some-model",
        ],
    )
    assert result.exit_code == 2 and "random:<arch>" in result.output


def test_show_writes_the_picture_beside_its_features(mixed_images, tmp_path, tiny_model_dir):
    cache = tmp_path / "cache"
    extract_cli(mixed_images, cache, tiny_model_dir)
    out = tmp_path / "wide.png"
    result = runner.invoke(app, ["show", str(cache), "wide.png", "-o", str(out)])
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert img.shape == (512, 2 * 1024 + 8, 3)  # 384x192 bucket -> 1024 wide at 512 high, twice, plus the gap
    features = img[:, 1024 + 8 :]
    assert features.std(axis=(0, 1)).max() > 20  # the PCA half is not flat
    picture = img[:, :1024]
    assert picture.std() > 20
    missing = runner.invoke(app, ["show", str(cache), "nope.png", "-o", str(out)])
    assert missing.exit_code == 2 and "not in the cache" in missing.output
    moved = runner.invoke(
        app, ["show", str(cache), "wide.png", "-o", str(out), "--source", str(tmp_path / "elsewhere")]
    )
    assert moved.exit_code == 2 and "--source" in moved.output


def test_show_follows_the_feature_layout(tmp_path, tiny_model_dir):
    """Left half red, right half blue: the feature picture's left and right halves differ too."""
    images = tmp_path / "img"
    images.mkdir()
    half = np.zeros((224, 224, 3), np.uint8)
    half[:, :112] = (220, 30, 30)
    half[:, 112:] = (30, 30, 220)
    Image.fromarray(half).save(images / "halves.png")
    extract_cli(images, tmp_path / "cache", tiny_model_dir)
    out = tmp_path / "h.png"
    assert runner.invoke(app, ["show", str(tmp_path / "cache"), "halves.png", "-o", str(out)]).exit_code == 0
    feat = np.asarray(Image.open(out).convert("RGB")).astype(float)[:, 512 + 8 :]
    left, right = feat[:, 32:200].mean(axis=(0, 1)), feat[:, 312:480].mean(axis=(0, 1))
    assert np.abs(left - right).max() > 60
