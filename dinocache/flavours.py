"""Target flavours: the forms of the final-layer tokens DiT recipes train against, all derived on
read from one cache (the stored tokens + the final LayerNorm's weight and bias + per-token stats):

    normed        last_hidden_state, after the final LayerNorm (REPA, REG, SVG): weight * z + bias
    ln_noaffine   z = (x - mean) / std over the channels, without weight and bias (RAE)
    prenorm       x, the last block's output before the final LayerNorm (hidden_states[-1]):
                  z * std + mean, with each token's (mean, std) from `NAME_lnstats`

A format-3 cache stores z (`storage.normed_values` "ln_noaffine"), so each flavour keeps the
storage dtype's relative precision (normed's rounding error is |weight| times z's). Formats 1
and 2 store normed; z is then (normed - bias) / weight, whose error is the dtype's precision
times |z + bias / weight| rather than |z|: large where the bias is large against the weight.

They apply to the normed features (cls, registers, patches and their `_flip` views); layer
outputs (`--layers`) are already before any final norm and are returned as stored.
"""

from __future__ import annotations

import torch

FLAVOURS = ("normed", "ln_noaffine", "prenorm")


def flavour_problem(flavour: str, stored: str, has_norm: bool, has_stats: bool, pool: int) -> str | None:
    """Why a cache whose normed features hold `stored` cannot give `flavour`, or None."""
    if flavour not in FLAVOURS:
        return f"unknown flavour {flavour!r}: use one of {', '.join(FLAVOURS)}"
    if flavour == stored:
        return None
    if not has_norm and (stored == "normed" or flavour == "normed"):
        return (
            f"the {flavour} flavour needs the final LayerNorm's parameters, which this cache (made by an "
            "older dinocache) does not record"
        )
    if flavour == "prenorm" and not has_stats:
        why = "--pool averages tokens whose statistics differ" if pool > 1 else "it was built without token statistics"
        return f"the prenorm flavour needs per-token statistics, and {why}"
    return None


def in_float32(flavour: str, stored: str) -> bool:
    """Whether `flavour` comes back in float32 rather than the storage dtype when no dtype is asked
    for: prenorm (rescaled by each token's statistics; its range is not bounded like a normed
    token's) and anything divided by the norm's weight (formats 1 and 2, as they always did)."""
    return flavour == "prenorm" or (flavour != stored and stored == "normed")


def apply_flavour(
    flavour: str,
    value: torch.Tensor,
    stored: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lnstats: torch.Tensor | None,
) -> torch.Tensor:
    """`value` [..., D] (the stored normed feature, any float dtype; `stored` says which flavour
    it holds) -> `flavour`: `value` itself if that is stored, else float32. `lnstats` [..., 2] is
    each token's (mean, std) of the norm's input; needed for prenorm."""
    if flavour == stored:
        return value
    if stored == "ln_noaffine" and flavour == "normed":
        return affine(value.to(torch.float32, copy=True), weight, bias)
    z = value.float() if stored == "ln_noaffine" else (value.float() - bias) / weight
    if flavour == "ln_noaffine":
        return z
    return z * lnstats[..., 1:2] + lnstats[..., 0:1]


def affine(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """weight * z + bias in place on a float32 `z`: one rounding per operation, in the same order
    as the reader's chunked batch path, so both give identical values."""
    return z.mul_(weight).add_(bias)
