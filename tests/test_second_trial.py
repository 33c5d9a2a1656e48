"""What the second newcomer trial hit: failures that stay failed, a cache fed from two folders,
NaN features, bad normalization, and commands pointed at the wrong thing."""

import json
import os
import shutil

import pytest
import torch
from conftest import save_scene
from test_crash import options
from typer.testing import CliRunner

from dinocache.cli import app
from dinocache.errors import CacheError, DinocacheError, ModelLoadError
from dinocache.extract import extract
from dinocache.manifest import read_manifest
from dinocache.model import resolve_model
from dinocache.normstats import compute_statistics
from dinocache.reader import FeatureCache
from dinocache.verify import verify_cache, verify_paths
from dinocache.worklist import RETRIED_EVERY_RUN

runner = CliRunner()


def _failures(out):
    return {f["key"]: f["reason"] for f in read_manifest(out)["failures"]}


def test_a_fixed_file_with_the_same_size_and_mtime_is_retried_only_with_retry_failed(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    save_scene(images / "good.png", 160, 96, 1)
    broken = images / "broken.png"
    good_bytes = save_scene(tmp_path / "fixed.png", 128, 128, 2).read_bytes()
    broken.write_bytes(good_bytes[:40] + b"\0" * len(good_bytes))  # header, then zeros: undecodable
    size, stamp = broken.stat().st_size, broken.stat().st_mtime_ns
    out = tmp_path / "out"
    first = extract(images, options(out, tiny_model_dir))
    assert first.processed == 1 and list(_failures(out)) == ["broken.png"]
    assert _failures(out)["broken.png"] not in RETRIED_EVERY_RUN  # a failure that waits for a change

    # Restored from a backup in place: same size, same mtime (PNG ignores bytes after IEND).
    assert len(good_bytes) <= size
    broken.write_bytes(good_bytes + b"\0" * (size - len(good_bytes)))
    os.utime(broken, ns=(stamp, stamp))
    again = extract(images, options(out, tiny_model_dir))
    assert again.processed == 0 and again.failed_this_run == 0  # unchanged stamp: not tried again
    retried = extract(images, options(out, tiny_model_dir, retry_failed=True))
    assert retried.processed == 1 and _failures(out) == {}
    assert set(FeatureCache(out).keys()) == {"good.png", "broken.png"}


def test_a_cache_refuses_a_second_folder_unless_told_it_is_the_same_images(tmp_path, tiny_model_dir):
    first, second = tmp_path / "a", tmp_path / "b"
    save_scene(first / "img.png", 128, 128, 1)
    save_scene(second / "img.png", 160, 96, 2)  # same key, other picture
    out = tmp_path / "out"
    extract(first, options(out, tiny_model_dir))
    before = FeatureCache(out)["img.png"]["patches"].clone()
    with pytest.raises(CacheError, match="was built from") as err:
        extract(second, options(out, tiny_model_dir))
    assert "--new-source" in err.value.hint
    assert torch.equal(FeatureCache(out)["img.png"]["patches"], before)  # nothing replaced

    shutil.move(first, tmp_path / "moved")  # the same images, moved: allowed when said so
    moved = extract(tmp_path / "moved", options(out, tiny_model_dir, new_source=True))
    assert moved.processed == 0 and verify_cache(out).ok


def test_nan_features_become_recorded_failures_not_cache_rows(tmp_path, tiny_model_dir):
    from transformers import DINOv3ViTModel

    broken_model = tmp_path / "nan-model"
    model = DINOv3ViTModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.norm.weight[3] = float("nan")  # a damaged checkpoint
    model.save_pretrained(broken_model)
    images = tmp_path / "images"
    save_scene(images / "a.png", 128, 128, 1)
    save_scene(images / "b.png", 160, 96, 2)
    out = tmp_path / "out"
    result = extract(images, options(out, broken_model))
    assert result.processed == 0 and result.failures_this_run == {"nonfinite": 2}
    assert _failures(out) == {"a.png": "nonfinite", "b.png": "nonfinite"}
    assert len(FeatureCache(out)) == 0 and [p.kind for p in verify_cache(out).problems] == ["empty"]  # intact, empty
    with pytest.raises(CacheError, match="holds no samples"):
        compute_statistics(out)


@pytest.mark.parametrize("std", [(0.0, 0.2, 0.2), (float("nan"), 0.2, 0.2), (-0.2, 0.2, 0.2)])
def test_an_unusable_std_is_refused_before_any_work(tiny_model_dir, std):
    with pytest.raises(ModelLoadError, match="cannot normalize"):
        resolve_model(str(tiny_model_dir), device="cpu", image_std=std)


def test_the_failure_budget_is_spent_on_headers_before_weights_load(tmp_path, tiny_model_dir, monkeypatch):
    import dinocache.extract as extract_module

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"junk{i}.jpg").write_bytes(b"not a jpeg at all" * 10)
    save_scene(images / "good.png", 128, 128, 1)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded although the run had already failed")

    monkeypatch.setattr(extract_module, "load_weights", no_weights)
    with pytest.raises(DinocacheError, match="over --max-failures") as err:
        extract(images, options(tmp_path / "out", tiny_model_dir, max_failures=1))
    assert "--failed" in err.value.hint
    # ...and the failures that stopped it are recorded, so the command the hint names lists them.
    keys = runner.invoke(app, ["keys", str(tmp_path / "out"), "--failed", "--json"])
    assert keys.exit_code == 0, keys.output
    listed = sorted(json.loads(line)["key"] for line in keys.stdout.splitlines())
    assert listed == [f"junk{i}.jpg" for i in range(3)]


def test_pointing_verify_at_the_wrong_files_says_what_they_are(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    save_scene(images / "a.png", 128, 128, 1)
    out = tmp_path / "out"
    extract(images, options(out, tiny_model_dir))
    samples = next((out / "index").glob("*.safetensors"))
    with pytest.raises(DinocacheError, match="sample table"):
        verify_paths([samples])
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(DinocacheError, match="did not write"):
        verify_paths([tmp_path / "weights.safetensors"])
    cli = runner.invoke(app, ["verify", str(tmp_path / "weights.safetensors")])
    assert cli.exit_code == 2 and "did not write" in cli.output


def test_an_unmerged_multi_rank_cache_points_at_merge(tmp_path):
    (tmp_path / "ranks").mkdir()
    with pytest.raises(CacheError) as err:
        read_manifest(tmp_path)
    assert "dinocache merge" in err.value.hint
    with pytest.raises(DinocacheError, match="process group"):
        verify_paths([tmp_path])


def test_norm_stats_export_to_a_missing_folder_is_a_clear_error(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    save_scene(images / "a.png", 128, 128, 1)
    out = tmp_path / "out"
    extract(images, options(out, tiny_model_dir))
    cli = runner.invoke(app, ["norm-stats", str(out), "--export", str(tmp_path / "nope" / "stat.pt")])
    assert cli.exit_code != 0 and "does not exist" in cli.output and "Traceback" not in cli.output
    ok = runner.invoke(app, ["norm-stats", str(out), "--export", str(tmp_path / "stat.pt")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "stat.pt").stat().st_mode & 0o044  # readable by the group, like the cache


def test_plan_checks_layers_against_the_model(tmp_path, tiny_model_dir):
    save_scene(tmp_path / "images" / "a.png", 128, 128, 1)
    (tmp_path / "b.yaml").write_text("buckets: [[128, 128]]\n")
    base = ["plan", str(tmp_path / "images"), "-b", str(tmp_path / "b.yaml"), "--model", str(tiny_model_dir)]
    bad = runner.invoke(app, [*base, "--layers", "3"])  # the tiny model has 2 blocks
    assert bad.exit_code == 2 and "blocks 1..2" in bad.output
    assert runner.invoke(app, [*base, "--layers", "2"]).exit_code == 0


def test_bucket_config_mistakes_name_the_file_and_what_is_wrong(tmp_path):
    folder = runner.invoke(app, ["plan", str(tmp_path), "-b", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder, not a file" in folder.output
    (tmp_path / "bad.yaml").write_text("buckets: [\n")
    broken = runner.invoke(app, ["plan", str(tmp_path), "-b", str(tmp_path / "bad.yaml")])
    assert broken.exit_code == 2 and 'in "' + str(tmp_path / "bad.yaml") + '"' in broken.output


def test_an_image_far_over_max_pixels_gets_our_message_not_pillows(tmp_path):
    from dinocache.errors import DecodeError
    from dinocache.imaging import decode_image

    path = save_scene(tmp_path / "big.png", 400, 400, 1)  # 160000 pixels: 8x the limit below
    with pytest.raises(DecodeError) as err:
        decode_image(str(path), max_pixels=20_000)
    assert err.value.reason == "too_large" and "--max-pixels" in err.value.detail


def test_an_unknown_flavour_is_a_usage_error(tmp_path, tiny_model_dir):
    save_scene(tmp_path / "images" / "a.png", 128, 128, 1)
    extract(tmp_path / "images", options(tmp_path / "out", tiny_model_dir))
    from dinocache.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown flavour") as err:
        FeatureCache(tmp_path / "out", flavour="layer8")
    assert "ln_noaffine" in err.value.hint


def test_crops_export_never_overwrites_without_being_asked(tmp_path, tiny_model_dir):
    save_scene(tmp_path / "images" / "a.png", 128, 128, 1)
    extract(tmp_path / "images", options(tmp_path / "out", tiny_model_dir))
    picture = tmp_path / "images" / "a.png"
    before = picture.read_bytes()
    slip = runner.invoke(app, ["crops", str(tmp_path / "out"), "-o", str(picture)])
    assert slip.exit_code == 2 and "already exists" in slip.output and picture.read_bytes() == before
    target = tmp_path / "crops.jsonl"
    assert runner.invoke(app, ["crops", str(tmp_path / "out"), "-o", str(target)]).exit_code == 0
    again = runner.invoke(app, ["crops", str(tmp_path / "out"), "-o", str(target), "--overwrite"])
    assert again.exit_code == 0 and target.read_text().count("\n") == 1


def test_verify_recompute_without_source_uses_the_recorded_folder(tmp_path, tiny_model_dir):
    save_scene(tmp_path / "images" / "a.png", 128, 128, 1)
    out = tmp_path / "out"
    extract(tmp_path / "images", options(out, tiny_model_dir))
    report = verify_paths([out], recompute=1, device="cpu")
    assert report.ok and report.recomputed == 1
    assert any(str(tmp_path / "images") in note for note in report.notes)
    shutil.rmtree(tmp_path / "images")  # gone: the old message again
    with pytest.raises(DinocacheError, match="pass --source"):
        verify_paths([out], recompute=1, device="cpu")


def test_keys_with_tabs_and_newlines_stay_one_line_each(tmp_path, tiny_model_dir):
    import json

    save_scene(tmp_path / "images" / "tab\there.png", 128, 128, 1)
    save_scene(tmp_path / "images" / "new\nline.png", 128, 128, 2)
    out = tmp_path / "out"
    extract(tmp_path / "images", options(out, tiny_model_dir))
    plain = runner.invoke(app, ["keys", str(out)])
    assert plain.output.splitlines() == ["new\\nline.png", "tab\\there.png"]
    as_json = runner.invoke(app, ["keys", str(out), "--json"])
    assert [json.loads(line) for line in as_json.output.splitlines()] == ["new\nline.png", "tab\there.png"]


def test_verifying_two_caches_names_the_damaged_one(tmp_path, tiny_model_dir):
    save_scene(tmp_path / "images" / "a.png", 128, 128, 1)
    for name in ("one", "two"):
        extract(tmp_path / "images", options(tmp_path / name, tiny_model_dir))
    shard = next((tmp_path / "two" / "shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    report = verify_paths([tmp_path / "one", tmp_path / "two"])
    assert [p.message.startswith(str(tmp_path / "two") + ": ") for p in report.problems] == [True]
    assert report.problems[0].path == f"{tmp_path / 'two'}/shards/{shard.name}"


def test_commands_that_need_a_local_cache_say_so_for_urls():
    stats = runner.invoke(app, ["norm-stats", "s3://bucket/cache"])
    assert stats.exit_code == 2 and "this machine's filesystem" in stats.output
    # `merge s3://...` works since issue 24: tests/test_object_storage.py


@pytest.mark.parametrize("limit, stops", [(0.08, False), (0.02, True)])
def test_a_fractional_failure_budget_weighs_header_failures_against_every_image(tmp_path, tiny_model_dir, limit, stops):
    """10 unreadable files among 250 is 4%: known from the headers before the first batch, they
    must not be judged against only the few images decoded so far (which read as 10%)."""
    import dataclasses

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(240):
        Image.new("RGB", (32, 32), (i, 255 - i, 7)).save(images / f"ok{i:03d}.png")
    for i in range(10):
        (images / f"junk{i}.jpg").write_bytes(b"not a jpeg" * 8)
    opts = dataclasses.replace(options(tmp_path / "out", tiny_model_dir), batch_size=30, max_failures=limit)
    if stops:
        with pytest.raises(DinocacheError, match="over --max-failures 0.02"):
            extract(images, opts)
        assert len(FeatureCache(tmp_path / "out")) > 0  # what was extracted before stopping is kept
    else:
        result = extract(images, opts)
        assert result.processed == 240 and result.failed_this_run == 10
