"""Shared fixtures: a tiny random DINOv3 saved like a real checkpoint, and small test pictures.

The model goes through `save_pretrained` -> `--model PATH`, the same code path a user's local
checkpoint or Hub download takes. Nothing here stubs the model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_sample_images import scene  # noqa: E402

NUM_REGISTERS = 4
DEVICE = os.environ.get("TORCH_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory, monkeypatch):
    """Each test runs in an empty folder of its own, so a `./dinocache_out` that the README's
    first command left in the checkout (the default --out) cannot change what a test sees."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def tiny_config(**overrides):
    from transformers import DINOv3ViTConfig

    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_register_tokens=NUM_REGISTERS,
        patch_size=16,
        layerscale_value=1.0,
    )
    kwargs.update(overrides)
    return DINOv3ViTConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import DINOv3ViTModel

    torch.manual_seed(1234)
    model = DINOv3ViTModel(tiny_config())
    # Random-init register tokens can come out tiny; make them clearly different from patches.
    with torch.no_grad():
        model.embeddings.register_tokens.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("tiny-dinov3")
    model.save_pretrained(path)
    return path


def save_scene(path: Path, width: int, height: int, seed: int = 0, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scene(width, height, seed).save(path, **save_kwargs)
    return path


@pytest.fixture()
def mixed_images(tmp_path) -> Path:
    """Pictures of known aspect ratios (nested folder and upper-case extension included)."""
    root = tmp_path / "images"
    save_scene(root / "square.png", 300, 300, 1)
    save_scene(root / "wide.png", 600, 300, 2)  # 2:1 -> 384x192
    save_scene(root / "sub" / "tall.PNG", 280, 400, 3)  # 0.7 -> 210x300
    save_scene(root / "sub" / "landscape.jpg", 330, 230, 4, quality=95)  # ~1.43 -> 320x224
    (root / "notes.txt").write_text("not an image, ignored by the scan")
    return root


def reference_forward(model_dir: Path, pixels: torch.Tensor) -> torch.Tensor:
    """The plain transformers fp32 forward: last_hidden_state for [B, 3, H, W] pixels."""
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(model_dir).float().eval()
    with torch.no_grad():
        return model(pixel_values=pixels.float()).last_hidden_state


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def pil_to_float(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def fresh_bucket(endpoint: str, bucket: str, tmp_path: Path, monkeypatch):
    """An empty S3 bucket on a local moto server, with the credentials and endpoint in the
    environment (as a user would set them) and a private local mirror folder; yields (fs, env)."""
    import s3fs

    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DINOCACHE_REMOTE_CACHE": str(tmp_path / "mirror"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)
    fs.mkdir(bucket)
    yield fs, env
    s3fs.S3FileSystem.clear_instance_cache()
