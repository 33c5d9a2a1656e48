"""`resize: adm` gives the pixels of ADM's centre crop, which REPA, RAE and SVG train with.

The reference below is guided-diffusion's `center_crop_arr` copied from its source
(openai/guided-diffusion@22e0df8, guided_diffusion/image_datasets.py:126-143; the same function
is in REPA's preprocessing, RAE's src/calculate_stat.py:41-50 and SVG's utils.py:103-121),
followed by torchvision's ToTensor (uint8 / 255) and Normalize(ImageNet), as SVG's
utils.py:186-194 and RAE's calculate_stat.py:227-231 + rae.py:85 apply them.
"""

import numpy as np
import pytest
import torch
from conftest import reference_forward, save_scene
from PIL import Image

from dinocache import FeatureCache
from dinocache.config import ExtractOptions, load_bucket_config
from dinocache.errors import ConfigError
from dinocache.extract import extract
from dinocache.imaging import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, model_input


def center_crop_arr(pil_image, image_size):
    """guided-diffusion image_datasets.py:126-143, verbatim but for the comment."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def recipe_pixels(path, image_size) -> torch.Tensor:
    """ImageFolder's loader (open, convert RGB) -> center_crop_arr -> ToTensor -> Normalize."""
    with open(path, "rb") as fh:
        img = Image.open(fh).convert("RGB")
    arr = center_crop_arr(img, image_size)
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)  # ToTensor
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub(mean).div(std)  # Normalize


# sizes that take 0, 1 and 2 BOX halvings, upscale, sit on the halving edge, or are odd
SIZES = [(333, 500), (500, 333), (1024, 700), (600, 1290), (120, 90), (512, 512), (513, 1027), (257, 256)]


@pytest.mark.parametrize("size", SIZES)
def test_adm_pixels_are_bit_exact(tmp_path, size):
    path = save_scene(tmp_path / "img.png", *size, seed=sum(size))
    expected = recipe_pixels(path, 256)
    data = path.read_bytes()
    prep = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, resize="adm")
    got = model_input(data, size, (0, 0, *size), (256, 256), prep, 1 << 40, bucket_size=(256, 256))
    assert torch.equal(got, expected)
    # the GPU path (workers crop, the device resizes and normalizes) starts from the same uint8 crop
    region = model_input(data, size, (0, 0, *size), (256, 256), prep, 1 << 40, crop_only=True, bucket_size=(256, 256))
    assert region.dtype == torch.uint8
    assert np.array_equal(region.permute(1, 2, 0).numpy(), center_crop_arr(Image.open(path).convert("RGB"), 256))


def test_other_resize_modes_differ_from_adm(tmp_path):
    """The reason for the mode: the default crop (bilinear, antialiased) is not ADM's pixels."""
    path = save_scene(tmp_path / "img.png", 700, 450, seed=5)
    data = path.read_bytes()
    default = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, resize="crop")
    from dinocache.buckets import crop_box, make_buckets

    box = crop_box(700, 450, make_buckets([(256, 256)], 16)[0], "crop")
    got = model_input(data, (700, 450), box, (256, 256), default, 1 << 40)
    assert (got - recipe_pixels(path, 256)).abs().max() > 0.05


def test_extract_with_adm_buckets_equals_the_recipes_forward(tmp_path, tiny_model_dir):
    """End to end: the cached patch tokens equal plain transformers on the recipe's pixels."""
    images = tmp_path / "images"
    for i, size in enumerate([(640, 480), (300, 420)]):
        save_scene(images / f"{i}.png", *size, seed=i)
    config = tmp_path / "adm.yaml"
    config.write_text("buckets: [[256, 256]]\nresize: adm\n")
    out = tmp_path / "cache"
    options = ExtractOptions(
        out=out,
        buckets=load_bucket_config(config),
        model=str(tiny_model_dir),
        dtype="float32",
        storage_dtype="float32",
        workers=0,
        progress=False,
    )
    extract(images, options)
    cache = FeatureCache(out)
    assert cache.manifest["preprocessing"]["resize"] == "adm"
    for key in ("0.png", "1.png"):
        expected = reference_forward(tiny_model_dir, recipe_pixels(images / key, 256)[None])[0]
        item = cache[key]
        assert (item["patches"].reshape(-1, expected.shape[-1]) - expected[5:]).abs().max() < 1e-4
        assert (item["cls"] - expected[0]).abs().max() < 1e-4
        left, top, right, bottom = cache.record(key)["box"]
        assert 0 <= left < right <= 640 and 0 <= top < bottom <= 480  # the covered region, recorded


def test_adm_refuses_what_would_change_its_pixels(tmp_path):
    with pytest.raises(ConfigError, match="jpeg-draft"):
        Preprocessing(resize="adm", jpeg_draft=True)
    config = tmp_path / "adm.yaml"
    config.write_text("buckets: [[256, 256]]\nresize: adm\n")
    from dinocache.crops import load_crops

    crops = tmp_path / "crops.jsonl"
    crops.write_text('{"key": "a.png", "size": [256, 256], "box": [0, 0, 10, 10]}\n')
    with pytest.raises(ConfigError, match="resize: adm"):
        load_crops(crops, load_bucket_config(config), [])
