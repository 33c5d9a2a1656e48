"""Target flavours: the forms of the final-layer tokens DiT recipes train against, all derived on
read from one cache (normed tokens + the final LayerNorm's weight and bias + per-token stats):

    normed        what the cache stores: last_hidden_state, after the final LayerNorm (REPA, REG, SVG)
    ln_noaffine   (x - mean) / std over the channels, without weight and bias (RAE):
                  (normed - bias) / weight
    prenorm       x, the last block's output before the final LayerNorm (hidden_states[-1]):
                  ln_noaffine * std + mean, with each token's (mean, std) from `NAME_lnstats`

They apply to the normed features (cls, registers, patches and their `_flip` views); layer
outputs (`--layers`) are already before any final norm and are returned as stored.
"""

from __future__ import annotations

import torch

FLAVOURS = ("normed", "ln_noaffine", "prenorm")


def flavour_problem(flavour: str, has_norm: bool, has_stats: bool, pool: int) -> str | None:
    """Why a cache cannot give `flavour`, or None."""
    if flavour not in FLAVOURS:
        return f"unknown flavour {flavour!r}: use one of {', '.join(FLAVOURS)}"
    if flavour == "normed":
        return None
    if not has_norm:
        return (
            f"the {flavour} flavour needs the final LayerNorm's parameters, which this cache (made by an "
            "older dinocache) does not record"
        )
    if flavour == "prenorm" and not has_stats:
        why = "--pool averages tokens whose statistics differ" if pool > 1 else "it was built without token statistics"
        return f"the prenorm flavour needs per-token statistics, and {why}"
    return None


def apply_flavour(
    flavour: str, normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lnstats: torch.Tensor | None
) -> torch.Tensor:
    """`normed` [..., D] (any float dtype) -> the flavour, float32. `lnstats` [..., 2] is each
    token's (mean, std) of the norm's input; needed for prenorm."""
    if flavour == "normed":
        return normed
    z = (normed.float() - bias) / weight
    if flavour == "ln_noaffine":
        return z
    return z * lnstats[..., 1:2] + lnstats[..., 0:1]
