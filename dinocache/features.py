"""From pixels to the named feature tensors a shard stores (one place, used by extract and by
verify --recompute, so both apply the same layout): forward, token split, the final norm without
its affine (what format 3 stores), final-norm statistics, --pool, --layers, and the mirrored view
for --flip. Names follow layout.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import Layout
from .model import LoadedModel, Tokens, split_tokens


def pool_patches(patches: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """[B, rows*cols, D] -> [B, ceil(rows/pool)*ceil(cols/pool), D], row-major like the input."""
    if pool == 1:
        return patches
    rows, cols = grid
    x = patches.reshape(patches.shape[0], rows, cols, -1).permute(0, 3, 1, 2).float()
    x = F.avg_pool2d(x, pool, stride=pool, ceil_mode=True, count_include_pad=False)
    return x.permute(0, 2, 3, 1).flatten(1, 2).to(patches.dtype)


def token_stats(prenorm: torch.Tensor, eps: float) -> torch.Tensor:
    """Per token (mean, std) of the final LayerNorm's input, float32 [B, T, 2], with
    std = sqrt(var + eps) (biased variance, as LayerNorm uses), so that
    ln_noaffine = (x - mean) / std and x = ln_noaffine * std + mean."""
    x = prenorm.float()
    var, mean = torch.var_mean(x, dim=-1, unbiased=False)
    return torch.stack([mean, torch.sqrt(var + eps)], dim=-1)


def normed_values(tokens: Tokens, prenorm: torch.Tensor, layout: Layout, eps: float) -> torch.Tensor:
    """What the layout stores for the final-norm tokens: the final LayerNorm's output without its
    affine, computed from its float32 input `prenorm` (format 3), or with it (formats 1 and 2)."""
    if layout.normed_values == "normed":
        return tokens.normed
    z = F.layer_norm(prenorm, (prenorm.shape[-1],), eps=eps)
    # A token whose normed output is not finite (a damaged norm weight, a float16 overflow) is
    # marked so, and its image becomes a recorded failure, as when normed itself was stored.
    return z.masked_fill(~torch.isfinite(tokens.normed), float("nan"))


def feature_tensors(
    tokens: Tokens, num_registers: int, grid: tuple[int, int], layout: Layout, eps: float
) -> dict[str, torch.Tensor]:
    """Named [B, ...] tensors of one view: cls (or pooled, for a model without a CLS token),
    patches (pooled), registers (if kept), their `_lnstats` (if the layout keeps them), and
    layer{k}_cls / layer{k}_patches (not normed)."""
    has_cls = layout.summary == "cls"
    prenorm = tokens.prenorm.float()  # once, for the stored values and the statistics
    cls, registers, patches = split_tokens(normed_values(tokens, prenorm, layout, eps), num_registers, grid, has_cls)
    values = {"cls": cls, "patches": pool_patches(patches, grid, layout.pool), "registers": registers}
    values["pooled"] = tokens.pooled
    stats = None
    if layout.ln_stats:
        split = split_tokens(token_stats(prenorm, eps), num_registers, grid, has_cls)
        stats = dict(zip(("cls", "registers", "patches"), split))
    out = {}
    for feature in layout.features():
        if feature.name in values:
            out[feature.name] = values[feature.name]
            if layout.has_lnstats(feature):
                out[feature.name + "_lnstats"] = stats[feature.name]
    for k, hidden in tokens.layers.items():
        layer_cls, _, layer_patches = split_tokens(hidden, num_registers, grid, has_cls)
        if has_cls:
            out[f"layer{k}_cls"] = layer_cls
        out[f"layer{k}_patches"] = pool_patches(layer_patches, grid, layout.pool)
    return out


def stored_features(
    loaded: LoadedModel, pixels: torch.Tensor, grid: tuple[int, int], layout: Layout
) -> dict[str, torch.Tensor]:
    """Every tensor a shard row holds for a batch of model inputs [B, 3, H, W] (before the
    storage cast): the plain view, and with `layout.flip` the view of the horizontally mirrored
    input, whose names end in `_flip` (its patches in its own row-major order: patch (r, c) of
    the flipped view covers column cols-1-c of the plain one)."""
    out = {}
    for view in layout.views():
        x = pixels.flip(-1) if view == "_flip" else pixels
        tokens = loaded.forward_tokens(x, layout.layers)
        for name, value in feature_tensors(tokens, loaded.num_registers, grid, layout, loaded.norm_eps).items():
            out[_with_view(name, view)] = value
    return out


def _with_view(name: str, view: str) -> str:
    """patches + _flip -> patches_flip; patches_lnstats + _flip -> patches_flip_lnstats."""
    if name.endswith("_lnstats"):
        return name[: -len("_lnstats")] + view + "_lnstats"
    return name + view
