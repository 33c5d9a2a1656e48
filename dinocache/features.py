"""From the model's hidden states to the tensors a shard stores (one place, used by extract
and by verify --recompute so both apply the same storage options)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import split_tokens


def stored_grid(grid: tuple[int, int], pool: int) -> tuple[int, int]:
    """The patch grid after `pool` x `pool` average pooling (edge windows averaged over what exists)."""
    return math.ceil(grid[0] / pool), math.ceil(grid[1] / pool)


def pool_patches(patches: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """[B, rows*cols, D] -> [B, ceil(rows/pool)*ceil(cols/pool), D], row-major like the input."""
    if pool == 1:
        return patches
    rows, cols = grid
    x = patches.reshape(patches.shape[0], rows, cols, -1).permute(0, 3, 1, 2).float()
    x = F.avg_pool2d(x, pool, stride=pool, ceil_mode=True, count_include_pad=False)
    return x.permute(0, 2, 3, 1).flatten(1, 2).to(patches.dtype)


def stored_tensors(last_hidden: torch.Tensor, intermediates: dict[int, torch.Tensor], num_registers: int,
                   grid: tuple[int, int], pool: int = 1, keep_registers: bool = False) -> dict[str, torch.Tensor]:
    """Named [B, ...] tensors for the writer: cls, patches (pooled), registers (if kept), and for
    each requested intermediate layer k: layer{k}_cls and layer{k}_patches (not normed)."""
    cls, registers, patches = split_tokens(last_hidden, num_registers, grid)
    out = {"cls": cls, "patches": pool_patches(patches, grid, pool)}
    if keep_registers:
        out["registers"] = registers
    for k, hidden in intermediates.items():
        layer_cls, _, layer_patches = split_tokens(hidden, num_registers, grid)
        out[f"layer{k}_cls"] = layer_cls
        out[f"layer{k}_patches"] = pool_patches(layer_patches, grid, pool)
    return out
