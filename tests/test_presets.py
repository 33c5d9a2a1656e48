"""--preset repa / rae give the pixels each recipe's own code feeds its encoder, and a patch-14
encoder sees the DiT's token grid (256 px -> 224 px, 16x16 patches).

The recipes' lines are re-implemented below from their source, cited per function; the crop is
guided-diffusion's center_crop_arr (tests/test_adm_crop.py)."""

import json

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


RECIPES = {"repa": (repa_pixels, 224), "rae": (rae_pixels, 224), "rae-siglip2": (rae_siglip2_pixels, 256)}
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


def test_the_repa_one_liner_gives_repas_targets(tmp_path, dinov2_dir):
    images = tmp_path / "imgs"
    for i, size in enumerate(SIZES):
        save_scene(images / f"{i}.png", *size, seed=i)
    config = tmp_path / "dit-256.yaml"
    config.write_text("buckets: [[256, 256], [224, 288], [288, 224]]\nresize: crop\n")
    out = tmp_path / "cache"
    args = ["extract", str(images), "-b", str(config), "--model", str(dinov2_dir), "--preset", "repa", "-o", str(out)]
    result = runner.invoke(app, [*args, "--dtype", "float32", "--storage-dtype", "float32", "--workers", "0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
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
