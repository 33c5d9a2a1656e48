"""What a third newcomer trial found: a rerun that forgets --model, a copied image folder, an
--out among the pictures, model paths that do not exist, and the small outputs of crops, show
and keys."""

import json
import logging
import os
import shutil

import pytest
from conftest import save_scene
from test_crash import BUCKETS, options
from typer.testing import CliRunner

from dinocache.cli import app
from dinocache.errors import ModelLoadError
from dinocache.extract import extract
from dinocache.model import resolve_model
from dinocache.sources import open_source
from dinocache.verify import verify_cache

runner = CliRunner()


@pytest.fixture()
def cache(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    save_scene(images / "a.png", 128, 128, 1)
    save_scene(images / "b.png", 160, 96, 2)
    out = tmp_path / "out"
    assert extract(images, options(out, tiny_model_dir)).processed == 2
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    return images, out


def test_a_rerun_that_forgets_model_hears_about_the_cache_not_the_hub(cache, tmp_path, tiny_model_dir, monkeypatch):
    import dinocache.model as model_module

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up the default model although the cache holds another")

    monkeypatch.setattr(model_module, "hub_reachable", no_hub)
    images, out = cache
    cli = runner.invoke(app, ["extract", str(images), "-b", str(tmp_path / "b.yaml"), "-o", str(out), "--no-progress"])
    assert cli.exit_code == 2 and "Traceback" not in cli.output
    assert "was built with --model" in cli.stderr and "(the default --model)" in cli.stderr
    assert f"pass --model {tiny_model_dir} to add to it" in " ".join(cli.stderr.split())


def test_a_model_path_that_does_not_exist_is_named_without_asking_the_hub(monkeypatch):
    import dinocache.model as model_module

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the Hub about a local path")

    monkeypatch.setattr(model_module, "hub_reachable", no_hub)
    for spec in ("./no_such_checkpoint", "/no/such/checkpoint", "../nope/model.pth"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            resolve_model(spec, device="cpu")


def test_a_copied_folder_keeps_its_features(cache, tmp_path, tiny_model_dir):
    """cp -r gives every file a new mtime: same content, so verify finds nothing changed and
    extract from the copy recomputes nothing."""
    images, out = cache
    copy = tmp_path / "copy"
    shutil.copytree(images, copy, copy_function=shutil.copyfile)  # new mtimes
    for path in copy.iterdir():
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    report = verify_cache(out, source=copy)
    assert report.ok, report.problems
    assert any("same content" in note for note in report.notes)
    again = extract(copy, options(out, tiny_model_dir, new_source=True))
    assert (again.processed, again.skipped) == (0, 2)
    assert verify_cache(out, source=copy).notes == []  # the new stamps are recorded
    save_scene(copy / "a.png", 128, 128, 9)  # really changed
    changed = verify_cache(out, source=copy)
    assert [p.key for p in changed.problems] == ["a.png"]


def test_an_out_folder_among_the_pictures_is_named(tmp_path, caplog):
    images = tmp_path / "images"
    save_scene(images / "a.png", 128, 128, 1)
    save_scene(images / "sub" / "b.png", 128, 128, 2)
    with caplog.at_level(logging.WARNING, logger="dinocache"):
        keys = [s.key for s in open_source(str(images), exclude=[images / "sub"]).scan()]
    assert keys == ["a.png"]
    assert "1 image(s) under" in caplog.text and "output folder" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinocache"):
        open_source(str(images), exclude=[tmp_path / "elsewhere"]).scan()
    assert caplog.text == ""


def test_plan_says_how_much_is_cached_already(cache, tmp_path, tiny_model_dir):
    images, out = cache
    save_scene(images / "c.png", 128, 128, 3)
    plan = ["plan", str(images), "-o", str(out), "--storage-dtype", "float32", "-m", str(tiny_model_dir)]
    cli = runner.invoke(app, [*plan, "-b", str(tmp_path / "b.yaml")])
    assert cli.exit_code == 0, cli.output
    assert "cached        2 of the 3 already in the cache" in cli.stdout
    (tmp_path / "other.yaml").write_text(json.dumps({"buckets": [[128, 128]]}))
    other = runner.invoke(app, [*plan, "-b", str(tmp_path / "other.yaml")])
    assert other.exit_code == 0 and "cached  " not in other.stdout
    assert "built with other settings" in other.stdout and "buckets" in other.stdout
    default_model = runner.invoke(app, [*plan[:-2], "-b", str(tmp_path / "b.yaml")])
    assert default_model.exit_code == 0 and "cached  " not in default_model.stdout
    assert "built with other settings (model: cache has" in default_model.stdout


def test_crops_to_standard_output(cache):
    _, out = cache
    cli = runner.invoke(app, ["crops", str(out), "-o", "-"])
    assert cli.exit_code == 0, cli.output
    assert [json.loads(line)["key"] for line in cli.stdout.splitlines()] == ["a.png", "b.png"]
    assert not os.path.exists("-")


def test_show_refuses_a_name_without_a_picture_extension_before_rendering(cache, tmp_path):
    _, out = cache
    cli = runner.invoke(app, ["show", str(out), "a.png", "-o", str(tmp_path / "noext")])
    assert cli.exit_code == 2 and "not a picture format" in cli.stderr and "Traceback" not in cli.output
    assert not (tmp_path / "noext").exists()


def test_keys_says_when_there_is_nothing_to_list(cache):
    _, out = cache
    cli = runner.invoke(app, ["keys", str(out), "--failed"])
    assert cli.exit_code == 0 and cli.stdout == "" and "no failed images recorded" in cli.stderr
    cli = runner.invoke(app, ["keys", str(out), "--match", "zzz*"])
    assert cli.exit_code == 0 and cli.stdout == "" and "no cached keys match 'zzz*'" in cli.stderr
