import importlib.util

import numpy as np
import pytest
import torch
from conftest import pil_to_float, save_scene
from PIL import Image

from dinocache.errors import DecodeError
from dinocache.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, preprocess
from dinocache.scan import probe

BIG = 10**9


def test_exif_orientation_is_applied(tmp_path):
    upright = save_scene(tmp_path / "upright.png", 64, 96, 5)
    stored = Image.open(upright).transpose(Image.Transpose.ROTATE_90)  # what a phone writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(tmp_path / "sideways.png", exif=exif)
    assert probe(str(tmp_path / "sideways.png")) == (64, 96)
    got = decode_image(str(tmp_path / "sideways.png"), BIG)
    assert got.shape == (3, 96, 64)
    assert torch.equal(got, pil_to_float(Image.open(upright)))


def test_16bit_png_is_not_whited_out(tmp_path):
    gray8 = np.asarray(Image.open(save_scene(tmp_path / "s.png", 64, 48, 1)).convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = decode_image(str(tmp_path / "g16.png"), BIG)
    assert got.shape == (3, 48, 64)
    torch.testing.assert_close(got[0], torch.from_numpy(gray8 / 255.0).float(), atol=1e-6, rtol=0)
    assert (got == 1.0).float().mean() < 0.5  # convert("RGB") would make ~99.6% white


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = decode_image(str(tmp_path / "a.png"), BIG)
    assert torch.allclose(got[:, :4], torch.tensor([200 / 255, 0, 0]).view(3, 1, 1))
    assert torch.all(got[:, 4:] == 1.0)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    got = decode_image(str(tmp_path / "p.png"), BIG)
    assert torch.allclose(got[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
    assert torch.all(got[:, 3, 3] == 1.0)  # transparent black -> white, not black


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    got = decode_image(str(tmp_path / "c.jpg"), BIG)
    r, g, b = got[:, 8, 8].tolist()
    assert r > 0.9 and g < 0.1 and b < 0.1


def test_float_tiff(tmp_path):
    data = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(data, "F").save(tmp_path / "f.tif")
    got = decode_image(str(tmp_path / "f.tif"), BIG)
    torch.testing.assert_close(got[1], torch.from_numpy(data))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    save_scene(tmp_path / "big.png", 400, 300)
    with pytest.raises(DecodeError) as info:
        decode_image(str(tmp_path / "big.png"), max_pixels=100_000)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("content, reason", [(b"hello, I am text", "not_an_image"), (b"", "not_an_image")])
def test_non_images_raise_decode_error(tmp_path, content, reason):
    (tmp_path / "x.jpg").write_bytes(content)
    with pytest.raises(DecodeError) as info:
        decode_image(str(tmp_path / "x.jpg"), BIG)
    assert info.value.reason == reason


def test_truncated_jpeg(tmp_path):
    data = (save_scene(tmp_path / "ok.jpg", 200, 200, quality=90)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError) as info:
        decode_image(str(tmp_path / "cut.jpg"), BIG)
    assert info.value.reason == "corrupt"


def test_normalization_of_a_flat_image_is_exact():
    pixels = torch.full((3, 40, 60), 128 / 255.0)
    out = preprocess(pixels, (0, 0, 60, 40), (32, 16), IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 16, 32)
    expected = (torch.tensor([128 / 255.0] * 3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand_as(out))


def test_crop_box_selects_the_region():
    pixels = torch.zeros(3, 20, 40)
    pixels[:, :, 10:30] = 1.0  # a white vertical band in the centre
    out = preprocess(pixels, (10, 0, 30, 20), (16, 16), (0, 0, 0), (1, 1, 1))
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="transformers' DINOv3ViTImageProcessor needs torchvision, which does not import beside "
    "the CPU torch used here; runs where torchvision is installed (e.g. the GPU image)",
)
@pytest.mark.parametrize("size", [(208, 304), (224, 224), (320, 192)])
def test_matches_transformers_image_processor(tmp_path, size):
    from transformers import DINOv3ViTImageProcessor

    path = save_scene(tmp_path / "s.jpg", 333, 251, 7, quality=95)
    width, height = size
    ours = preprocess(decode_image(str(path), BIG), (0, 0, 333, 251), (width, height), IMAGENET_MEAN, IMAGENET_STD)
    processor = DINOv3ViTImageProcessor(size={"height": height, "width": width}, do_center_crop=False)
    theirs = processor(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
    # Same algorithm (F.interpolate bilinear + antialias on [0, 1] floats): only float rounding differs.
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
