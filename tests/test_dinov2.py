"""DINOv2 (with and without registers) through the model-family seam.

The reference for the models without registers is Meta's own position-embedding interpolation,
copied below from facebookresearch/dinov2@b8931f7 (dinov2/models/vision_transformer.py:180-212):
transformers' Dinov2Model interpolates by size without Meta's 0.1 offset, so its plain forward
is NOT the official model's at grids other than the pretraining one."""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from dinocache.model import load_model

PIXELS = torch.randn(2, 3, 56, 84, generator=torch.Generator().manual_seed(4))  # a 4x6 grid of 14-px patches


def tiny_dinov2(registers: bool, swiglu: bool = False, seed: int = 0, hidden: int = 64, heads: int = 4):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    fields = dict(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        patch_size=14,
        image_size=98,
        use_swiglu_ffn=swiglu,
    )
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **fields))
    else:
        model = Dinov2Model(Dinov2Config(**fields))
    with torch.no_grad():  # non-trivial values everywhere a conversion can go wrong
        for name, p in model.named_parameters():
            if "norm" in name or "lambda" in name:
                p.uniform_(0.5, 1.5) if name.endswith(("weight", "lambda1")) else p.normal_(0, 0.3)
            elif name.endswith("bias") or "token" in name or "position" in name:
                p.normal_(0, 0.5)
    return model.eval()


def meta_interpolate_pos_encoding(self, x, w, h, interpolate_offset=0.1, interpolate_antialias=False):
    """dinov2/models/vision_transformer.py:180-212, with `self.pos_embed` read from transformers'
    embeddings. `w`, `h` are the input's dims 2 and 3, as in prepare_tokens_with_masks."""
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = self.position_embeddings.shape[1] - 1
    if npatch == N and w == h:
        return self.position_embeddings
    pos_embed = self.position_embeddings.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // 14
    h0 = h // 14
    M = int(math.sqrt(N))
    assert N == M * M
    kwargs = {}
    if interpolate_offset:
        sx = float(w0 + interpolate_offset) / M
        sy = float(h0 + interpolate_offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=interpolate_antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def official_forward(model, pixels, registers: bool):
    """transformers' forward with Meta's interpolation (offset 0.1 without registers; size and
    antialias with registers, hub/backbones.py:98-154)."""
    emb = model.embeddings
    original = emb.interpolate_pos_encoding
    offset, antialias = (0.0, True) if registers else (0.1, False)
    emb.interpolate_pos_encoding = types.MethodType(
        lambda self, x, h, w: meta_interpolate_pos_encoding(self, x, h, w, offset, antialias), emb
    )
    try:
        with torch.no_grad():
            return model(pixel_values=pixels).last_hidden_state
    finally:
        emb.interpolate_pos_encoding = original


@pytest.mark.parametrize("registers", [False, True])
def test_a_transformers_dinov2_folder_gives_the_official_models_features(tmp_path, registers):
    model = tiny_dinov2(registers)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.num_registers == (4 if registers else 0) and loaded.patch_size == 14
    got = loaded.forward(PIXELS)
    expected = official_forward(model, PIXELS, registers)
    assert got.shape == expected.shape == (2, 1 + loaded.num_registers + 24, 64)
    assert (got - expected).abs().max() < 1e-5
    if not registers:  # why the seam patches it: transformers' own interpolation differs
        with torch.no_grad():
            plain = model(pixel_values=PIXELS).last_hidden_state
        assert (plain - expected).abs().max() > 1e-3


def to_official(model) -> dict:
    """transformers' DINOv2 in the layout of Meta's torch.hub checkpoints (the mapping's inverse)."""
    sd, cfg = model.state_dict(), model.config
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(cfg.num_hidden_layers):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{b}attn.qkv.{s}"] = torch.cat([sd[f"{h}attention.{x}_proj.{s}"] for x in "qkv"])
            out[f"{b}attn.proj.{s}"] = sd[f"{h}attention.o_proj.{s}"]
            out[f"{b}norm1.{s}"], out[f"{b}norm2.{s}"] = sd[f"{h}norm1.{s}"], sd[f"{h}norm2.{s}"]
            if cfg.use_swiglu_ffn:
                out[f"{b}mlp.w12.{s}"] = torch.cat([sd[f"{h}mlp.gate_proj.{s}"], sd[f"{h}mlp.up_proj.{s}"]])
                out[f"{b}mlp.w3.{s}"] = sd[f"{h}mlp.down_proj.{s}"]
            else:
                out[f"{b}mlp.fc1.{s}"], out[f"{b}mlp.fc2.{s}"] = sd[f"{h}mlp.fc1.{s}"], sd[f"{h}mlp.fc2.{s}"]
        out[f"{b}ls1.gamma"], out[f"{b}ls2.gamma"] = sd[f"{h}layer_scale1.lambda1"], sd[f"{h}layer_scale2.lambda1"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("registers, swiglu", [(False, False), (True, False), (False, True)])
def test_an_official_dinov2_pth_equals_the_transformers_path(tmp_path, registers, swiglu):
    model = tiny_dinov2(registers, swiglu, seed=1, hidden=384, heads=6)  # Meta's widths: ViT-S
    model.save_pretrained(tmp_path / "hf")
    name = f"dinov2_vitb14{'_reg4' if registers else ''}_pretrain.pth"
    torch.save(to_official(model), tmp_path / name)
    official = load_model(str(tmp_path / name), device="cpu", dtype="float32")
    folder = load_model(str(tmp_path / "hf"), device="cpu", dtype="float32")
    assert official.config == folder.config
    assert torch.equal(official.forward(PIXELS), folder.forward(PIXELS))
    assert (official.forward(PIXELS) - official_forward(model, PIXELS, registers)).abs().max() < 1e-5


def test_random_dinov2_architectures_have_metas_shapes():
    """dinov2/hub/backbones.py: ViT-S/B/L/g 14, ViT-g with the fused SwiGLU, 4 registers for _reg."""
    from dinocache.model import random_config

    expected = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
    for arch, (dim, depth, heads) in expected.items():
        for reg in ("", "_reg"):
            c = random_config(f"dinov2_{arch}{reg}")
            assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size) == (dim, depth, heads, 14)
            assert getattr(c, "num_register_tokens", 0) == (4 if reg else 0)
            assert bool(c.use_swiglu_ffn) == (arch == "vitg14") and c.image_size == 518
