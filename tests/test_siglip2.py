"""SigLIP 2 through the model-family seam: fixed-resolution checkpoints (transformers'
SiglipModel, model type "siglip", whose vision tower RAE loads) and NaFlex (Siglip2VisionModel).

The references are plain transformers forwards on the same pixels, and RAE's own encoder lines,
re-implemented below from bytetriper/RAE@a4d18c4 src/stage1/encoders/siglip2.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import save_scene
from test_adm_crop import center_crop_arr
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.model import load_model

runner = CliRunner()
PIXELS = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))  # 4x6 patches of 16: not 4x4
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=16)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)


def _perturb(model, seed):
    """Non-trivial values where the identity init would hide a mistake (norms, biases, probe)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias") or "position" in name or "probe" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def tiny_siglip(seed: int = 0, image_size: int = 64):
    """A whole fixed-resolution SigLIP (text tower too), as google/siglip2-base-patch16-256 is."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(vision_config=VISION | {"image_size": image_size}, text_config=TEXT)
    return _perturb(SiglipModel(config), seed)


def tiny_naflex(seed: int = 0):
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(seed)
    return _perturb(Siglip2Model(Siglip2Config(vision_config=VISION | {"num_patches": 16}, text_config=TEXT)), seed)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-siglip")
    tiny_siglip().save_pretrained(path)
    return path


def plain_vision(path):
    """The vision tower as RAE loads it (siglip2.py:13): SiglipModel.from_pretrained(...).vision_model."""
    from transformers import SiglipModel

    return SiglipModel.from_pretrained(path).vision_model.eval()


def test_a_siglip_checkpoint_gives_transformers_features_and_the_pooled_head(siglip_dir):
    loaded = load_model(str(siglip_dir), device="cpu", dtype="float32")
    assert loaded.spec.family.name == "siglip2" and loaded.num_registers == 0 and loaded.patch_size == 16
    assert loaded.image_mean == (0.5, 0.5, 0.5)  # SigLIP's, not ImageNet's (no preprocessor_config.json here)
    got = loaded.forward_tokens(PIXELS, (1,))
    with torch.no_grad():
        ref = plain_vision(siglip_dir)(PIXELS, interpolate_pos_encoding=True, output_hidden_states=True)
    assert got.normed.shape == ref.last_hidden_state.shape == (2, 24, 64)  # every token a patch: no CLS
    assert (got.normed - ref.last_hidden_state).abs().max() < 1e-5
    assert (got.prenorm - ref.hidden_states[-1]).abs().max() < 1e-5
    assert (got.layers[1] - ref.hidden_states[1]).abs().max() < 1e-5
    # the MAP head sees the final norm's OUTPUT, as the model computes pooler_output
    assert (got.pooled - ref.pooler_output).abs().max() < 1e-5


def test_bf16_compute_stays_close_to_the_fp32_reference(siglip_dir):
    loaded = load_model(str(siglip_dir), device="cpu", dtype="bfloat16")
    got = loaded.forward_tokens(PIXELS)
    with torch.no_grad():
        ref = plain_vision(siglip_dir)(PIXELS, interpolate_pos_encoding=True)
    assert F.cosine_similarity(got.normed.float(), ref.last_hidden_state, dim=-1).min() >= 0.999
    assert F.cosine_similarity(got.pooled.float(), ref.pooler_output, dim=-1).min() >= 0.999


def rae_siglip2_encoder(path):
    """bytetriper/RAE@a4d18c4 src/stage1/encoders/siglip2.py:13-18: the vision tower with the
    final LayerNorm's affine removed."""
    model = plain_vision(path)
    model.post_layernorm.elementwise_affine = False
    model.post_layernorm.weight = None
    model.post_layernorm.bias = None
    return model


def rae_siglip2_z(path, image_path, size=256):
    """RAE's target for one image: center_crop_arr + ToTensor (src/calculate_stat.py:227-231),
    RAE.encode's resize to encoder_input_size (256: configs/stage1/pretrained/SigLIP2.yaml:6)
    and normalisation by the processor's mean/std (src/stage1/rae.py:38-40, 83-86), then
    siglip2.py:27-29."""
    from PIL import Image

    with open(image_path, "rb") as fh:
        x = torch.from_numpy(center_crop_arr(Image.open(fh).convert("RGB"), size)).permute(2, 0, 1)[None]
    x = x.float().div(255)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = (x - 0.5) / 0.5  # google/siglip2-*: preprocessor_config.json image_mean = image_std = 0.5
    with torch.no_grad():
        out = rae_siglip2_encoder(path)(x, output_hidden_states=True, interpolate_pos_encoding=True)
    return out.last_hidden_state[0]


def extract(images, out, model, *extra):
    config = images.parent / "b.yaml"
    config.write_text("buckets: [[256, 256]]\n")
    args = ["extract", str(images), "-b", str(config), "--model", str(model), "-o", str(out), *extra]
    return runner.invoke(app, [*args, "--dtype", "float32", "--storage-dtype", "float32", "--workers", "0"])


def test_the_rae_siglip2_preset_gives_raes_targets_as_ln_noaffine(tmp_path, siglip_dir):
    images = tmp_path / "imgs"
    for i, size in enumerate([(640, 480), (300, 420)]):
        save_scene(images / f"{i}.png", *size, seed=i)
    result = extract(images, tmp_path / "cache", siglip_dir, "--preset", "rae-siglip2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["model"]["family"] == "siglip2" and manifest["storage"]["summary"] == "pooled"
    assert manifest["buckets"][0]["grid"] == [16, 16] and manifest["preprocessing"]["preset"] == "rae-siglip2"
    cache = FeatureCache(tmp_path / "cache", flavour="ln_noaffine")
    item = cache["0.png"]
    assert set(item) >= {"pooled", "patches"} and "cls" not in item
    expected = rae_siglip2_z(siglip_dir, images / "0.png")  # [256, 64]
    assert (item["patches"].reshape(-1, 64) - expected).abs().max() < 1e-4
    # the pooled feature is the head's output, the same in every flavour (it is not a normed token)
    assert torch.equal(FeatureCache(tmp_path / "cache")["0.png"]["pooled"], item["pooled"])


def test_plan_show_stats_work_and_another_family_is_refused(tmp_path, siglip_dir, tiny_model_dir):
    images = tmp_path / "imgs"
    save_scene(images / "a.png", 300, 300, seed=1)
    config = tmp_path / "b.yaml"
    config.write_text("buckets: [[256, 256]]\n")
    plan = runner.invoke(app, ["plan", str(images), "-b", str(config), "--model", str(siglip_dir), "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["buckets"][0]["grid"] == "16x16"
    by_name = runner.invoke(
        app, ["plan", str(images), "-b", str(config), "--model", "google/siglip2-so400m-patch14-224"]
    )
    assert by_name.exit_code == 0 and "224x224" in by_name.output  # a /14 encoder sees the DiT's grid
    out = tmp_path / "cache"
    assert extract(images, out, siglip_dir).exit_code == 0
    shown = runner.invoke(app, ["show", str(out), "a.png", "-o", str(tmp_path / "a-show.png")])
    assert shown.exit_code == 0, shown.output
    stats = runner.invoke(app, ["stats", str(out)])
    assert stats.exit_code == 0 and "16x16" in stats.output, stats.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    norm = runner.invoke(app, ["norm-stats", str(out), "--flavour", "ln_noaffine", "--no-progress"])
    assert norm.exit_code == 0, norm.output
    assert FeatureCache(out, flavour="ln_noaffine", normalize=True)["a.png"]["patches"].shape == (16, 16, 64)
    other = extract(images, out, tiny_model_dir)
    assert other.exit_code == 2 and "family" in other.output, other.output
    wrong = extract(images, tmp_path / "c2", siglip_dir, "--preset", "rae")
    assert wrong.exit_code == 2 and "--preset rae-siglip2" in wrong.output


def test_random_siglip2_architectures_have_the_released_shapes():
    from dinocache.model import random_config

    expected = {"vitb16_256": (768, 12, 16, 256), "so400m14_224": (1152, 27, 14, 224), "g16_384": (1536, 40, 16, 384)}
    for arch, (dim, depth, patch, size) in expected.items():
        c = random_config(f"siglip2_{arch}")
        assert (c.hidden_size, c.num_hidden_layers, c.patch_size, c.image_size) == (dim, depth, patch, size)
        assert c.model_type == "siglip_vision_model"


@pytest.fixture(scope="module")
def naflex_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-naflex")
    tiny_naflex().save_pretrained(path)
    return path


def convert_image_to_patches(image, patch_size):
    """transformers 5.24 models/siglip2/image_processing_siglip2.py:90-101 (that module needs
    torchvision to import)."""
    num_channels, image_height, image_width = image.shape
    num_patches_height = image_height // patch_size
    num_patches_width = image_width // patch_size
    patched_image = image.reshape(num_channels, num_patches_height, patch_size, num_patches_width, patch_size)
    patched_image = patched_image.permute(1, 3, 2, 4, 0)
    return patched_image.reshape(num_patches_height * num_patches_width, -1)


def naflex_reference(path, pixels):
    """Plain transformers on what Siglip2ImageProcessor hands the model: each image patchified by
    its own convert_image_to_patches, its spatial shape, and a full mask (no padding: a bucket's
    images all have one shape)."""
    from transformers import Siglip2Model

    patches = torch.stack([convert_image_to_patches(image, 16) for image in pixels])
    rows, cols = pixels.shape[-2] // 16, pixels.shape[-1] // 16
    shapes = torch.tensor([[rows, cols]] * len(pixels))
    mask = torch.ones(len(pixels), rows * cols, dtype=torch.long)
    model = Siglip2Model.from_pretrained(path).vision_model.eval()
    with torch.no_grad():
        return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True)


def test_a_naflex_checkpoint_gives_transformers_features(naflex_dir):
    loaded = load_model(str(naflex_dir), device="cpu", dtype="float32")
    assert loaded.spec.family.name == "siglip2" and loaded.spec.config.model_type == "siglip2_vision_model"
    got = loaded.forward_tokens(PIXELS, (2,))
    ref = naflex_reference(naflex_dir, PIXELS)
    assert got.normed.shape == ref.last_hidden_state.shape == (2, 24, 64)  # 4x6 patches from 16 positions
    assert (got.normed - ref.last_hidden_state).abs().max() < 1e-5
    assert (got.prenorm - ref.hidden_states[-1]).abs().max() < 1e-5
    assert (got.layers[2] - ref.hidden_states[2]).abs().max() < 1e-5
    assert (got.pooled - ref.pooler_output).abs().max() < 1e-5
    # one shape per batch, no padding: an image's features do not depend on its batch
    alone = loaded.forward_tokens(PIXELS[1:])
    assert (alone.normed[0] - got.normed[1]).abs().max() < 1e-5 and (alone.pooled[0] - got.pooled[1]).abs().max() < 1e-5
    bf16 = load_model(str(naflex_dir), device="cpu", dtype="bfloat16").forward_tokens(PIXELS)
    assert F.cosine_similarity(bf16.normed.float(), ref.last_hidden_state, dim=-1).min() >= 0.999
    assert F.cosine_similarity(bf16.pooled.float(), ref.pooler_output, dim=-1).min() >= 0.999


def test_a_naflex_cache_extracts_and_reads(tmp_path, naflex_dir):
    images = tmp_path / "imgs"
    save_scene(images / "a.png", 400, 300, seed=2)
    config = tmp_path / "b.yaml"
    config.write_text("buckets: [[256, 192]]\n")
    plan = runner.invoke(app, ["plan", str(images), "-b", str(config), "--model", "google/siglip2-base-patch16-naflex"])
    assert plan.exit_code == 0 and "256x192" in plan.output, plan.output
    args = ["extract", str(images), "-b", str(config), "--model", str(naflex_dir), "-o", str(tmp_path / "c")]
    assert runner.invoke(app, [*args, "--workers", "0", "--layers", "1"]).exit_code == 0
    cache = FeatureCache(tmp_path / "c")
    item = cache["a.png"]
    assert item["patches"].shape == (12, 16, 64) and item["pooled"].shape == (64,)
    assert "layer1_patches" in item and "layer1_cls" not in item
    assert cache.manifest["model"]["config"]["num_patches"] == 16


def test_a_manifest_naming_another_single_token_feature_is_refused(tmp_path, siglip_dir):
    from dinocache.layout import Layout, storage_problems

    assert Layout.from_record(Layout(summary="pooled").record()).summary == "pooled"
    assert "summary" not in Layout().record()  # a CLS cache's storage section is what it was
    images = tmp_path / "imgs"
    save_scene(images / "a.png", 300, 300, seed=1)
    out = tmp_path / "cache"
    assert extract(images, out, siglip_dir).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["storage"]["summary"] = "cls_token\x1b[31m"
    assert storage_problems(manifest["storage"]) == ["storage.summary must be one of cls, pooled"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["stats", str(out)])
    assert result.exit_code == 2 and "storage.summary" in result.output and "\x1b" not in result.output


def test_an_interpolation_the_family_does_not_offer_is_refused(siglip_dir):
    from dinocache.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="offers: none"):  # what verify --recompute meets in a tampered manifest
        load_model(str(siglip_dir), device="cpu", dtype="float32", pos_embed_interpolation="size, antialias\x1b")
