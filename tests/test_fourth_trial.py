"""What a fourth newcomer trial found: messages that named the wrong problem (a typo'd model on
an existing cache, --rank alone, a file given as the folder, torch's unsafe advice for a bad
.pth, a Python dict in the lock message) and a forced attention backend that cannot run here."""

import json
import os
import pickle
import socket

import pytest
from conftest import save_scene
from test_crash import BUCKETS, options
from typer.testing import CliRunner

from dinocache.cli import app
from dinocache.errors import CacheError, ModelLoadError
from dinocache.extract import extract
from dinocache.lock import CacheLock
from dinocache.official import load_official_state_dict

runner = CliRunner()


@pytest.fixture()
def cache(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    save_scene(images / "a.png", 128, 128, 1)
    out = tmp_path / "out"
    assert extract(images, options(out, tiny_model_dir)).processed == 1
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    return images, out


def invoke(*args):
    result = runner.invoke(app, [*map(str, args), "--no-progress"])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_a_typo_in_model_is_named_as_a_typo_even_on_an_existing_cache(cache, tmp_path):
    images, out = cache
    code, output = invoke("extract", images, "-b", tmp_path / "b.yaml", "-o", out, "-m", "random:vitz99")
    assert code == 2 and "unknown architecture 'vitz99'" in output and "was built with" not in output
    code, output = invoke("extract", images, "-b", tmp_path / "b.yaml", "-o", out, "-m", "./no-such-model")
    assert code == 2 and "does not exist" in output and "was built with" not in output


def test_rank_without_world_size_says_which_is_missing(cache, tmp_path):
    images, out = cache
    code, output = invoke("extract", images, "-b", tmp_path / "b.yaml", "-o", out, "--rank", "1")
    assert code == 2 and "--rank needs --world-size too" in output and "None" not in output


def test_a_file_given_as_the_image_folder_is_called_a_file(tmp_path):
    picture = save_scene(tmp_path / "one.png", 64, 64)
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    code, output = invoke("extract", picture, "-b", tmp_path / "b.yaml", "-o", tmp_path / "out")
    assert code == 2 and "is a file, not a folder" in output and "Traceback" not in output


def test_a_pth_with_python_objects_is_refused_without_torchs_unsafe_advice(tmp_path):
    bad = tmp_path / "fake.pth"
    with open(bad, "wb") as f:
        pickle.dump({"cls_token": complex(1, 2)}, f)
    with pytest.raises(ModelLoadError) as info:
        load_official_state_dict(bad)
    message = str(info.value)
    assert "never unpickles" in message and "weights_only" not in message
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        load_official_state_dict(tmp_path / "text.pth")


def test_the_lock_message_names_pid_and_host(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(CacheError) as info:
        with CacheLock(tmp_path):
            pass
    assert f"(pid {os.getpid()} on {socket.gethostname()})" in str(info.value) and "{" not in str(info.value)
    for junk in ("[1, 2]", '{"host": "elsewhere", "pid": "x"}'):  # hand-written: an error, not a traceback
        (tmp_path / ".lock").write_text(junk)
        with pytest.raises(CacheError, match="another dinocache process"):
            with CacheLock(tmp_path):
                pass


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_a_forced_attention_backend_that_cannot_run_here_is_refused_before_any_batch(tmp_path, backend):
    if os.environ.get("TORCH_DEVICE", "cpu") != "cpu":
        pytest.skip("on a GPU these backends can run")
    images = tmp_path / "images"
    save_scene(images / "a.png", 64, 64)
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    out = tmp_path / "out"
    code, output = invoke(
        "extract", images, "-b", tmp_path / "b.yaml", "-o", out, "-m", "random:vits16", "--sdpa-backend", backend
    )
    assert code == 2 and f"the attention backend {backend!r} cannot run on cpu" in output
    assert "Traceback" not in output and "drop --sdpa-backend" in output
