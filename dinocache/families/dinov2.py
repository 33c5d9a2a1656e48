"""DINOv2 ViTs, with and without registers: transformers' Dinov2Model / Dinov2WithRegistersModel
(Hub ids such as facebook/dinov2-base, local folders) and Meta's torch.hub checkpoints
(`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`) by key mapping.

Position embeddings. DINOv2 learns absolute position embeddings for a 37x37 grid (518 px) and
interpolates them (bicubic) to each input's grid. Meta's code (facebookresearch/dinov2@b8931f7,
dinov2/models/vision_transformer.py:180-212) does it two ways: the models without registers use
`interpolate_offset=0.1`, i.e. `scale_factor=((rows + 0.1) / 37, (cols + 0.1) / 37)` without
antialiasing; the models with registers (hub/backbones.py:98-154) use `size=(rows, cols)` with
antialiasing. transformers' Dinov2WithRegistersModel matches the latter; its Dinov2Model
interpolates by `size` without the offset, which gives other embeddings than torch.hub's
`dinov2_vitb14` (the model REPA, REG and their successors load). So models without registers
get Meta's interpolation here (`prepare`): the features are those of the official model.

timm's DINOv2 (`vit_large_patch14_dinov2.lvd142m` with dynamic_img_size, VA-VAE's encoder: Meta's
dinov2_vitl14_pretrain.pth) resizes by size with antialiasing for every model
(pytorch-image-models@aa4b585 timm/layers/pos_embed.py:19-58, resample_abs_pos_embed with its
defaults bicubic and antialias=True, called by vision_transformer.py:1049-1057): the models with
registers' rule. A recipe asks for it by name (`interpolation` "size, antialias", --preset vavae).
"""

from __future__ import annotations

import math
import types

import torch

from .base import Family, Shape

HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}
INTERPOLATE_OFFSET = 0.1  # vision_transformer.py:196-200, the models without registers
OFFSET, SIZE_ANTIALIAS = "offset 0.1", "size, antialias"  # as the manifest records them

# hub/backbones.py: dinov2_vit{s,b,l,g}14 and their _reg variants (4 registers); ViT-g uses the
# fused SwiGLU FFN. Position embeddings for 518 px (37x37 patches of 14).
_BASE = dict(patch_size=14, image_size=518, layerscale_value=1.0, mlp_ratio=4)
_SIZES = {
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
ARCHITECTURES: dict[str, dict] = {
    **{f"dinov2_{a}": _BASE | s for a, s in _SIZES.items()},
    **{f"dinov2_{a}_reg": _BASE | s | {"num_register_tokens": 4} for a, s in _SIZES.items()},
}


class DINOv2(Family):
    name = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")
    architectures = ARCHITECTURES
    norm_attr = "layernorm"
    norm_keys = ("layernorm.weight", "dinov2.layernorm.weight", "model.layernorm.weight")
    name_aliases = {
        **{f"dinov2-{size}": f"dinov2_{a}" for size, a in zip(("small", "base", "large", "giant"), _SIZES)},
        **{
            f"dinov2-with-registers-{size}": f"dinov2_{a}_reg"
            for size, a in zip(("small", "base", "large", "giant"), _SIZES)
        },
        **{f"dinov2_{a}_reg4": f"dinov2_{a}_reg" for a in _SIZES},  # Meta's file names
    }
    config_fields = (
        "patch_size",
        "image_size",  # the grid the position embeddings were learned for
        "hidden_size",
        "mlp_ratio",
        "use_swiglu_ffn",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "layer_norm_eps",
        "qkv_bias",
        "layerscale_value",
        "num_register_tokens",
        "num_channels",
    )

    def random_config(self, arch: str):
        from transformers import Dinov2Config, Dinov2WithRegistersConfig

        fields = dict(ARCHITECTURES[arch])
        cls = Dinov2WithRegistersConfig if "num_register_tokens" in fields else Dinov2Config
        return cls(**fields)

    def model_class(self, config) -> type:
        from transformers import Dinov2Model, Dinov2WithRegistersModel

        return Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model

    def shape(self, config) -> Shape:
        inner = int(config.hidden_size * config.mlp_ratio)
        gated = bool(getattr(config, "use_swiglu_ffn", False))
        if gated:
            inner = (int(inner * 2 / 3) + 7) // 8 * 8
        return Shape(
            config.hidden_size,
            config.num_hidden_layers,
            inner,
            gated,
            1 + self.num_registers(config),
            self.patch_size(config),
        )

    interpolations = (OFFSET, SIZE_ANTIALIAS)

    def prepare(self, model: torch.nn.Module, interpolation: str | None = None) -> torch.nn.Module:
        interpolation = interpolation or _official_interpolation(model.config)
        if model.config.model_type == "dinov2_with_registers" and interpolation != SIZE_ANTIALIAS:
            from ..errors import ModelLoadError

            raise ModelLoadError(
                f"a DINOv2 with registers interpolates by {SIZE_ANTIALIAS}, not {interpolation}",
                "use a DINOv2 without registers for this recipe",
            )
        if model.config.model_type == "dinov2":  # transformers' own (size, no antialias) is neither
            method = _interpolate_with_offset if interpolation == OFFSET else _interpolate_by_size_antialiased
            model.embeddings.interpolate_pos_encoding = types.MethodType(method, model.embeddings)
        return model

    def record(self, config, interpolation: str | None = None) -> dict:
        return {"family": self.name, "pos_embed_interpolation": interpolation or _official_interpolation(config)}

    def claims_official(self, state_dict: dict) -> bool:
        return "pos_embed" in state_dict and "storage_tokens" not in state_dict

    def official_model(self, path: str, state_dict: dict, dtype: torch.dtype):
        config = official_config(state_dict)
        model = self.model_class(config)._from_config(config, dtype=dtype)
        converted = official_to_transformers(state_dict, config)
        expected = set(model.state_dict())
        missing, unused = sorted(expected - set(converted)), sorted(set(converted) - expected)
        if missing or unused:
            from ..errors import ModelLoadError

            raise ModelLoadError(
                f"{path}: keys the DINOv2 mapping does not cover: missing {missing[:5]}, unused {unused[:5]}",
                "this checkpoint's layout is not supported; convert it with transformers' script",
            )
        model.load_state_dict(converted, strict=True)
        return model.eval(), config


def _official_interpolation(config) -> str:
    """Meta's rule: the models with registers by size with antialias, the others by offset."""
    return SIZE_ANTIALIAS if config.model_type == "dinov2_with_registers" else OFFSET


def _interpolate_by_size_antialiased(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """timm's resample_abs_pos_embed (timm/layers/pos_embed.py:19-58: bicubic to the grid's size,
    antialias=True, in float32) as a method of transformers' Dinov2Embeddings."""
    patch = self.patch_embeddings.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    rows, cols = height // patch, width // patch
    N = self.position_embeddings.shape[1] - 1
    if rows * cols == N and rows == cols:
        return self.position_embeddings
    M = int(math.sqrt(N))
    prefix, grid = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, M, M, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(prefix.dtype)
    return torch.cat((prefix, grid), dim=1)


def _interpolate_with_offset(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """dinov2/models/vision_transformer.py:180-212 with interpolate_offset=0.1 and no antialias,
    as a method of transformers' Dinov2Embeddings (`height`, `width` in pixels)."""
    previous_dtype = embeddings.dtype
    npatch = embeddings.shape[1] - 1
    N = self.position_embeddings.shape[1] - 1
    if npatch == N and height == width:
        return self.position_embeddings
    pos_embed = self.position_embeddings.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = embeddings.shape[-1]
    patch = self.patch_embeddings.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    rows, cols = height // patch, width // patch
    M = int(math.sqrt(N))
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=False,
        scale_factor=(float(rows + INTERPOLATE_OFFSET) / M, float(cols + INTERPOLATE_OFFSET) / M),
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def official_config(sd: dict):
    """The transformers config the official tensors' shapes describe."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    from ..errors import ModelLoadError

    hidden = sd["cls_token"].shape[-1]
    if hidden not in HEADS_BY_WIDTH:
        raise ModelLoadError(f"unknown DINOv2 width {hidden}", f"known widths: {sorted(HEADS_BY_WIDTH)}")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    side = int(math.isqrt(sd["pos_embed"].shape[1] - 1))
    fields = dict(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=HEADS_BY_WIDTH[hidden],
        patch_size=patch,
        image_size=side * patch,
        layerscale_value=1.0,
        mlp_ratio=4,
    )
    if "blocks.0.mlp.w12.weight" in sd:
        fields["use_swiglu_ffn"] = True
    else:
        inner = sd["blocks.0.mlp.fc1.weight"].shape[0]
        if inner % hidden:
            raise ModelLoadError(
                f"the MLP width {inner} is not a whole multiple of {hidden}", "pass a released DINOv2 checkpoint"
            )
        fields["mlp_ratio"] = inner // hidden
    if "register_tokens" in sd:
        return Dinov2WithRegistersConfig(num_register_tokens=sd["register_tokens"].shape[1], **fields)
    return Dinov2Config(**fields)


def official_to_transformers(sd: dict, config) -> dict:
    """Rename (and split the fused qkv and w12 of) an official DINOv2 state dict."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"].reshape(1, -1),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(config.num_hidden_layers):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{suffix}"].chunk(3, dim=0)
            out[f"{h}attention.q_proj.{suffix}"] = q
            out[f"{h}attention.k_proj.{suffix}"] = k
            out[f"{h}attention.v_proj.{suffix}"] = v
            out[f"{h}attention.o_proj.{suffix}"] = sd[f"{b}attn.proj.{suffix}"]
            out[f"{h}norm1.{suffix}"] = sd[f"{b}norm1.{suffix}"]
            out[f"{h}norm2.{suffix}"] = sd[f"{b}norm2.{suffix}"]
            if f"{b}mlp.w12.{suffix}" in sd:  # SwiGLUFFNFused: w12 = [w1; w2], silu(w1 x) * w2 x
                gate, up = sd[f"{b}mlp.w12.{suffix}"].chunk(2, dim=0)
                out[f"{h}mlp.gate_proj.{suffix}"], out[f"{h}mlp.up_proj.{suffix}"] = gate, up
                out[f"{h}mlp.down_proj.{suffix}"] = sd[f"{b}mlp.w3.{suffix}"]
            else:
                out[f"{h}mlp.fc1.{suffix}"] = sd[f"{b}mlp.fc1.{suffix}"]
                out[f"{h}mlp.fc2.{suffix}"] = sd[f"{b}mlp.fc2.{suffix}"]
        out[f"{h}layer_scale1.lambda1"] = sd[f"{b}ls1.gamma"]
        out[f"{h}layer_scale2.lambda1"] = sd[f"{b}ls2.gamma"]
    return out


FAMILY = DINOv2()
