"""Recipe presets: the preprocessing a DiT recipe's own code applies online before its encoder,
as one named option (`extract --preset NAME`). Each was read from the recipe's code at the commit
named; tests/test_presets.py re-implements each recipe's lines and compares pixels.

    repa  sihyun-yu/REPA@67f7145: images ADM-cropped to 256 (preprocessing/dataset_tools.py:168-187),
          then x / 255 -> Normalize(ImageNet) -> F.interpolate(224, bicubic), no antialias
          (train.py:39-59, the dinov2 branch): the resize comes AFTER normalizing
    rae   bytetriper/RAE@a4d18c4: ADM crop to 256 + ToTensor (src/calculate_stat.py:227-231), then
          F.interpolate(224, bicubic, align_corners=False) and (x - mean) / std
          (src/stage1/rae.py:83-86); RAE trains on the ln_noaffine flavour
    rae-siglip2  the same recipe with its SigLIP 2 encoder (configs/stage1/pretrained/SigLIP2.yaml:
          google/siglip2-base-patch16-256, encoder_input_size 256): the same crop and resize, and
          the mean/std RAE reads from that checkpoint's image processor (rae.py:38-40), 0.5
    vavae hustvl/LightningDiT@2725fed, VA-VAE's vision-foundation loss: the 256x256 image its
          dataset gives, image / 127.5 - 1 (taming-transformers@3ba01b2 taming/data/base.py:51),
          then F.interpolate(224x224, bilinear, align_corners=False), no antialias, and timm's
          vit_large_patch14_dinov2.lvd142m forward_features, CLS dropped
          (vavae/ldm/models/foundation_models.py:25, 54-57): normed patches, with timm's
          position-embedding interpolation (families/dinov2.py). The crop is ADM's centre crop;
          VA-VAE's own is albumentations' random crop, which no cache can reproduce
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .buckets import resolve_token_pixels
from .families.dinov2 import SIZE_ANTIALIAS
from .families.siglip2 import SIGLIP_MEAN, SIGLIP_STD
from .imaging import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

log = logging.getLogger("dinocache")
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preset:
    name: str
    resize: str  # the crop (buckets.RESIZE_MODES)
    resample: str  # the resize to the encoder's input
    antialias: bool
    normalize_first: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    flavour: str  # what the recipe trains against (read with FeatureCache(flavour=...))
    families: tuple[str, ...] = ("dinov3", "dinov2")  # the model families whose inputs it makes
    pos_embed_interpolation: str | None = None  # the recipe's encoder's, when not the family's own


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("repa", "adm", "bicubic", False, True, IMAGENET_MEAN, IMAGENET_STD, "normed"),
        Preset("rae", "adm", "bicubic", False, False, IMAGENET_MEAN, IMAGENET_STD, "ln_noaffine"),
        Preset("rae-siglip2", "adm", "bicubic", False, False, SIGLIP_MEAN, SIGLIP_STD, "ln_noaffine", ("siglip2",)),
        # image / 127.5 - 1 is (x - 0.5) / 0.5; normalised before the resize, as VA-VAE's dataset does
        Preset("vavae", "adm", "bilinear", False, True, HALF, HALF, "normed", ("dinov2",), SIZE_ANTIALIAS),
    )
}


def preset(name: str) -> Preset:
    from .errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}", f"use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def check_no_crops(name: str, crops) -> None:
    """A preset crops as its recipe does; a --crops file would give other boxes."""
    from .errors import ConfigError

    preset(name)
    if crops is not None:
        raise ConfigError(
            f"--preset {name} crops as its recipe does (ADM's centre crop), and --crops gives each image a box",
            "use one of them: drop --crops, or drop --preset",
        )


# The one bucket a recipe's code is defined for, where it has only one (LightningDiT's VA-VAE
# trains at 256x256: vavae/configs, docs/TRAINING.md).
RECIPE_SIZES = {"vavae": (256, 256)}


def warn_about_sizes(name: str | None, sizes: list[tuple[int, int]]) -> None:
    """A preset used with buckets its recipe never trains at still extracts, with a warning."""
    wanted = RECIPE_SIZES.get(name or "")
    other = sorted({tuple(s) for s in sizes} - {wanted}) if wanted else []
    if other:
        log.warning(
            "--preset %s reproduces a recipe defined at %dx%d only; buckets %s are not what it trains on "
            "(use -b configs/adm-256.yaml)",
            name,
            *wanted,
            ", ".join(f"{w}x{h}" for w, h in other[:4]) + (" ..." if len(other) > 4 else ""),
        )


def build_preprocessing(
    mspec,
    resize: str,
    jpeg_draft: bool = False,
    preset_name: str | None = None,
    token_pixels: int | None = None,
    image_mean=None,
    image_std=None,
) -> Preprocessing:
    """The Preprocessing extract and plan use: the bucket config's resize and the model's
    mean/std, or a preset's crop, resize and mean/std (explicit --image-mean/--image-std win),
    and the DiT token size for an encoder whose patch is not 16 pixels."""
    token_px = resolve_token_pixels(token_pixels, mspec.patch_size)
    if preset_name is None:
        return Preprocessing(mspec.image_mean, mspec.image_std, resize, jpeg_draft, token_pixels=token_px)
    p = preset(preset_name)
    family = mspec.family.name
    if family not in p.families:
        from .errors import ConfigError

        fitting = [q.name for q in PRESETS.values() if family in q.families]
        raise ConfigError(
            f"--preset {p.name} makes the inputs of a {' or '.join(p.families)} encoder; "
            f"{mspec.id} is a {family} model",
            f"use --preset {' or '.join(fitting)}" if fitting else "drop --preset",
        )
    from .model import use_interpolation

    use_interpolation(mspec, p.pos_embed_interpolation)  # recorded in the manifest's model section
    if resize != p.resize:
        log.info("--preset %s crops as its recipe does (resize: %s), not with resize: %s", p.name, p.resize, resize)
    if p.name == "rae" and mspec.num_registers == 0:
        log.warning("--preset rae: RAE's encoder is a DINOv2 with registers; %s has none", mspec.id)
    if p.name == "vavae" and mspec.num_registers:
        log.warning("--preset vavae: VA-VAE's encoder is DINOv2-L/14 without registers; %s has some", mspec.id)
    return Preprocessing(
        tuple(image_mean or p.image_mean),
        tuple(image_std or p.image_std),
        p.resize,
        jpeg_draft,
        resample=p.resample,
        antialias=p.antialias,
        normalize_first=p.normalize_first,
        preset=p.name,
        token_pixels=token_px,
    )
