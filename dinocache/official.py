"""Official Meta DINOv3 checkpoints (`dinov3_vitl16_pretrain_lvd1689m-*.pth`) into the
transformers architecture, by key mapping -- the same mapping as transformers' conversion script:

    official                              transformers DINOv3ViTModel
    cls_token [1, 1, D]                   embeddings.cls_token
    storage_tokens [1, R, D]              embeddings.register_tokens
    mask_token [1, D]                     embeddings.mask_token [1, 1, D]
    patch_embed.proj.{weight,bias}        embeddings.patch_embeddings.{weight,bias}
    blocks.i.norm1/norm2.*                (model.)layer.i.norm1/norm2.*
    blocks.i.attn.qkv.weight [3D, D]      layer.i.attention.{q,k,v}_proj.weight
    blocks.i.attn.qkv.bias [3D]           layer.i.attention.{q,v}_proj.bias (the key bias is masked: dropped)
    blocks.i.attn.proj.*                  layer.i.attention.o_proj.*
    blocks.i.ls1.gamma / ls2.gamma        layer.i.layer_scale1.lambda1 / layer_scale2.lambda1
    blocks.i.mlp.fc1 / fc2.*              layer.i.mlp.up_proj / down_proj.*              (MLP)
    blocks.i.mlp.w1 / w2 / w3.*           layer.i.mlp.gate_proj / up_proj / down_proj.*  (SwiGLU)
    norm.*                                norm.*
    rope_embed.periods                    (recomputed from rope_theta = 100; checked equal)
    local_cls_norm.*                      (ignored: Meta's forward uses it only in training)

The SwiGLU models (ViT-S+/16, ViT-L+/16, ViT-H+/16, ViT-7B/16) compute `w3(silu(w1 x) * w2 x)`
(dinov3/layers/ffn_layers.py, SwiGLUFFN.forward): their config gets hidden_act="silu", which
transformers' gated MLP applies to gate_proj. The plain-MLP models use exact GELU (nn.GELU in
vision_transformer.py), transformers' "gelu".

The file is read with `torch.load(weights_only=True)`: tensors only, no arbitrary unpickling.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError

HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
ROPE_THETA = 100.0  # pos_embed_rope_base of every released ViT (hub/backbones.py)
# Training-only parts: the local-crop CLS norm (vision_transformer.py uses it only when
# self.training, for the second crop list) and the RoPE periods, recomputed (and checked) here.
IGNORED = ("rope_embed.periods", "local_cls_norm.")


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            try:  # memory-mapped: tensors are read as the model copies them, not all at once
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        if "Weights only load failed" in first:
            # not torch's advice to retry with weights_only=False: that would run the file's code
            why = "it holds Python objects besides tensors, which dinocache never unpickles (they could run code)"
        else:
            why = f"not a PyTorch checkpoint ({type(exc).__name__}: {first})"
        raise ModelLoadError(
            f"cannot read {path} as an official DINOv3 checkpoint: {why}",
            "pass the .pth file downloaded from Meta, or a transformers folder / Hub id",
        ) from None
    for wrapper in ("teacher", "model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()} if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ModelLoadError(
            f"{path} does not look like an official DINOv3 or DINOv2 ViT checkpoint (no cls_token / patch_embed)",
            "ConvNeXt checkpoints are not supported; pass a ViT .pth",
        )
    return sd


def official_config(sd: dict[str, torch.Tensor]):
    """The DINOv3ViTConfig the tensors' shapes describe."""
    from transformers import DINOv3ViTConfig

    hidden = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    gated = "blocks.0.mlp.w1.weight" in sd
    inner = sd["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    if hidden not in HEADS_BY_WIDTH:
        raise ModelLoadError(f"unknown DINOv3 width {hidden}", f"known widths: {sorted(HEADS_BY_WIDTH)}")
    registers = sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0
    return DINOv3ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=HEADS_BY_WIDTH[hidden],
        intermediate_size=inner,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        key_bias=_has_key_bias(sd),
        num_register_tokens=registers,
        patch_size=sd["patch_embed.proj.weight"].shape[-1],
        layerscale_value=1.0,
        rope_theta=ROPE_THETA,
    )


def _has_key_bias(sd: dict[str, torch.Tensor]) -> bool:
    """Whether the key part of the fused qkv bias takes effect. Every released ViT masks it
    (LinearKMaskedBias in dinov3/layers/attention.py: bias * bias_mask, the mask 1 for q and v
    and 0 for k); without a mask the key bias is real and must be kept."""
    if "blocks.0.attn.qkv.bias" not in sd:
        return False
    if "blocks.0.attn.qkv.bias_mask" not in sd:
        return True
    for key in (k for k in sd if k.endswith("attn.qkv.bias_mask")):
        q, k, v = sd[key].float().chunk(3)
        if not (bool((q == 1).all()) and bool((k == 0).all()) and bool((v == 1).all())):
            raise ModelLoadError(
                f"{key} is not the usual (1, 0, 1) mask of the query, key and value biases",
                "this checkpoint's attention is not supported; convert it with transformers' script",
            )
    return False


def _check_training_only_parts(sd: dict[str, torch.Tensor], config) -> None:
    """Refuse what transformers' DINOv3 cannot express, and say what is ignored."""
    import logging

    if any(k.startswith("cls_norm.") for k in sd):  # untie_cls_and_patch_norms: CLS normed apart
        raise ModelLoadError(
            "this checkpoint normalises its CLS token with a norm of its own (cls_norm), which "
            "transformers' DINOv3 does not have",
            "use a released DINOv3 ViT checkpoint",
        )
    if any(k.startswith("local_cls_norm.") for k in sd):
        logging.getLogger("dinocache").info(
            "ignoring local_cls_norm: Meta's forward applies it to local crops in training only"
        )
    periods = sd.get("rope_embed.periods")
    if periods is not None:
        head_dim = config.hidden_size // config.num_attention_heads
        # RopePositionEmbedding._init_weights (dinov3/layers/rope_position_encoding.py)
        expected = ROPE_THETA ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
        if periods.shape != expected.shape or not torch.allclose(periods.double(), expected, rtol=1e-4):
            raise ModelLoadError(
                f"the checkpoint's RoPE periods are not those of base {ROPE_THETA:g} (min/max period)",
                "this checkpoint's position encoding is not supported; convert it with transformers' script",
            )


def official_to_transformers(sd: dict[str, torch.Tensor], layer_prefix: str) -> dict[str, torch.Tensor]:
    """Rename (and split the fused qkv of) an official state dict; `layer_prefix` is the
    transformers version's block prefix ("model.layer." in 5.x, "layer." before)."""
    out = {
        "embeddings.cls_token": sd["cls_token"].reshape(1, 1, -1),
        "embeddings.mask_token": sd["mask_token"].reshape(1, 1, -1),
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    if "storage_tokens" in sd:
        out["embeddings.register_tokens"] = sd["storage_tokens"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", f"{layer_prefix}{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3, dim=0)
        out[h + "attention.q_proj.weight"], out[h + "attention.k_proj.weight"], out[h + "attention.v_proj.weight"] = (
            q,
            k,
            v,
        )
        if b + "attn.qkv.bias" in sd:
            qb, kb, vb = sd[b + "attn.qkv.bias"].chunk(3)
            out[h + "attention.q_proj.bias"], out[h + "attention.v_proj.bias"] = qb, vb
            if b + "attn.qkv.bias_mask" not in sd:  # an unmasked key bias is real
                out[h + "attention.k_proj.bias"] = kb
        renames = [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj")]
        renames += (
            [("mlp.w1", "mlp.gate_proj"), ("mlp.w2", "mlp.up_proj"), ("mlp.w3", "mlp.down_proj")]
            if b + "mlp.w1.weight" in sd
            else [("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj")]
        )
        for src, dst in renames:
            for suffix in ("weight", "bias"):
                if f"{b}{src}.{suffix}" in sd:
                    out[f"{h}{dst}.{suffix}"] = sd[f"{b}{src}.{suffix}"]
        out[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return out


def model_from_state_dict(path: str, sd: dict, dtype: torch.dtype):
    """(DINOv3ViTModel, config) from an official DINOv3 state dict."""
    from transformers import DINOv3ViTModel

    config = official_config(sd)
    _check_training_only_parts(sd, config)
    model = DINOv3ViTModel._from_config(config, dtype=dtype)
    prefix = "model.layer." if any(k.startswith("model.layer.") for k in model.state_dict()) else "layer."
    converted = official_to_transformers(sd, prefix)
    expected = set(model.state_dict())
    unknown = sorted(
        k for k in sd if not k.startswith(IGNORED) and not k.endswith("bias_mask") and not _mapped(k, converted, sd)
    )
    missing = sorted(expected - set(converted))
    if missing or unknown:
        raise ModelLoadError(
            f"{path}: keys the mapping does not cover: missing {missing[:5]}, unused {unknown[:5]}",
            "this checkpoint's layout is not supported; convert it with transformers' script",
        )
    model.load_state_dict(converted, strict=True)
    return model.eval(), config


def _mapped(key: str, converted: dict, sd: dict) -> bool:
    """Whether an official key was used by the mapping (by tensor identity)."""
    tensor = sd[key]
    if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
        return True
    return any(
        t is tensor or (t.data_ptr() == tensor.data_ptr() and t.numel() == tensor.numel()) for t in converted.values()
    )
