"""DINOv3 ViTs (transformers' DINOv3ViTModel; Meta's .pth files through official.py)."""

from __future__ import annotations

import torch

from ..official import model_from_state_dict
from .base import Family, Shape

# Shapes of the released ViTs (official hub/backbones.py; SwiGLU hidden = 2/3 of ffn_ratio * dim,
# rounded up to `align_to`). The SwiGLU ("plus" and 7B) models apply SiLU to the gate
# (dinov3/layers/ffn_layers.py, SwiGLUFFN.forward); the others exact GELU.
_SWIGLU = dict(use_gated_mlp=True, hidden_act="silu")
ARCHITECTURES: dict[str, dict] = {
    "vits16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vits16plus": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, **_SWIGLU),
    "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vitl16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "vitl16plus": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_SWIGLU
    ),
    "vith16plus": dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, **_SWIGLU
    ),
    "vit7b16": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, intermediate_size=8192, **_SWIGLU),
}


class DINOv3(Family):
    name = "dinov3"
    model_types = ("dinov3_vit",)
    architectures = ARCHITECTURES
    norm_attr = "norm"
    norm_keys = ("norm.weight", "dinov3_vit.norm.weight", "model.norm.weight")
    config_fields = (
        "patch_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "layer_norm_eps",
        "rope_theta",
        "query_bias",
        "key_bias",
        "value_bias",
        "proj_bias",
        "mlp_bias",
        "layerscale_value",
        "use_gated_mlp",
        "num_register_tokens",
        "num_channels",
    )

    def random_config(self, arch: str):
        from transformers import DINOv3ViTConfig

        return DINOv3ViTConfig(patch_size=16, num_register_tokens=4, layerscale_value=1e-5, **ARCHITECTURES[arch])

    def model_class(self, config) -> type:
        from transformers import DINOv3ViTModel

        return DINOv3ViTModel

    def shape(self, config) -> Shape:
        return Shape(
            config.hidden_size,
            config.num_hidden_layers,
            config.intermediate_size,
            bool(getattr(config, "use_gated_mlp", False)),
            1 + self.num_registers(config),
            self.patch_size(config),
        )

    def claims_official(self, state_dict: dict) -> bool:
        return "storage_tokens" in state_dict or "rope_embed.periods" in state_dict

    def official_model(self, path: str, state_dict: dict, dtype: torch.dtype):
        return model_from_state_dict(path, state_dict, dtype)

    def record(self, config, interpolation: str | None = None) -> dict:
        return {}  # the first family: a record without "family" is DINOv3 (caches made before families)


FAMILY = DINOv3()
