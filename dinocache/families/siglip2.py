"""SigLIP 2 (and SigLIP) vision towers through transformers.

Fixed resolution: checkpoints such as google/siglip2-base-patch16-256 are `SiglipModel`s (model
type "siglip", text tower included); the vision tower is loaded alone as `SiglipVisionModel`,
the module RAE takes (bytetriper/RAE@a4d18c4 src/stage1/encoders/siglip2.py:13,
`SiglipModel.from_pretrained(name).vision_model`), and run with `interpolate_pos_encoding=True`
(siglip2.py:27): at any grid but the pretraining one its position embeddings are resized
(bicubic, by size, no antialias: transformers' SiglipVisionEmbeddings.interpolate_pos_encoding).

No CLS token: every output token is a patch (prefix 0). The single-token feature is the
attention-pooling (MAP) head's output, stored as `pooled`, computed as the model computes it:
from the final LayerNorm's OUTPUT (last_hidden_state), whatever flavour the patches are read in.
"""

from __future__ import annotations

import torch

from .base import Family, Shape

SIGLIP_MEAN = (0.5, 0.5, 0.5)  # the SigLIP 2 checkpoints' preprocessor_config.json
SIGLIP_STD = (0.5, 0.5, 0.5)

# The released vision towers (google/siglip2-*: config.json's vision_config).
_WIDTHS = {
    "vitb": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vitl": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "so400m": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304),
    "g": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144),
}
_FIXED = {  # arch -> (width, patch, image size)
    "siglip2_vitb16_224": ("vitb", 16, 224),
    "siglip2_vitb16_256": ("vitb", 16, 256),
    "siglip2_vitb16_384": ("vitb", 16, 384),
    "siglip2_vitl16_256": ("vitl", 16, 256),
    "siglip2_vitl16_384": ("vitl", 16, 384),
    "siglip2_so400m14_224": ("so400m", 14, 224),
    "siglip2_so400m14_384": ("so400m", 14, 384),
    "siglip2_so400m16_256": ("so400m", 16, 256),
    "siglip2_so400m16_384": ("so400m", 16, 384),
    "siglip2_g16_256": ("g", 16, 256),
    "siglip2_g16_384": ("g", 16, 384),
}
ARCHITECTURES: dict[str, dict] = {
    **{a: _WIDTHS[w] | {"patch_size": p, "image_size": s} for a, (w, p, s) in _FIXED.items()},
}
_HUB_WIDTH = {"vitb": "base", "vitl": "large", "so400m": "so400m", "g": "giant-opt"}


class SigLIP2(Family):
    name = "siglip2"
    # a whole SigLIP checkpoint (text tower too) or its vision tower saved alone
    model_types = ("siglip", "siglip_vision_model")
    summary = "pooled"
    image_mean, image_std = SIGLIP_MEAN, SIGLIP_STD
    architectures = ARCHITECTURES
    norm_attr = "post_layernorm"
    norm_keys = ("vision_model.post_layernorm.weight", "post_layernorm.weight")
    name_aliases = {
        **{f"siglip2-{_HUB_WIDTH[w]}-patch{p}-{s}": a for a, (w, p, s) in _FIXED.items()},
    }
    config_fields = (
        "patch_size",
        "image_size",  # fixed resolution: the grid the position embeddings were learned for
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "layer_norm_eps",
        "num_channels",
    )

    def random_config(self, arch: str):
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(**ARCHITECTURES[arch])

    def encoder_config(self, config):
        return config.vision_config if config.model_type == "siglip" else config

    def model_class(self, config) -> type:
        from transformers import SiglipVisionModel

        return SiglipVisionModel

    def num_registers(self, config) -> int:
        return 0

    def shape(self, config) -> Shape:
        return Shape(
            config.hidden_size, config.num_hidden_layers, config.intermediate_size, False, 0, self.patch_size(config)
        )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from ..errors import ModelLoadError

        if not getattr(model, "use_head", False):
            raise ModelLoadError(
                "this SigLIP vision tower has no attention-pooling head (vision_use_head false)",
                "use a released SigLIP 2 checkpoint (google/siglip2-*)",
            )
        model.use_head = False  # the head runs in `tokens`, on the final norm's output
        return model

    def tokens(self, model, final_norm, pixels, hidden_states):
        out = model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=hidden_states)
        prenorm = out.last_hidden_state  # post_layernorm is an Identity here
        normed = final_norm(prenorm)
        return prenorm, normed, out.hidden_states, model.head(normed)


FAMILY = SigLIP2()
