"""The statistics exports are what each recipe's own loading lines accept, unchanged.

The loading lines below are copied from the recipes (cited per test) and run on the exported
file; the numbers they load must equal numpy's statistics over the cached tokens of the chosen
views, and normalising with them must equal FeatureCache(normalize=...) with the eps recorded.
"""

import os

import numpy as np
import pytest
import torch
from test_trainer_targets import affine_model_dir, images, run  # noqa: F401 - fixtures
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app

runner = CliRunner()
ONE_GRID = {"buckets": [[64, 64]], "resize": "stretch"}


@pytest.fixture(scope="module")
def flipped_cache(images, affine_model_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("recipe-stats") / "cache"
    run(images, out, affine_model_dir, flip=True, buckets=ONE_GRID, storage_dtype="float32")
    return out


def patch_tokens(out, flavour, views) -> np.ndarray:
    """[N * len(views), rows, cols, D] float64: the cached patch tokens of the chosen views."""
    cache = FeatureCache(out, flavour=flavour)
    names = {"plain": ["patches"], "flip": ["patches_flip"], "both": ["patches", "patches_flip"]}[views]
    return np.stack([cache[k][name].double().numpy() for k in cache.keys() for name in names])


@pytest.mark.parametrize("views", ["plain", "both"])
def test_svg_loads_the_export_and_gets_numpys_statistics(flipped_cache, tmp_path, views, monkeypatch):
    exported = tmp_path / "dinov3_sp_stats.pt"
    args = ["norm-stats", str(flipped_cache), "--views", views, "--export", str(exported), "--style", "svg"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    device, z_channels = "cpu", 64
    # shiml20/SVG@fd69855 train_svg.py:72-74, verbatim
    dinov3_sp_stats = torch.load("./dinov3_sp_stats.pt")
    dinov3_sp_mean = dinov3_sp_stats["dinov3_sp_mean"].to(device)[:, :, :z_channels]
    dinov3_sp_std = dinov3_sp_stats["dinov3_sp_std"].to(device)[:, :, :z_channels]

    tokens = patch_tokens(flipped_cache, "normed", views).reshape(-1, 64)
    assert dinov3_sp_mean.shape == dinov3_sp_std.shape == (1, 1, 64)
    np.testing.assert_allclose(dinov3_sp_mean.numpy().ravel(), tokens.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dinov3_sp_std.numpy().ravel(), tokens.std(0), rtol=1e-5, atol=1e-6)
    # train_svg.py:97-105: x [B, H*W, D] normalised without eps; the reader applies the same
    cache = FeatureCache(flipped_cache)
    x = cache[0]["patches"].reshape(1, -1, 64).float()
    x = (x - dinov3_sp_mean) / dinov3_sp_std
    if views == "both":  # normalize=True prefers the statistics over both views
        ours = FeatureCache(flipped_cache, normalize=True)[0]["patches"].reshape(1, -1, 64)
        assert (ours - x).abs().max() < 1e-4


@pytest.mark.parametrize("views", ["plain", "both"])
def test_rae_loads_the_export_and_gets_numpys_per_position_statistics(flipped_cache, tmp_path, views):
    exported = tmp_path / "stat.pt"
    args = ["norm-stats", str(flipped_cache), "--flavour", "ln_noaffine", "--views", views]
    result = runner.invoke(app, [*args, "--export", str(exported), "--style", "rae", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "per position" in result.output  # RAE's default: calculate_stat.py's [C, H, W]
    normalization_stat_path, eps = str(exported), 1e-5
    # bytetriper/RAE@a4d18c4 src/stage1/rae.py:70-74, verbatim
    stats = torch.load(normalization_stat_path, map_location="cpu")
    latent_mean = stats.get("mean", None)
    latent_var = stats.get("var", None)

    tokens = patch_tokens(flipped_cache, "ln_noaffine", views)  # [N, rows, cols, C]
    assert latent_mean.shape == latent_var.shape == (64, 4, 4)  # [C, H, W]
    np.testing.assert_allclose(latent_mean.numpy(), tokens.mean(0).transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(latent_var.numpy(), tokens.var(0).transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
    # rae.py:86-94: z [b, n, c] -> [b, c, h, w], then (z - mean) / sqrt(var + eps)
    z = FeatureCache(flipped_cache, flavour="ln_noaffine")[0]["patches"].reshape(1, 16, 64).float()
    b, n, c = z.shape
    z = z.transpose(1, 2).view(b, c, 4, 4)
    z = (z - latent_mean) / torch.sqrt(latent_var + eps)
    if views == "both":  # the recorded eps is RAE's
        ours = FeatureCache(flipped_cache, flavour="ln_noaffine", normalize="position")[0]["patches"]
        assert (ours.permute(2, 0, 1) - z[0]).abs().max() < 1e-4


def test_exports_name_what_the_recipe_needs(flipped_cache, images, affine_model_dir, tmp_path):  # noqa: F811
    before = sorted(os.listdir(flipped_cache / "stats")) if (flipped_cache / "stats").exists() else []
    not_pt = runner.invoke(app, ["norm-stats", str(flipped_cache), "--export", str(tmp_path / "s.safetensors")])
    assert not_pt.exit_code == 2 and "torch.load" in not_pt.output and "stat.pt" in not_pt.output
    svg_grid = runner.invoke(
        app, ["norm-stats", str(flipped_cache), "--per-position", "--style", "svg", "--export", str(tmp_path / "a.pt")]
    )
    assert svg_grid.exit_code == 2 and "per channel" in svg_grid.output
    after = sorted(os.listdir(flipped_cache / "stats")) if (flipped_cache / "stats").exists() else []
    assert after == before  # both refused before anything was computed
    two_grids = tmp_path / "two"
    run(images, two_grids, affine_model_dir)
    rae = runner.invoke(app, ["norm-stats", str(two_grids), "--export", str(tmp_path / "stat.pt"), "--style", "rae"])
    assert rae.exit_code == 2 and "one grid" in rae.output and "--per-channel" in rae.output
    per_channel = ["--per-channel", "--export", str(tmp_path / "stat.pt"), "--no-progress"]
    assert runner.invoke(app, ["norm-stats", str(two_grids), *per_channel]).exit_code == 0
    assert torch.load(tmp_path / "stat.pt")["mean"].shape == (64, 1, 1)


def test_eps_is_recorded_and_applied(flipped_cache):
    result = runner.invoke(app, ["norm-stats", str(flipped_cache), "--eps", "0.5", "--no-progress"])
    assert result.exit_code == 0, result.output
    raw = FeatureCache(flipped_cache)[0]["patches"].double()
    from dinocache.manifest import read_manifest
    from dinocache.normstats import load_statistics

    stats = load_statistics(flipped_cache, read_manifest(flipped_cache), "normed")
    expected = (raw - stats.tensors["patches_mean"]) / torch.sqrt(stats.tensors["patches_var"] + 0.5)
    got = FeatureCache(flipped_cache, normalize=True)[0]["patches"]
    assert stats.eps == 0.5 and (got.double() - expected).abs().max() < 1e-5
    overridden = FeatureCache(flipped_cache, normalize=True, normalize_eps=0.0)[0]["patches"]
    assert (overridden.double() - expected).abs().max() > 1e-3
    again = runner.invoke(app, ["norm-stats", str(flipped_cache), "--no-progress"])  # no --eps: keeps 0.5
    assert "up to date" in again.output
    assert load_statistics(flipped_cache, read_manifest(flipped_cache), "normed").eps == 0.5


def test_newcomer_slips_with_statistics_get_a_fix(flipped_cache, tmp_path):
    """From a newcomer trial: a JSON export named .pt, a JSON export resetting the recipe's eps,
    and normalize=True on a cache that has only per-position statistics."""
    from dinocache.errors import CacheError

    json_as_pt = runner.invoke(
        app, ["norm-stats", str(flipped_cache), "--export", str(tmp_path / "s.pt"), "--style", "json"]
    )
    assert json_as_pt.exit_code == 2 and "does not end in .json" in json_as_pt.output
    svg = ["norm-stats", str(flipped_cache), "--export", str(tmp_path / "dinov3_sp_stats.pt"), "--style", "svg"]
    assert runner.invoke(app, [*svg, "--no-progress"]).exit_code == 0
    look = ["norm-stats", str(flipped_cache), "--export", str(tmp_path / "look.json"), "--style", "json"]
    assert runner.invoke(app, look).exit_code == 0
    from dinocache.manifest import read_manifest
    from dinocache.normstats import load_statistics

    assert load_statistics(flipped_cache, read_manifest(flipped_cache), "normed").eps == 0.0  # still SVG's
    rae = ["norm-stats", str(flipped_cache), "--flavour", "prenorm", "--per-position", "--no-progress"]
    assert runner.invoke(app, rae).exit_code == 0
    with pytest.raises(CacheError) as info:
        FeatureCache(flipped_cache, flavour="prenorm", normalize=True)
    assert "per-position statistics" in str(info.value) and 'normalize="position"' in info.value.hint
