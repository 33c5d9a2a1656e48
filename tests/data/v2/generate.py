"""How tests/data/v2 was made: run once with the dinocache of commit 3d7826d (format 2), from
the repository root: `python tests/data/v2/generate.py`. It writes

    model/              a tiny DINOv3 (hidden 32) whose final LayerNorm has a real affine
    cache-v2/           bfloat16, registers, --layers 1, --flip, token statistics
    cache-v2-f8/        float8_e4m3fn, --pool 2
    expected-CACHE.safetensors   what that dinocache's FeatureCache returned for every key,
                        flavour and feature: "FLAVOUR|KEY|NAME" -> tensor (dtype kept)

from the pictures of tests/data/v1/images (copied to /tmp first, so no checkout path is
recorded). tests/test_layout.py reads these caches with today's code and expects the same tensors.
"""

import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from dinocache import FeatureCache  # noqa: E402
from dinocache.config import ExtractOptions, parse_bucket_config  # noqa: E402
from dinocache.errors import CacheError  # noqa: E402
from dinocache.extract import extract  # noqa: E402


def make_model(path: Path) -> None:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(20)
    config = DINOv3ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_register_tokens=4,
        patch_size=16,
        layerscale_value=1.0,
    )
    model = DINOv3ViTModel(config)
    with torch.no_grad():
        model.embeddings.register_tokens.normal_(0, 1.0)
        model.norm.weight.uniform_(0.1, 1.7)
        model.norm.weight[:4] = torch.tensor([0.12, -0.3, 2.0, 0.05])
        model.norm.bias.normal_(0, 0.5)
    model.save_pretrained(path)


def main() -> None:
    os.chdir(HERE)  # the manifest records the model as "model", not a checkout path
    images = Path("/tmp/v2gen/images")
    shutil.rmtree(images.parent, ignore_errors=True)
    shutil.copytree(HERE.parent / "v1" / "images", images)
    if not (HERE / "model" / "model.safetensors").exists():
        make_model(HERE / "model")
    buckets = parse_bucket_config({"buckets": [[64, 64], [96, 48]]})
    for name, options in (
        ("cache-v2", dict(keep_registers=True, layers=(1,), flip=True)),
        ("cache-v2-f8", dict(storage_dtype="float8_e4m3fn", pool=2)),
    ):
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        extract(
            images,
            ExtractOptions(
                out=out, buckets=buckets, model="model", workers=0, progress=False, dtype="float32", **options
            ),
        )
        expected = {}
        for flavour in ("normed", "ln_noaffine", "prenorm"):
            try:
                cache = FeatureCache(out, flavour=flavour)
            except CacheError:
                continue  # prenorm of a pooled cache: refused
            for key in cache.keys():
                for feature, value in cache[key].items():
                    if isinstance(value, torch.Tensor):
                        expected[f"{flavour}|{key}|{feature}"] = value.contiguous()
        save_file(expected, str(HERE / f"expected-{name}.safetensors"), metadata={"made_by": "dinocache at 3d7826d"})


if __name__ == "__main__":
    main()
