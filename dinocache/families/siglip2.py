"""SigLIP 2 (and SigLIP) vision towers through transformers.

Fixed resolution: checkpoints such as google/siglip2-base-patch16-256 are `SiglipModel`s (model
type "siglip", text tower included); the vision tower is loaded alone as `SiglipVisionModel`,
the module RAE takes (bytetriper/RAE@a4d18c4 src/stage1/encoders/siglip2.py:13,
`SiglipModel.from_pretrained(name).vision_model`), and run with `interpolate_pos_encoding=True`
(siglip2.py:27): at any grid but the pretraining one its position embeddings are resized
(bicubic, by size, no antialias: transformers' SiglipVisionEmbeddings.interpolate_pos_encoding).

NaFlex: `Siglip2VisionModel` (model type "siglip2") embeds pre-patchified pixels
[B, rows*cols, 3*p*p] and resizes its position embeddings per image to `spatial_shapes`
(bilinear, antialiased). Every image of a batch has one bucket shape, so the batch gets one
spatial shape and a full attention mask: no padding token, nothing that changes a feature.

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
_NAFLEX = {"siglip2_vitb16_naflex": "vitb", "siglip2_so400m16_naflex": "so400m"}  # 256 position embeddings
ARCHITECTURES: dict[str, dict] = {
    **{a: _WIDTHS[w] | {"patch_size": p, "image_size": s} for a, (w, p, s) in _FIXED.items()},
    **{a: _WIDTHS[w] | {"patch_size": 16, "num_patches": 256} for a, w in _NAFLEX.items()},
}
_HUB_WIDTH = {"vitb": "base", "vitl": "large", "so400m": "so400m", "g": "giant-opt"}


class SigLIP2(Family):
    name = "siglip2"
    # a whole SigLIP checkpoint (text tower too) or its vision tower saved alone
    model_types = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")
    summary = "pooled"
    image_mean, image_std = SIGLIP_MEAN, SIGLIP_STD
    architectures = ARCHITECTURES
    norm_attr = "post_layernorm"
    norm_keys = ("vision_model.post_layernorm.weight", "post_layernorm.weight")
    name_aliases = {
        **{f"siglip2-{_HUB_WIDTH[w]}-patch{p}-{s}": a for a, (w, p, s) in _FIXED.items()},
        **{f"siglip2-{_HUB_WIDTH[w]}-patch16-naflex": a for a, w in _NAFLEX.items()},
    }
    config_fields = (
        "patch_size",
        "image_size",  # fixed resolution: the grid the position embeddings were learned for
        "num_patches",  # NaFlex: the same, as a count of positions
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "layer_norm_eps",
        "num_channels",
    )

    def random_config(self, arch: str):
        from transformers import Siglip2VisionConfig, SiglipVisionConfig

        fields = ARCHITECTURES[arch]
        return (Siglip2VisionConfig if "num_patches" in fields else SiglipVisionConfig)(**fields)

    def encoder_config(self, config):
        return config.vision_config if config.model_type in ("siglip", "siglip2") else config

    def model_class(self, config) -> type:
        from transformers import Siglip2VisionModel, SiglipVisionModel

        return Siglip2VisionModel if naflex(config) else SiglipVisionModel

    def num_registers(self, config) -> int:
        return 0

    def shape(self, config) -> Shape:
        return Shape(
            config.hidden_size, config.num_hidden_layers, config.intermediate_size, False, 0, self.patch_size(config)
        )

    def prepare(self, model: torch.nn.Module, interpolation: str | None = None) -> torch.nn.Module:
        from ..errors import ModelLoadError

        if not getattr(model, "use_head", False):
            raise ModelLoadError(
                "this SigLIP vision tower has no attention-pooling head (vision_use_head false)",
                "use a released SigLIP 2 checkpoint (google/siglip2-*)",
            )
        model.use_head = False  # the head runs in `tokens`, on the final norm's output
        return model

    def tokens(self, model, final_norm, pixels, hidden_states):
        if naflex(model.config):
            patches, rows, cols = patchify(pixels, self.patch_size(model.config))
            batch = patches.shape[0]
            shapes = torch.tensor([[rows, cols]], device=pixels.device).expand(batch, 2)
            mask = torch.ones(batch, rows * cols, dtype=torch.long, device=pixels.device)  # no padding
            out = model(
                pixel_values=patches,
                pixel_attention_mask=mask,
                spatial_shapes=shapes,
                output_hidden_states=hidden_states,
            )
        else:
            out = model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=hidden_states)
        prenorm = out.last_hidden_state  # post_layernorm is an Identity here
        normed = final_norm(prenorm)
        return prenorm, normed, out.hidden_states, model.head(normed)


def naflex(config) -> bool:
    return config.model_type.startswith("siglip2")


def patchify(pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, int, int]:
    """[B, C, H, W] -> ([B, rows*cols, patch*patch*C], rows, cols): row-major patches, each
    flattened (row, column, channel) as transformers' Siglip2ImageProcessor does
    (image_processing_siglip2.py, convert_image_to_patches)."""
    b, c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    x = pixels.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, rows * cols, patch * patch * c), rows, cols


FAMILY = SigLIP2()
