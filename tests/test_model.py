"""Model loading: the paths a user takes, and the errors they get."""

import pytest
import torch

from dinocache.errors import ModelLoadError
from dinocache.model import ARCHITECTURES, load_model, random_config, resolve_dtype, split_tokens


def test_local_checkpoint_loads_in_eval_mode(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert not loaded.model.training  # RoPE jitter is off
    assert (loaded.num_registers, loaded.hidden_size, loaded.patch_size) == (4, 64, 16)
    out = loaded.forward(torch.zeros(2, 3, 32, 48))
    assert out.shape == (2, 1 + 4 + 2 * 3, 64)


def test_split_tokens_order_and_count_check():
    hidden = torch.arange(1 + 4 + 6).float().view(1, -1, 1)
    cls, registers, patches = split_tokens(hidden, 4, (2, 3))
    assert cls.flatten().tolist() == [0.0]
    assert registers.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert patches.flatten().tolist() == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    with pytest.raises(RuntimeError, match="expected 1 CLS"):
        split_tokens(hidden, 4, (2, 2))


def test_random_architectures_have_the_released_shapes():
    assert ARCHITECTURES["vitl16"]["hidden_size"] == 1024 and ARCHITECTURES["vitl16"]["num_hidden_layers"] == 24
    assert ARCHITECTURES["vith16plus"]["num_attention_heads"] == 20
    assert ARCHITECTURES["vit7b16"]["num_hidden_layers"] == 40 and ARCHITECTURES["vit7b16"]["num_attention_heads"] == 32
    config = random_config("vits16")
    assert config.num_register_tokens == 4 and config.patch_size == 16


def test_random_model_warns_loudly(caplog):
    loaded = load_model("random:vits16", device="cpu", dtype="float32")
    assert loaded.hidden_size == 384
    assert "RANDOM weights" in caplog.text


def test_missing_model_says_how_to_fix(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "nothing"), device="cpu")
    assert "does not exist" in str(info.value) and "save_pretrained" in str(info.value)


def test_a_checkpoint_of_no_known_family_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="is a 'vit' model; dinocache loads dinov3_vit, dinov2"):
        load_model(str(tmp_path), device="cpu")


def test_folder_without_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_model(str(tmp_path), device="cpu")


def test_dtype_choice(caplog):
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert "float16 is reported to overflow" in caplog.text  # a log line, not a Python warning's source line
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int4", torch.device("cpu"))


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model("random:vits16", device="cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_loading_gives_the_ordinary_path_features(tiny_model_dir, dtype):
    """Weights are loaded straight in the compute dtype (no float32 copy first): the features
    equal the ordinary path's (load in float32, then cast) bit for bit."""
    from transformers import DINOv3ViTModel

    lean = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in lean.model.parameters())
    ordinary = DINOv3ViTModel.from_pretrained(tiny_model_dir).to(getattr(torch, dtype)).eval()
    pixels = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = ordinary(pixel_values=pixels.to(getattr(torch, dtype))).last_hidden_state
    assert torch.equal(lean.forward(pixels), expected)


def test_random_models_are_built_in_their_compute_dtype_and_recorded_as_such():
    loaded = load_model("random:vits16", device="cpu", dtype="bfloat16", seed=3)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.spec.record()["random_init"] == {"seed": 3, "device": "cpu"}
    again = load_model("random:vits16", device="cpu", dtype="bfloat16", seed=3)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.forward(x), again.forward(x))  # the seed decides


def test_model_paths_a_user_gets_wrong_are_named(tmp_path, tiny_model_dir):
    """From a newcomer trial: the config.json inside a checkpoint folder (a pickle-loading
    traceback before), and a .pth that is not there (a Hub round trip before)."""
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tiny_model_dir / "config.json"), device="cpu")
    assert "is a file" in str(info.value) and str(tiny_model_dir) in info.value.hint
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("missing_dinov2_vitb14_pretrain.pth", device="cpu")
