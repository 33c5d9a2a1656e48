"""Official Meta .pth checkpoints load by key mapping and give the same outputs."""

import pytest
import torch
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
        "rope_embed.periods": torch.ones(model.config.hidden_size // model.config.num_attention_heads // 4),
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


@pytest.mark.parametrize("gated", [False, True])
def test_official_checkpoint_gives_identical_outputs(tmp_path, gated):
    from transformers import DINOv3ViTModel

    torch.manual_seed(3)
    reference = DINOv3ViTModel(
        tiny_config(use_gated_mlp=gated, num_attention_heads=6, hidden_size=384, intermediate_size=256)
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
    with pytest.raises(ModelLoadError, match="official DINOv3 ViT"):
        load_model(str(path), device="cpu")
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(str(tmp_path / "garbage.pth"), device="cpu")
