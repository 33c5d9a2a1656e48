import pytest

from dinocache.config import load_bucket_config, parse_bucket_config
from dinocache.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "buckets.yaml"
    path.write_text(text)
    return path


def test_explicit_list_is_width_first(tmp_path):
    cfg = load_bucket_config(write(tmp_path, "buckets: [[832, 1216], [1216, 832]]\nresize: crop\nbatch_size: 4\n"))
    assert cfg.sizes == [(832, 1216), (1216, 832)]
    assert cfg.resize == "crop" and cfg.batch_size == 4


def test_generated_form(tmp_path):
    cfg = load_bucket_config(write(tmp_path, "generate: {resolution: 512, step: 64, min_side: 256, max_side: 1024}\n"))
    assert (512, 512) in cfg.sizes and all(w * h <= 512 * 512 for w, h in cfg.sizes)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", ["empty"]),
        ("- [1, 2]", ["mapping"]),
        ("buckets: []", ["non-empty"]),
        ("buckets: [[0, 512]]", ["buckets[0] width", "positive"]),
        ("buckets: [[512, -8]]", ["buckets[0] height", "positive"]),
        ("buckets: [[512, 512], [512, 512]]", ["buckets[1]", "duplicates buckets[0]"]),
        ("buckets: [[512, 512]]\nbucket_size: 3", ["unknown key", "bucket_size"]),
        ("buckets: [['512', 512]]", ["buckets[0] width", "whole number"]),
        ("buckets: [[512.5, 512]]", ["whole number"]),
        ("buckets: [[512, 512, 3]]", ["[width, height] pair"]),
        ("buckets: 1024", ["non-empty list"]),
        ("buckets: [[512, 512]]\nresize: zoom", ["resize", "stretch"]),
        ("buckets: [[512, 512]]\nbatch_size: 0", ["batch_size", "positive"]),
        ("generate: {step: 64}", ["generate.resolution is missing"]),
        ("generate: {resolution: 1024, step: 7}", ["generate.step must be a multiple of 8"]),
        ("generate: {resolution: 1024, aspect: 2}", ["unknown key", "aspect"]),
        ("generate: {resolution: 1024, max_aspect: 0.5}", ["max_aspect"]),
        ("buckets: [[512, 512]]\ngenerate: {resolution: 512}", ["exactly one"]),
        ("buckets: [[1, 2]", ["not valid YAML"]),
    ],
)
def test_bad_configs_name_the_field_and_the_fix(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_bucket_config(write(tmp_path, text))
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert "fix:" in message or info.value.hint


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_bucket_config(tmp_path / "nope.yaml")


def test_parse_rejects_booleans_as_sizes():
    with pytest.raises(ConfigError, match="whole number"):
        parse_bucket_config({"buckets": [[True, 512]]})


def test_max_failures_parsing():
    from dinocache.config import parse_max_failures

    assert parse_max_failures(None) is None
    assert parse_max_failures("100") == 100
    assert parse_max_failures("0.05") == 0.05
    assert parse_max_failures("5%") == 0.05
    for bad in ("lots", "1.5", "-3"):
        with pytest.raises(ConfigError, match="max-failures"):
            parse_max_failures(bad)
