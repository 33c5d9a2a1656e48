"""The trainer's crops in (`extract --crops`) and out (`dinocache crops`) (issue 12)."""

import json

import pytest
import torch
from conftest import NUM_REGISTERS, reference_forward, save_scene, token_cosine
from test_extract import reference_pixels
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app

runner = CliRunner()


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    save_scene(root / "a.png", 300, 200, seed=1)
    save_scene(root / "b.png", 200, 300, seed=2)
    save_scene(root / "sub" / "c.jpg", 257, 129, seed=3, quality=95)
    save_scene(root / "d.png", 120, 120, seed=4)  # not listed: follows the bucket rule
    return root


ODD = [  # off-centre, non-square, 1-pixel margins
    {"key": "a.png", "size": [96, 64], "box": [1, 1, 299, 199]},
    {"key": "b.png", "size": [64, 96], "box": [37, 11, 190, 251]},
    {"key": "sub/c.jpg", "size": [80, 48], "box": [0, 5, 256, 128]},
]


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def extract(images, out, model_dir, *extra):
    result = runner.invoke(
        app,
        [
            "extract",
            str(images),
            "-o",
            str(out),
            "-m",
            str(model_dir),
            "--workers",
            "0",
            "--no-progress",
            "--dtype",
            "float32",
            *map(str, extra),
        ],
    )
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_odd_boxes_match_an_independent_crop_and_forward(images, tmp_path, tiny_model_dir, caplog):
    crops = write(tmp_path / "crops.jsonl", ODD)
    code, output = extract(images, tmp_path / "out", tiny_model_dir, "--crops", crops)
    assert code == 0, output
    unlisted = [r.getMessage() for r in caplog.records if "not in" in r.getMessage()]
    assert len(unlisted) == 1 and "1 of 4 image(s)" in unlisted[0] and "'d.png'" in unlisted[0]  # said, not silent
    cache = FeatureCache(tmp_path / "out")
    assert [b["name"] for b in cache.manifest["buckets"]] == ["64x96", "96x64", "80x48"]  # by aspect
    for crop in ODD:
        record = cache.record(crop["key"])
        assert record["box"] == crop["box"] and record["placement"] == 1
        bucket = cache.manifest["buckets"][record["bucket"]]
        assert [bucket["width"], bucket["height"]] == crop["size"]
        pixels = reference_pixels(images / crop["key"], crop["box"], crop["size"])  # cropped + resized here
        reference = reference_forward(tiny_model_dir, pixels[None])[0]
        got = cache[crop["key"]]["patches"].reshape(-1, 64)
        assert token_cosine(got, reference[1 + NUM_REGISTERS :]).min() >= 0.999, crop["key"]
    assert cache.record("d.png")["placement"] == 0  # unlisted: the rule, among the file's sizes


def test_export_then_import_reproduces_the_features_bit_for_bit(images, tmp_path, tiny_model_dir, caplog):
    code, output = extract(
        images,
        tmp_path / "first",
        tiny_model_dir,
        "--buckets",
        write(tmp_path / "b.yaml", ['{"buckets": [[96, 64], [64, 96], [80, 48]], "resize": "crop"}']),
        "--storage-dtype",
        "float32",
    )
    assert code == 0, output
    exported = tmp_path / "exported.jsonl"
    result = runner.invoke(app, ["crops", str(tmp_path / "first"), "-o", str(exported)])
    assert result.exit_code == 0 and "wrote 4 crop(s)" in result.output
    code, output = extract(
        images, tmp_path / "second", tiny_model_dir, "--crops", exported, "--storage-dtype", "float32"
    )
    assert code == 0, output
    assert not any("image(s) are not in" in r.getMessage() for r in caplog.records)  # every image listed
    first, second = FeatureCache(tmp_path / "first"), FeatureCache(tmp_path / "second")
    assert first.keys() == second.keys()
    for key in first.keys():
        assert first.record(key)["box"] == second.record(key)["box"]
        assert torch.equal(first[key]["patches"], second[key]["patches"]), key
        assert torch.equal(first[key]["cls"], second[key]["cls"]), key


@pytest.mark.parametrize(
    "line, words",
    [
        ({"key": "a.png", "size": [100, 64], "box": [0, 0, 300, 200]}, ["line 2", "not a bucket"]),
        ({"key": "b.png", "size": [96, 64], "box": [0, 0, 10, 10]}, ["line 2", "listed twice", "line 1"]),
        ({"key": "nope.png", "size": [96, 64], "box": [0, 0, 10, 10]}, ["line 2", "no image 'nope.png'"]),
        ({"key": "../a.png", "size": [96, 64], "box": [0, 0, 10, 10]}, ["line 2", "not a path relative"]),
        ({"key": "a.png", "size": [96, 64], "box": [5, 0, 5, 10]}, ["line 2", "left < right"]),
        ("{not json", ["line 2", "not valid JSON"]),
        ("[" * 100_000 + "]" * 100_000, ["line 2", "nested too deeply"]),
    ],
)
def test_a_bad_crops_line_is_named_before_anything_runs(images, tmp_path, tiny_model_dir, line, words):
    first = {"key": "b.png", "size": [64, 96], "box": [0, 0, 200, 300]}
    crops = write(tmp_path / "crops.jsonl", [first, line])
    config = write(tmp_path / "b.yaml", ['{"buckets": [[96, 64], [64, 96]]}'])
    code, output = extract(images, tmp_path / "out", tiny_model_dir, "--crops", crops, "--buckets", config)
    assert code == 2 and "Traceback" not in output, output
    for word in words:
        assert word in output, output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_changing_a_key_crop_recomputes_that_key_only(images, tmp_path, tiny_model_dir):
    crops = write(tmp_path / "crops.jsonl", ODD)
    assert extract(images, tmp_path / "out", tiny_model_dir, "--crops", crops)[0] == 0
    before = FeatureCache(tmp_path / "out")["b.png"]["patches"].clone()
    changed = [dict(c) for c in ODD]
    changed[1]["box"] = [30, 11, 183, 251]
    write(crops, changed)
    code, output = extract(images, tmp_path / "out", tiny_model_dir, "--crops", crops)
    assert code == 0 and "1 extracted" in output and "3 already cached" in output, output
    cache = FeatureCache(tmp_path / "out")
    assert cache.record("b.png")["box"] == [30, 11, 183, 251]
    assert not torch.equal(cache["b.png"]["patches"], before)
    write(crops, [c for c in changed if c["key"] != "a.png"])  # a.png is no longer listed: back to the rule
    code, output = extract(
        images,
        tmp_path / "out",
        tiny_model_dir,
        "--crops",
        crops,
        "--buckets",
        write(tmp_path / "b.yaml", ['{"buckets": [[64, 96], [96, 64], [80, 48]]}']),
    )
    assert code == 0 and "1 extracted" in output, output
    assert FeatureCache(tmp_path / "out").record("a.png")["placement"] == 0


def test_a_json_array_of_crops_is_named_as_such(tmp_path):
    """From a newcomer trial: `[{...}]` was called a line without the right fields."""
    from dinocache.crops import read_crops_file
    from dinocache.errors import ConfigError

    path = tmp_path / "crops.jsonl"
    path.write_text('[{"key": "a.png", "size": [64, 64], "box": [0, 0, 64, 64]}]\n')
    with pytest.raises(ConfigError, match="JSON array"):
        read_crops_file(path)
