"""What a model family answers: everything that differs between DINOv3, DINOv2 (with or without
registers) and the next encoder, so that model loading, token splitting, `plan` and the layout
ask one object instead of testing model types. A family is one module plus one registry line
(families/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..imaging import IMAGENET_MEAN, IMAGENET_STD


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
    # the single-token feature a shard stores: "cls" (the CLS token, normed like the patches) or
    # "pooled" (an attention-pooling head's output, for a model without a CLS token: SigLIP)
    summary: str = "cls"
    # mean and std when the checkpoint has no preprocessor_config.json (random:<arch> included)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
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

    def num_prefix_tokens(self, config) -> int:
        """Tokens before the patches: CLS (if the model has one) and the registers."""
        return int(self.summary == "cls") + self.num_registers(config)

    def encoder_config(self, config):
        """The config of the vision tower the family runs (a SigLIP checkpoint holds a text one too)."""
        return config

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

    # the position-embedding interpolations a recipe may ask for instead of the family's own
    # (ModelSpec.pos_embed_interpolation; DINOv2: timm's, for VA-VAE)
    interpolations: tuple[str, ...] = ()

    def prepare(self, model: torch.nn.Module, interpolation: str | None = None) -> torch.nn.Module:
        """Anything the loaded model needs to compute what the family's official code computes
        (or, given one of `interpolations`, what the recipe's code computes)."""
        return model

    def tokens(self, model: torch.nn.Module, final_norm: torch.nn.Module, pixels: torch.Tensor, hidden_states: bool):
        """(prenorm, normed, hidden_states or None, pooled or None) of one forward of `model`
        (whose own final norm is an Identity) on pixels [B, 3, H, W]."""
        out = model(pixel_values=pixels, output_hidden_states=hidden_states)
        prenorm = out.last_hidden_state  # the model's norm is an Identity: the last block's output
        return prenorm, final_norm(prenorm), out.hidden_states, None

    def record(self, config, interpolation: str | None = None) -> dict:
        """Fields the manifest's model section gets for this family (DINOv3: none, as before)."""
        return {"family": self.name}
