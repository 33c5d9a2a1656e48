"""Official Meta .pth checkpoints load by key mapping and give the same outputs.

The first test is the one that proves fidelity: Meta's forward is re-implemented here from
facebookresearch/dinov3 (commit 6876159) and run on the official state dict itself, so a wrong
mapping or a wrong config (an activation, a bias, a norm) cannot cancel out as it can in a
round trip through transformers."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from dinocache.errors import ModelLoadError
from dinocache.model import load_model


def to_official(model) -> dict:
    """Write a transformers DINOv3 in the official repo's layout (the inverse of the mapping)."""
    sd = model.state_dict()
    prefix = "model.layer." if any(k.startswith("model.layer.") for k in sd) else "layer."
    depth = model.config.num_hidden_layers
    out = {
        "cls_token": sd["embeddings.cls_token"].clone(),
        "storage_tokens": sd["embeddings.register_tokens"].clone(),
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1).clone(),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"].clone(),
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"].clone(),
        "norm.weight": sd["norm.weight"].clone(),
        "norm.bias": sd["norm.bias"].clone(),
        "rope_embed.periods": rope_periods(model.config.hidden_size // model.config.num_attention_heads),
    }
    for i in range(depth):
        h, b = f"{prefix}{i}.", f"blocks.{i}."
        out[b + "attn.qkv.weight"] = torch.cat([sd[h + f"attention.{x}_proj.weight"] for x in "qkv"])
        q = sd[h + "attention.q_proj.bias"]
        out[b + "attn.qkv.bias"] = torch.cat([q, torch.full_like(q, 123.0), sd[h + "attention.v_proj.bias"]])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(q)])
        for dst, src in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj")):
            for suffix in ("weight", "bias"):
                out[f"{b}{dst}.{suffix}"] = sd[f"{h}{src}.{suffix}"].clone()
        mlp = (
            [("mlp.w1", "mlp.gate_proj"), ("mlp.w2", "mlp.up_proj"), ("mlp.w3", "mlp.down_proj")]
            if model.config.use_gated_mlp
            else [("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj")]
        )
        for dst, src in mlp:
            for suffix in ("weight", "bias"):
                out[f"{b}{dst}.{suffix}"] = sd[f"{h}{src}.{suffix}"].clone()
        out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"].clone()
        out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"].clone()
    return out


# ---- Meta's architecture, re-implemented from its source -------------------------------------


def rope_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """dinov3/layers/rope_position_encoding.py, RopePositionEmbedding._init_weights (base form)."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def meta_rope(periods: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RopePositionEmbedding.forward in eval mode, normalize_coords="separate" (every released ViT)."""
    coords_h = torch.arange(0.5, H) / H
    coords_w = torch.arange(0.5, W) / W
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def meta_rope_apply(x, sin, cos):
    """dinov3/layers/attention.py: rope_apply with rope_rotate_half."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def meta_forward_features(sd: dict, pixels: torch.Tensor, num_heads: int, eps: float = 1e-5) -> torch.Tensor:
    """x_norm (CLS, storage tokens, patches) of dinov3/models/vision_transformer.py
    DinoVisionTransformer.forward_features in eval mode, from the official state dict:
    prepare_tokens_with_masks (cls_token + 0 * mask_token, storage tokens, patches), then each
    SelfAttentionBlock._forward (layers/block.py: x + ls1(attn(norm1 x)), x + ls2(mlp(norm2 x))),
    SelfAttention with LinearKMaskedBias (bias * bias_mask) and RoPE on the patch tokens only,
    Mlp (fc1, nn.GELU, fc2) or SwiGLUFFN (w3(silu(w1 x) * w2 x), layers/ffn_layers.py:59-63),
    and the final norm ("layernormbf16": LayerNorm eps 1e-5)."""
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    B, D, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = sd["cls_token"] + 0 * sd["mask_token"]
    x = torch.cat([cls.expand(B, -1, -1), sd["storage_tokens"].expand(B, -1, -1), x], dim=1)
    N, head = x.shape[1], D // num_heads
    sin, cos = meta_rope(sd["rope_embed.periods"], H, W)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv_bias = sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"]
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], qkv_bias).reshape(B, N, 3, num_heads, head)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        prefix = N - H * W
        q = torch.cat([q[:, :, :prefix], meta_rope_apply(q[:, :, prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :prefix], meta_rope_apply(k[:, :, prefix:], sin, cos)], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + F.linear(attn, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]) * sd[b + "ls1.gamma"]
        y = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        if b + "mlp.w1.weight" in sd:
            gate = F.silu(F.linear(y, sd[b + "mlp.w1.weight"], sd[b + "mlp.w1.bias"]))
            hidden = gate * F.linear(y, sd[b + "mlp.w2.weight"], sd[b + "mlp.w2.bias"])
            y = F.linear(hidden, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            hidden = F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
            y = F.linear(hidden, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + y * sd[b + "ls2.gamma"]
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps)


def random_official_state_dict(
    gated: bool, dim: int = 384, depth: int = 2, ffn_ratio: float = 4.0, seed: int = 0, local_cls_norm=False
) -> dict:
    """An official-layout state dict with non-trivial random values wherever a conversion can go
    wrong: every bias (the key part of qkv too, masked as LinearKMaskedBias masks it), layer
    scales far from 1, norm affines far from identity, storage tokens, and the RoPE periods."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd = {
        "cls_token": rnd(1, 1, dim),
        "storage_tokens": rnd(1, 4, dim),
        "mask_token": rnd(1, dim),
        "patch_embed.proj.weight": rnd(dim, 3, 16, 16, scale=0.05),
        "patch_embed.proj.bias": rnd(dim, scale=0.5),
        "norm.weight": rnd(dim, scale=0.5, offset=1.0),
        "norm.bias": rnd(dim, scale=0.5),
        "rope_embed.periods": rope_periods(dim // 6),
    }
    if local_cls_norm:
        sd |= {"local_cls_norm.weight": rnd(dim, offset=1.0), "local_cls_norm.bias": rnd(dim)}
    hidden = int(dim * ffn_ratio)
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": rnd(dim, scale=0.3, offset=1.0),
            b + "norm1.bias": rnd(dim, scale=0.3),
            b + "attn.qkv.weight": rnd(3 * dim, dim, scale=dim**-0.5),
            b + "attn.qkv.bias": rnd(3 * dim, scale=0.5),  # the key third is nonzero: it must stay masked
            b + "attn.qkv.bias_mask": torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]),
            b + "attn.proj.weight": rnd(dim, dim, scale=dim**-0.5),
            b + "attn.proj.bias": rnd(dim, scale=0.3),
            b + "ls1.gamma": rnd(dim, scale=0.3, offset=0.5),
            b + "ls2.gamma": rnd(dim, scale=0.3, offset=0.5),
            b + "norm2.weight": rnd(dim, scale=0.3, offset=1.0),
            b + "norm2.bias": rnd(dim, scale=0.3),
        }
        if gated:  # SwiGLUFFN: hidden = 2/3 of ffn_ratio * dim, rounded up to a multiple of 8
            d = int(hidden * 2 / 3)
            d += -d % 8
            for name, shape in (("w1", (d, dim)), ("w2", (d, dim)), ("w3", (dim, d))):
                sd[f"{b}mlp.{name}.weight"] = rnd(*shape, scale=shape[1] ** -0.5)
                sd[f"{b}mlp.{name}.bias"] = rnd(shape[0], scale=0.3)
        else:
            for name, shape in (("fc1", (hidden, dim)), ("fc2", (dim, hidden))):
                sd[f"{b}mlp.{name}.weight"] = rnd(*shape, scale=shape[1] ** -0.5)
                sd[f"{b}mlp.{name}.bias"] = rnd(shape[0], scale=0.3)
    return sd


@pytest.mark.parametrize(
    "name, gated, local_cls_norm",
    [
        ("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", False, False),
        ("dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", True, False),
        # ViT-7B/16 and ViT-L/16 SAT-493M carry a local_cls_norm (hub/backbones.py); eval ignores it
        ("dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth", True, True),
    ],
)
def test_official_checkpoint_equals_metas_forward(tmp_path, name, gated, local_cls_norm):
    """ViT-S/16 (MLP, GELU) and ViT-S+/16 (SwiGLU, SiLU) shapes, 2 blocks, within 1e-4 in fp32."""
    sd = random_official_state_dict(gated, ffn_ratio=6.0 if gated else 4.0, local_cls_norm=local_cls_norm)
    path = tmp_path / name
    torch.save(sd, path)  # Meta's released files are flat state dicts
    loaded = load_model(str(path), device="cpu", dtype="float32")
    pixels = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = meta_forward_features(sd, pixels, num_heads=6)
    got = loaded.forward(pixels)
    assert got.shape == expected.shape == (2, 1 + 4 + 3 * 4, 384)
    assert (got - expected).abs().max().item() < 1e-4
    assert loaded.config["hidden_act"] == ("silu" if gated else "gelu")


def test_a_checkpoint_whose_parts_transformers_cannot_express_is_refused(tmp_path):
    sd = random_official_state_dict(False, depth=1)
    cases = {
        "cls_norm": sd | {"cls_norm.weight": torch.ones(384), "cls_norm.bias": torch.zeros(384)},
        "mask": sd | {"blocks.0.attn.qkv.bias_mask": torch.ones(3 * 384)},
        "periods": sd | {"rope_embed.periods": torch.ones(16)},
    }
    for what, state in cases.items():
        path = tmp_path / f"{what}.pth"
        torch.save(state, path)
        with pytest.raises(ModelLoadError, match={"cls_norm": "cls_norm", "mask": "mask", "periods": "RoPE"}[what]):
            load_model(str(path), device="cpu", dtype="float32")


def test_an_unmasked_key_bias_is_kept(tmp_path):
    """A checkpoint without bias_mask (mask_k_bias=False) uses its key bias: dropping it would
    change every attention score."""
    sd = random_official_state_dict(False, depth=1)
    sd = {k: v for k, v in sd.items() if not k.endswith("bias_mask")}
    path = tmp_path / "unmasked.pth"
    torch.save(sd, path)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    reference = dict(sd) | {"blocks.0.attn.qkv.bias_mask": torch.ones(3 * 384)}
    pixels = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = meta_forward_features(reference, pixels, num_heads=6)
    assert (loaded.forward(pixels) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("gated", [False, True])
def test_official_checkpoint_gives_identical_outputs(tmp_path, gated):
    """Round trip through transformers' own model (the mapping's inverse): bit-exact."""
    from transformers import DINOv3ViTModel

    torch.manual_seed(3)
    act = "silu" if gated else "gelu"
    reference = DINOv3ViTModel(
        tiny_config(use_gated_mlp=gated, hidden_act=act, num_attention_heads=6, hidden_size=384, intermediate_size=256)
    ).eval()
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-00000000.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in to_official(reference).items()}}, path)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    assert loaded.num_registers == 4 and loaded.config["use_gated_mlp"] is gated
    pixels = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
    assert torch.equal(loaded.forward(pixels), expected)


def test_not_a_dinov3_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ModelLoadError, match="official DINOv3 or DINOv2 ViT"):
        load_model(str(path), device="cpu")
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(str(tmp_path / "garbage.pth"), device="cpu")


# hub/backbones.py (dinov3 6876159): embed_dim, depth, num_heads, ffn_ratio, ffn_layer per released ViT
META_BACKBONES = {
    "vits16": (384, 12, 6, 4, "mlp"),
    "vits16plus": (384, 12, 6, 6, "swiglu"),
    "vitb16": (768, 12, 12, 4, "mlp"),
    "vitl16": (1024, 24, 16, 4, "mlp"),
    "vitl16plus": (1024, 24, 16, 6, "swiglu"),
    "vith16plus": (1280, 32, 20, 6, "swiglu"),
    "vit7b16": (4096, 40, 32, 3, "swiglu64"),
}


@pytest.mark.parametrize("arch", sorted(META_BACKBONES))
def test_random_architectures_are_metas(arch):
    """random:ARCH has Meta's shapes and activation: SwiGLUFFN (silu gate, hidden 2/3 of
    ffn_ratio * dim rounded up to align_to) or Mlp (GELU)."""
    from dinocache.model import random_config

    dim, depth, heads, ratio, ffn = META_BACKBONES[arch]
    config = random_config(arch)
    if ffn == "mlp":
        inner, act, gated = int(dim * ratio), "gelu", False
    else:
        align = int(ffn.removeprefix("swiglu") or 8)
        d = int(int(dim * ratio) * 2 / 3)
        inner, act, gated = d + (-d % align), "silu", True
    got = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)
    assert got == (dim, depth, heads, inner)
    assert (config.hidden_act, config.use_gated_mlp, config.num_register_tokens) == (act, gated, 4)
