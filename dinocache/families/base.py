"""What a model family answers: everything that differs between DINOv3, DINOv2 (with or without
registers) and the next encoder, so that model loading, token splitting, `plan` and the layout
ask one object instead of testing model types. A family is one module plus one registry line
(families/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """What `plan` needs to count a forward's FLOPs without weights."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    gated: bool
    num_prefix_tokens: int  # CLS + registers
    patch_size: int


class Family:
    name: str = ""
    model_types: tuple[str, ...] = ()  # the config.model_type values it loads
    architectures: dict[str, dict] = {}  # random:<arch> -> config fields
    norm_attr: str = "norm"  # the model's attribute holding the final LayerNorm
    # where a safetensors checkpoint keeps that norm's weight (bare, or under a wrapper's prefix)
    norm_keys: tuple[str, ...] = ()
    # names in Hub ids and checkpoint file names -> random:<arch>, for `plan` without weights
    name_aliases: dict[str, str] = {}
    # the config fields that change features (the manifest records them; the rest is bookkeeping)
    config_fields: tuple[str, ...] = ()

    def random_config(self, arch: str):
        raise NotImplementedError

    def model_class(self, config) -> type:
        raise NotImplementedError

    def num_registers(self, config) -> int:
        return int(getattr(config, "num_register_tokens", 0) or 0)

    def patch_size(self, config) -> int:
        from ..errors import ModelLoadError

        p = config.patch_size
        if isinstance(p, (list, tuple)):
            if p[0] != p[1]:
                raise ModelLoadError(f"non-square patch size {p} is not supported", "use a standard checkpoint")
            p = p[0]
        return int(p)

    def shape(self, config) -> Shape:
        raise NotImplementedError

    def claims_official(self, state_dict: dict) -> bool:
        """Whether an official (non-transformers) checkpoint's tensors are this family's."""
        return False

    def official_model(self, path: str, state_dict: dict, dtype: torch.dtype):
        """(transformers model in eval mode, its config) from an official checkpoint's tensors."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Anything the loaded model needs to compute what the family's official code computes."""
        return model

    def record(self, config) -> dict:
        """Fields the manifest's model section gets for this family (DINOv3: none, as before)."""
        return {"family": self.name}
