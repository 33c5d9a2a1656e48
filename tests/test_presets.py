"""--preset repa / rae give the pixels each recipe's own code feeds its encoder, and a patch-14
encoder sees the DiT's token grid (256 px -> 224 px, 16x16 patches).

The recipes' lines are re-implemented below from their source, cited per function; the crop is
guided-diffusion's center_crop_arr (tests/test_adm_crop.py)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import save_scene
from test_adm_crop import center_crop_arr
from test_dinov2 import official_forward, tiny_dinov2
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.imaging import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, model_input
from dinocache.presets import PRESETS

runner = CliRunner()
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def adm_uint8(path, size=256) -> torch.Tensor:
    from PIL import Image

    with open(path, "rb") as fh:
        return torch.from_numpy(center_crop_arr(Image.open(fh).convert("RGB"), size)).permute(2, 0, 1)[None]


def repa_pixels(path) -> torch.Tensor:
    """sihyun-yu/REPA@67f7145 train.py:39-59, preprocess_raw_image's dinov2 branch, on the raw
    256x256 uint8 image its dataset returns (dataset.py:59-75)."""
    x = adm_uint8(path)
    resolution = x.shape[-1]
    x = x / 255.0
    x = (x - MEAN) / STD  # torchvision Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    return x[0]


def rae_pixels(path) -> torch.Tensor:
    """bytetriper/RAE@a4d18c4: center_crop_arr + ToTensor (src/calculate_stat.py:227-231), then
    RAE.encode's resize and normalisation (src/stage1/rae.py:83-86)."""
    x = adm_uint8(path).float().div(255)  # ToTensor
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    return ((x - MEAN) / STD)[0]


def rae_siglip2_pixels(path) -> torch.Tensor:
    """bytetriper/RAE@a4d18c4 with configs/stage1/pretrained/SigLIP2.yaml: encoder_input_size 256,
    so RAE.encode skips the resize of a 256 crop (src/stage1/rae.py:83-85), and normalises by
    google/siglip2-base-patch16-256's processor mean/std, 0.5 (rae.py:38-40, 86)."""
    x = adm_uint8(path).float().div(255)  # ToTensor
    return ((x - 0.5) / 0.5)[0]


def vavae_pixels(path) -> torch.Tensor:
    """hustvl/LightningDiT@2725fed VA-VAE: the dataset's image / 127.5 - 1 in numpy
    (taming-transformers@3ba01b2 taming/data/base.py:49-51, ImagePaths; its crop is a random one
    and stands here as ADM's centre crop, as the preset does), then aux_foundation_model's
    forward_dinov2 resize (vavae/ldm/models/foundation_models.py:54-56)."""
    image = adm_uint8(path)[0].permute(1, 2, 0).numpy()  # HWC uint8, as np.array(image) is
    image = (image / 127.5 - 1.0).astype(np.float32)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]  # AutoencoderKL.get_input (autoencoder.py:371-376)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    return x[0]


RECIPES = {
    "repa": (repa_pixels, 224),
    "rae": (rae_pixels, 224),
    "rae-siglip2": (rae_siglip2_pixels, 256),
    "vavae": (vavae_pixels, 224),
}
SIZES = [(640, 480), (300, 420), (1100, 700)]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("size", SIZES)
def test_preset_pixels_equal_the_recipes(tmp_path, name, size):
    path = save_scene(tmp_path / "img.png", *size, seed=sum(size))
    p = PRESETS[name]
    prep = Preprocessing(
        p.image_mean,
        p.image_std,
        p.resize,
        resample=p.resample,
        antialias=p.antialias,
        normalize_first=p.normalize_first,
        preset=name,
        token_pixels=16,
    )
    recipe, side = RECIPES[name]
    got = model_input(path.read_bytes(), size, (0, 0, *size), (side, side), prep, 1 << 40, bucket_size=(256, 256))
    expected = recipe(path)
    assert got.shape == expected.shape == (3, side, side)
    if name == "vavae":  # image / 127.5 - 1 in float64, cast once, against x / 255 then (x - 0.5) / 0.5 in float32
        assert (got - expected).abs().max() <= 2**-23
    else:
        assert torch.equal(got, expected)
    if side == 256:
        return  # the encoder sees the crop itself: no resize for the preset to change
    # what the preset changes: transformers' processor resize (bilinear, antialiased) is far off
    default = Preprocessing(p.image_mean, p.image_std, p.resize, token_pixels=16)
    processor = model_input(
        path.read_bytes(), size, (0, 0, *size), (side, side), default, 1 << 40, bucket_size=(256, 256)
    )
    assert (processor - expected).abs().max() > 1e-2


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dinov2")
    tiny_dinov2(registers=False, seed=3).save_pretrained(path)
    return path


def extract_with_preset(tmp_path, model_dir, preset: str, sizes, buckets_yaml: str) -> dict:
    """`dinocache extract` of scenes of `sizes` (tmp_path/imgs) with `--preset`, fp32 compute and
    storage, into tmp_path/cache; returns its manifest."""
    images, out, config = tmp_path / "imgs", tmp_path / "cache", tmp_path / "dit-256.yaml"
    for i, size in enumerate(sizes):
        save_scene(images / f"{i}.png", *size, seed=i)
    config.write_text(buckets_yaml)
    args = ["extract", str(images), "-b", str(config), "--model", str(model_dir), "--preset", preset, "-o", str(out)]
    result = runner.invoke(app, [*args, "--dtype", "float32", "--storage-dtype", "float32", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def test_the_repa_one_liner_gives_repas_targets(tmp_path, dinov2_dir):
    images, out = tmp_path / "imgs", tmp_path / "cache"
    buckets = "buckets: [[256, 256], [224, 288], [288, 224]]\nresize: crop\n"
    manifest = extract_with_preset(tmp_path, dinov2_dir, "repa", SIZES, buckets)
    prep, model = manifest["preprocessing"], manifest["model"]
    assert (prep["preset"], prep["resize"], prep["resample"], prep["token_pixels"]) == ("repa", "adm", "bicubic", 16)
    assert model["family"] == "dinov2" and model["pos_embed_interpolation"] == "offset 0.1"
    square = manifest["buckets"][0]
    assert (square["input_width"], square["input_height"], square["grid"]) == (224, 224, [16, 16])
    cache = FeatureCache(out)
    from transformers import Dinov2Model

    reference = Dinov2Model.from_pretrained(dinov2_dir).eval()
    for key in cache.keys():
        if cache.record(key)["bucket"] != 0:
            continue
        expected = official_forward(reference, repa_pixels(images / key)[None], registers=False)[0]
        patches = cache[key]["patches"].reshape(-1, expected.shape[-1])  # x_norm_patchtokens
        assert patches.shape[0] == 256 and (patches - expected[1:]).abs().max() < 1e-4


def test_token_pixels_sets_the_encoder_input_and_is_recorded(tmp_path, dinov2_dir):
    images = tmp_path / "imgs"
    save_scene(images / "a.png", 300, 300, seed=1)
    config = tmp_path / "b.yaml"
    config.write_text("buckets: [[256, 256]]\n")
    base = ["plan", str(images), "-b", str(config), "--model", str(dinov2_dir), "--json"]
    matched = json.loads(runner.invoke(app, base).output)
    native = json.loads(runner.invoke(app, [*base, "--token-pixels", "0"]).output)
    assert matched["buckets"][0]["input"] == "224x224" and matched["buckets"][0]["grid"] == "16x16"
    assert native["buckets"][0]["input"] == "252x252" and native["buckets"][0]["grid"] == "18x18"
    refused = runner.invoke(app, [*base[:-1], "--preset", "nope"])
    assert refused.exit_code == 2 and "unknown --preset" in refused.output


def test_options_a_model_cannot_serve_are_refused(tmp_path, dinov2_dir):
    images = tmp_path / "imgs"
    save_scene(images / "a.png", 300, 300, seed=1)
    config = tmp_path / "b.yaml"
    config.write_text("buckets: [[256, 256]]\nresize: adm\n")
    args = ["extract", str(images), "-b", str(config), "--model", str(dinov2_dir), "-o", str(tmp_path / "c")]
    result = runner.invoke(app, [*args, "--keep-registers"])
    assert result.exit_code == 2 and "has no register tokens" in result.output
    assert runner.invoke(app, [*args, "--workers", "0", "--no-progress"]).exit_code == 0
    crops = runner.invoke(app, ["crops", str(tmp_path / "c"), "-o", str(tmp_path / "crops.jsonl")])
    assert crops.exit_code == 0 and "resize: adm" in crops.output  # its boxes only approximate ADM's crop


def timm_resample_abs_pos_embed(posemb, new_size, old_size, num_prefix_tokens=1):
    """pytorch-image-models@aa4b585 timm/layers/pos_embed.py:19-58 with its defaults
    (interpolation 'bicubic', antialias True), as VisionTransformer._pos_embed calls it with
    dynamic_img_size (timm/models/vision_transformer.py:1049-1057)."""
    num_pos_tokens = posemb.shape[1]
    num_new_tokens = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new_tokens == num_pos_tokens and new_size[0] == new_size[1]:
        return posemb
    posemb_prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    embed_dim = posemb.shape[-1]
    orig_dtype = posemb.dtype
    posemb = posemb.float()
    posemb = posemb.reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=new_size, mode="bicubic", antialias=True)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, embed_dim)
    posemb = posemb.to(orig_dtype)
    return torch.cat([posemb_prefix, posemb], dim=1)


def timm_forward_features(model, x):
    """timm's DINOv2 forward_features on transformers' Dinov2Model weights (the same Meta
    checkpoint): its pos-embed resample in place of the model's own interpolation."""
    import types

    emb = model.embeddings
    original = emb.interpolate_pos_encoding
    M = int((emb.position_embeddings.shape[1] - 1) ** 0.5)

    def resample(self, embeddings, height, width):
        return timm_resample_abs_pos_embed(self.position_embeddings, (height // 14, width // 14), (M, M))

    emb.interpolate_pos_encoding = types.MethodType(resample, emb)
    try:
        with torch.no_grad():
            return model(pixel_values=x).last_hidden_state
    finally:
        emb.interpolate_pos_encoding = original


def test_the_vavae_preset_gives_va_vaes_dinov2_targets(tmp_path):
    dinov2_dir = tmp_path / "dinov2"
    model = tiny_dinov2(registers=False, seed=3)
    with torch.no_grad():  # position embeddings that matter: the two interpolations' tokens differ in cosine
        model.embeddings.position_embeddings.mul_(30)
    model.save_pretrained(dinov2_dir)
    images, out = tmp_path / "imgs", tmp_path / "cache"
    manifest = extract_with_preset(tmp_path, dinov2_dir, "vavae", SIZES[:2], "buckets: [[256, 256]]\n")
    assert manifest["model"]["pos_embed_interpolation"] == "size, antialias"  # timm's, not torch.hub's offset
    assert manifest["preprocessing"]["preset"] == "vavae" and manifest["preprocessing"]["resize"] == "adm"
    from transformers import Dinov2Model

    reference = Dinov2Model.from_pretrained(dinov2_dir).eval()
    cache = FeatureCache(out)  # flavour normed: timm's forward_features ends with its norm
    for key in cache.keys():
        x = vavae_pixels(images / key)[None]
        expected = timm_forward_features(reference, x)[0, 1:]  # foundation_models.py:57, [:, 1:]
        patches = cache[key]["patches"].reshape(-1, expected.shape[-1])
        assert patches.shape[0] == 256 and (patches - expected).abs().max() < 1e-4
        # the interpolation matters: torch.hub's (REPA's) gives other features on the same pixels
        assert (official_forward(reference, x, registers=False)[0, 1:] - expected).abs().max() > 1e-3
    verified = runner.invoke(app, ["verify", str(out), "--source", str(images), "--recompute", "2"])
    assert verified.exit_code == 0, verified.output
    config = tmp_path / "dit-256.yaml"
    rerun = ["extract", str(images), "-b", str(config), "--model", str(dinov2_dir), "--preset", "repa", "-o", str(out)]
    other = runner.invoke(app, [*rerun, "--workers", "0"])
    assert other.exit_code == 2 and "preset" in other.output


def test_vavae_with_buckets_its_recipe_never_trains_at_is_warned(caplog):
    """LightningDiT's VA-VAE is defined at 256x256 (docs/TRAINING.md); other buckets extract,
    with a warning naming them (newcomer trial: dit-256.yaml's non-square buckets were silent)."""
    import logging

    from dinocache.presets import warn_about_sizes

    with caplog.at_level(logging.WARNING, logger="dinocache"):
        warn_about_sizes("vavae", [(256, 256)])
        warn_about_sizes("repa", [(512, 256)])
        warn_about_sizes(None, [(512, 256)])
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="dinocache"):
        warn_about_sizes("vavae", [(256, 256), (320, 192)])
    assert len(caplog.records) == 1 and "320x192" in caplog.records[0].getMessage()
    assert "256x256" not in caplog.records[0].getMessage().split("buckets")[1]
