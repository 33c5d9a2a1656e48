"""Features the way DiT recipes use them (issue 11): the flipped view, the three flavours from
one cache, and dataset statistics. References are the plain transformers forward."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_REGISTERS, save_scene, tiny_config, token_cosine
from test_extract import reference_pixels
from typer.testing import CliRunner

from dinocache import BucketBatchSampler, FeatureCache, collate_features
from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import CacheError, ConfigError
from dinocache.extract import extract
from dinocache.normstats import Moments
from dinocache.verify import verify_cache

BUCKETS = {"buckets": [[64, 64], [96, 48]]}
runner = CliRunner()


@pytest.fixture(scope="module")
def affine_model_dir(tmp_path_factory):
    """A tiny DINOv3 whose final LayerNorm has a real affine (random weight and bias), so that
    normed, ln_noaffine and prenorm all differ."""
    from transformers import DINOv3ViTModel

    torch.manual_seed(77)
    model = DINOv3ViTModel(tiny_config())
    with torch.no_grad():
        model.norm.weight.uniform_(0.3, 1.7)
        model.norm.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("affine-dinov3")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets") / "images"
    for i, (w, h) in enumerate([(64, 64), (70, 64), (96, 48), (100, 52), (64, 60), (90, 50)]):
        save_scene(root / f"img{i}.png", w, h, seed=10 + i)
    return root


def run(images, out, model_dir, **kwargs):
    kwargs.setdefault("dtype", "float32")
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config(kwargs.pop("buckets", BUCKETS)),
        model=str(model_dir),
        workers=0,
        progress=False,
        **kwargs,
    )
    extract(images, options)
    return FeatureCache(out)


def reference_outputs(model_dir, images, cache, key, mirror=False):
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(model_dir).float().eval()
    record = cache.record(key)
    bucket = cache.manifest["buckets"][record["bucket"]]
    pixels = reference_pixels(images / key, record["box"], (bucket["input_width"], bucket["input_height"]))
    if mirror:
        pixels = pixels.flip(-1)
    with torch.no_grad():
        out = model(pixel_values=pixels[None], output_hidden_states=True)
    return out.last_hidden_state[0], out.hidden_states[-1][0], model.norm.eps


# ---- the flipped view ----------------------------------------------------------------------------


def test_flip_features_match_a_forward_of_the_mirrored_pixels(images, tmp_path, affine_model_dir):
    cache = run(images, tmp_path / "flip", affine_model_dir, flip=True, keep_registers=True)  # bf16 storage
    assert verify_cache(tmp_path / "flip").ok
    for key in cache.keys():
        item = cache[key]
        rows, cols = item["grid"]
        for name in ("cls", "patches", "registers"):
            assert item[name + "_flip"].shape == item[name].shape
        last, _, _ = reference_outputs(affine_model_dir, images, cache, key, mirror=True)
        got = torch.cat([item["cls_flip"][None], item["registers_flip"], item["patches_flip"].reshape(-1, 64)])
        assert token_cosine(got, last).min() >= 0.999, key
        # Mirroring the plain features is not the same thing: the model is not mirror-equivariant.
        mirrored_plain = item["patches"].flip(1).reshape(-1, 64)
        assert token_cosine(mirrored_plain, item["patches_flip"].reshape(-1, 64)).min() < 0.99, key


def test_the_sampler_picks_one_view_per_sample_per_epoch(images, tmp_path, tiny_model_dir):
    cache = run(images, tmp_path / "flip", tiny_model_dir, flip=True)
    sampler = BucketBatchSampler(cache, batch_size=2, seed=3, flip=True)
    epoch0 = list(sampler)
    assert epoch0 == list(BucketBatchSampler(cache, batch_size=2, seed=3, flip=True))  # deterministic
    picks = {i: flipped for batch in epoch0 for i, flipped in batch}
    assert sorted(picks) == list(range(len(cache)))
    views_by_epoch = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        views_by_epoch.append({i: f for batch in sampler for i, f in batch})
    assert any(views_by_epoch[0] != v for v in views_by_epoch[1:])  # the choice changes with the epoch
    assert {f for v in views_by_epoch for f in v.values()} == {True, False}
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=collate_features)
    for batch in loader:
        for j, key in enumerate(batch["key"]):
            i = cache.index_of(key)
            want = cache[i]["patches_flip" if batch["flipped"][j] else "patches"].reshape(-1, 64)
            assert torch.equal(batch["patches"][j][: want.shape[0]], want)
        assert "patches_flip" not in batch  # one view per sample: half the bytes read
    with pytest.raises(ValueError, match="--flip"):
        BucketBatchSampler(run(images, tmp_path / "plain", tiny_model_dir), batch_size=2, flip=True)


# ---- flavours -------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_each_flavour_matches_its_transformers_reference(images, tmp_path, affine_model_dir, storage):
    out = tmp_path / storage
    run(images, out, affine_model_dir, storage_dtype=storage, keep_registers=True)
    floor = 0.999 if storage == "bfloat16" else 0.99999
    caches = {f: FeatureCache(out, flavour=f) for f in ("normed", "ln_noaffine", "prenorm")}
    for key in caches["normed"].keys():
        last, prenorm, eps = reference_outputs(affine_model_dir, images, caches["normed"], key)
        noaffine = F.layer_norm(prenorm, (prenorm.shape[-1],), eps=eps)
        for flavour, reference in (("normed", last), ("ln_noaffine", noaffine), ("prenorm", prenorm)):
            item = caches[flavour][key]
            got = torch.cat([item["cls"][None], item["registers"], item["patches"].reshape(-1, 64)])
            assert token_cosine(got, reference).min() >= floor, (storage, flavour, key)
        # and the three really differ (the affine is not the identity)
        a, b = caches["normed"][key]["patches"], caches["ln_noaffine"][key]["patches"]
        assert not torch.allclose(a.float(), b.float(), atol=1e-2)


def test_token_statistics_cost_at_most_5_percent(images, tmp_path):
    from dinocache.layout import Layout
    from dinocache.plan import plan_extraction

    for arch in ("vits16", "vitl16"):
        sizes = {
            s: plan_extraction(
                images, parse_bucket_config({"buckets": [[224, 224]]}), f"random:{arch}", Layout(ln_stats=s)
            ).projected_bytes
            for s in (False, True)
        }
        assert sizes[True] <= 1.05 * sizes[False], (arch, sizes)


def test_a_flavour_the_cache_cannot_give_says_how_to_rebuild(images, tmp_path, tiny_model_dir):
    from pathlib import Path

    old = Path(__file__).parent / "data" / "v1" / "cache-v1"
    with pytest.raises(CacheError, match="rebuild"):
        FeatureCache(old, flavour="ln_noaffine")
    run(images, tmp_path / "pooled", tiny_model_dir, pool=2)
    with pytest.raises(CacheError, match="--pool"):
        FeatureCache(tmp_path / "pooled", flavour="prenorm")
    assert FeatureCache(tmp_path / "pooled", flavour="ln_noaffine")[0]["patches"].shape[-1] == 64
    with pytest.raises(ConfigError, match="unknown flavour"):
        FeatureCache(tmp_path / "pooled", flavour="whitened")


# ---- dataset statistics ---------------------------------------------------------------------------


def all_tokens(cache, name, views=("",)):
    rows = []
    for key in cache.keys():
        for view in views:
            value = cache[key][name + view]
            rows.append(value.reshape(-1, value.shape[-1]).double().numpy())
    return np.concatenate(rows)


@pytest.mark.parametrize("flavour", ["normed", "ln_noaffine"])
def test_statistics_equal_numpy_over_every_token(images, tmp_path, affine_model_dir, flavour):
    out = tmp_path / "cache"
    run(images, out, affine_model_dir, flip=True, shard_max_bytes=20_000)  # several shards
    result = runner.invoke(app, ["norm-stats", str(out), "--flavour", flavour, "--no-progress"])
    assert result.exit_code == 0, result.output
    cache = FeatureCache(out, flavour=flavour)
    from dinocache.normstats import load_statistics

    stats = load_statistics(out, cache.manifest, flavour)
    for name in ("patches", "cls"):
        tokens = all_tokens(cache, name, ("", "_flip"))
        np.testing.assert_allclose(stats.tensors[f"{name}_mean"].numpy(), tokens.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.tensors[f"{name}_var"].numpy(), tokens.var(0), rtol=1e-6, atol=1e-12)
    normalized = FeatureCache(out, flavour=flavour, normalize=True)
    z = all_tokens(normalized, "patches", ("", "_flip"))  # the statistics cover both views
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    raw_var = all_tokens(cache, "patches", ("", "_flip")).var(0)
    np.testing.assert_allclose(z.var(0), raw_var / (raw_var + 1e-6), rtol=1e-4)  # (x - mean) / sqrt(var + eps)


def test_per_position_statistics_and_exports(images, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    run(images, out, tiny_model_dir, buckets={"buckets": [[64, 64]]})
    wrong_style = runner.invoke(app, ["norm-stats", str(out), "--export", str(tmp_path / "s.pt"), "--style", "torch"])
    assert wrong_style.exit_code == 2 and "unknown --style 'torch'" in wrong_style.output
    assert not (out / "stats").exists()  # refused before any statistics were computed
    bad = runner.invoke(app, ["norm-stats", str(out), "--per-position", "--no-progress", "--flavour", "prenorm"])
    assert bad.exit_code == 0, bad.output  # one bucket: one grid
    cache = FeatureCache(out, flavour="prenorm")
    tokens = np.stack([cache[k]["patches"].double().numpy() for k in cache.keys()])  # [N, rows, cols, D]
    rae = tmp_path / "stat.pt"
    result = runner.invoke(
        app, ["norm-stats", str(out), "--per-position", "--flavour", "prenorm", "--export", str(rae), "--style", "rae"]
    )
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    loaded = torch.load(rae, weights_only=True)
    assert loaded["mean"].shape == (64, 4, 4) and loaded["var"].shape == (64, 4, 4)
    np.testing.assert_allclose(loaded["mean"].numpy(), tokens.mean(0).transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded["var"].numpy(), tokens.var(0).transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
    runner.invoke(app, ["norm-stats", str(out), "--no-progress"])
    svg = tmp_path / "dinov3_sp_stats.pt"
    assert runner.invoke(app, ["norm-stats", str(out), "--export", str(svg), "--style", "svg"]).exit_code == 0
    exported = torch.load(svg, weights_only=True)
    flat = np.stack([FeatureCache(out)[k]["patches"].double().numpy() for k in cache.keys()]).reshape(-1, 64)
    assert exported["dinov3_sp_mean"].shape == (1, 1, 64) and exported["dinov3_sp_std"].shape == (1, 1, 64)
    np.testing.assert_allclose(exported["dinov3_sp_std"].numpy().ravel(), flat.std(0), rtol=1e-5)
    js = tmp_path / "stats.json"
    assert runner.invoke(app, ["norm-stats", str(out), "--export", str(js), "--style", "json"]).exit_code == 0
    doc = json.loads(js.read_text())
    assert doc["samples"] == len(cache) and len(doc["patches"]["mean"]) == 64
    two_grids = tmp_path / "two"
    run(images, two_grids, tiny_model_dir)
    refused = runner.invoke(app, ["norm-stats", str(two_grids), "--per-position"])
    assert refused.exit_code == 2 and "one grid" in refused.output


def test_statistics_become_stale_when_the_cache_changes(images, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    run(images, out, tiny_model_dir)
    assert runner.invoke(app, ["norm-stats", str(out), "--no-progress"]).exit_code == 0
    FeatureCache(out, normalize=True)
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    args = ["extract", str(images), "-b", str(tmp_path / "b.yaml"), "-o", str(out), "-m", str(tiny_model_dir)]
    args += ["--dtype", "float32", "--workers", "0", "--no-progress"]
    unchanged = runner.invoke(app, args)
    assert "0 extracted" in unchanged.output and "no longer cover" not in unchanged.output  # still fresh: no note
    save_scene(images.parent / "more" / "extra.png", 64, 64, seed=99)
    import shutil

    shutil.copy(images.parent / "more" / "extra.png", images / "extra.png")
    try:
        rerun = runner.invoke(app, args)
    finally:
        (images / "extra.png").unlink()
    assert rerun.exit_code == 0, rerun.output
    assert "1 extracted" in rerun.output and "statistics (normed) no longer cover every sample" in rerun.output
    with pytest.raises(CacheError, match="stale"):
        FeatureCache(out, normalize=True)
    assert any("stale" in note for note in verify_cache(out).notes)
    stats = json.loads(runner.invoke(app, ["stats", str(out), "--json"]).output)
    assert stats["statistics"][0]["stale"] is True


def test_overwrite_removes_the_old_statistics_files(images, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    run(images, out, tiny_model_dir)
    for extra in ([], ["--flavour", "ln_noaffine"]):
        assert runner.invoke(app, ["norm-stats", str(out), "--no-progress", *extra]).exit_code == 0
    assert len(list((out / "stats").iterdir())) == 2
    (out / "stats" / "mine.txt").write_text("not dinocache's: stays")
    run(images, out, tiny_model_dir, storage_dtype="float16", overwrite=True)
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["mine.txt"]
    assert verify_cache(out).ok


def test_merging_moments_equals_one_pass():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, (1000, 8)) * rng.uniform(0.1, 10, 8)
    whole = Moments((8,))
    whole.add(torch.from_numpy(data))
    parts = [Moments((8,)) for _ in range(4)]
    for chunk, part in zip(np.array_split(data, [7, 300, 301]), parts):
        for piece in np.array_split(chunk, 3):
            part.add(torch.from_numpy(piece))
    merged = Moments((8,))
    for part in parts:
        merged.merge(part)
    np.testing.assert_allclose(merged.mean.numpy(), data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.var.numpy(), data.var(0), rtol=1e-10)
    np.testing.assert_allclose(merged.var.numpy(), whole.var.numpy(), rtol=1e-10)
    assert merged.count == whole.count == 1000


def test_registers_flip_layers_and_stats_round_trip_through_verify_recompute(images, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    run(images, out, tiny_model_dir, flip=True, keep_registers=True, layers=(1,), dtype="float32")
    report = verify_cache(out, source=images, recompute=6, device="cpu")
    assert report.ok and report.recomputed == 6, report.messages()
    assert NUM_REGISTERS == FeatureCache(out)[0]["registers_flip"].shape[0]


# ---- precision of each flavour ----------------------------------------------------------------------


def round_trip(x: torch.Tensor, storage: str) -> torch.Tensor:
    """The rows of one feature [tokens, D] rounded as the spec stores them (docs/FORMAT.md): cast
    to the storage dtype, or for float8 scaled so that the largest magnitude maps to 448."""
    if storage != "float8_e4m3fn":
        return x.to(getattr(torch, storage)).float()
    scale = x.abs().max() / 448
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def flavour_errors(cache_dir, images, model_dir, storage) -> dict[str, float]:
    """||got - ref|| / ||ref|| over every token (cls, registers, patches) of every sample, for
    each flavour read with the default dtype, against the plain transformers fp32 forward; and
    "stored z": the same for the exact ln_noaffine values rounded to the storage dtype."""
    caches = {f: FeatureCache(cache_dir, flavour=f) for f in ("normed", "ln_noaffine", "prenorm")}
    got, ref, stored = {f: [] for f in caches}, {f: [] for f in caches}, []
    for key in caches["normed"].keys():
        last, prenorm, eps = reference_outputs(model_dir, images, caches["normed"], key)
        noaffine = F.layer_norm(prenorm, (prenorm.shape[-1],), eps=eps)
        for flavour, reference in (("normed", last), ("ln_noaffine", noaffine), ("prenorm", prenorm)):
            item = caches[flavour][key]
            dim = item["cls"].shape[-1]
            got[flavour].append(torch.cat([item["cls"][None], item["registers"], item["patches"].reshape(-1, dim)]))
            ref[flavour].append(reference)
        parts = (noaffine[:1], noaffine[1 : 1 + NUM_REGISTERS], noaffine[1 + NUM_REGISTERS :])  # one scale each
        stored.append(torch.cat([round_trip(part, storage) for part in parts]))
    out = {}
    for flavour in caches:
        a, b = torch.cat(got[flavour]).double(), torch.cat(ref[flavour]).double()
        out[flavour] = float((a - b).norm() / b.norm())
    b = torch.cat(ref["ln_noaffine"]).double()
    out["stored z"] = float((torch.cat(stored).double() - b).norm() / b.norm())
    return out


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "float8_e4m3fn"])
def test_ln_noaffine_keeps_the_storage_precision(images, tmp_path, storage):
    """Issue 20 item 4: ln_noaffine was (normed - bias) / weight of the stored normed tokens, so
    their rounding was scaled by 1 / |weight| (1.8x normed's relative error here). This model's
    final norm has weights 0.12, -0.3, 0.05 and 0.1..1.7 and real biases (tests/data/v2)."""
    from pathlib import Path

    model_dir = Path(__file__).parent / "data" / "v2" / "model"
    run(images, tmp_path / storage, model_dir, storage_dtype=storage, keep_registers=True)
    errors = flavour_errors(tmp_path / storage, images, model_dir, storage)
    # What the storage dtype itself costs: the exact values rounded once, as the format stores them.
    assert errors["ln_noaffine"] <= 1.01 * errors["stored z"], errors
    assert errors["prenorm"] <= 1.01 * errors["stored z"], errors
    if storage != "float8_e4m3fn":  # float8 reads back in float32, so normed is not rounded again
        assert errors["ln_noaffine"] <= errors["normed"], errors


def test_verify_recompute_compares_what_each_format_stores(images, tmp_path, affine_model_dir, monkeypatch):
    """Format 3 stores the norm without its affine, formats 1-2 the normed tokens: --recompute
    must compare like with like (with a real affine, z and normed are far apart)."""
    from pathlib import Path

    out = tmp_path / "cache"
    run(images, out, affine_model_dir, keep_registers=True, flip=True)
    report = verify_cache(out, source=images, recompute=3, device="cpu")
    assert report.ok and report.recomputed == 3, report.messages()
    data = Path(__file__).parent / "data"
    monkeypatch.chdir(data / "v2")  # its manifest names the model "model"
    for name in ("cache-v2", "cache-v2-f8"):
        report = verify_cache(data / "v2" / name, source=data / "v1" / "images", recompute=3, device="cpu")
        assert report.recomputed == 3 and not [m for m in report.messages() if "recompute" in m], report.messages()
