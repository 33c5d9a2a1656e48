"""How precisely each flavour comes back from each storage dtype, against the fp32 forward.

    python scripts/bench_flavours.py                      # examples/images, the ViT-S-sized model below

A small random DINOv3 (ViT-S width, 4 blocks) whose final LayerNorm has a real affine: weights
|N(1, 0.5)| clipped to >= 0.05 with channel 0 at 0.12 (the issue's example), biases N(0, 0.3).
The images are extracted with fp32 compute into one cache per storage dtype, then every flavour
is read back with `FeatureCache(flavour=...)` (default dtype, and dtype=float32) and compared,
token by token (cls, registers, patches), with the same model's fp32 forward on the same pixels
(dinocache's decode path): normed = last_hidden_state, ln_noaffine = layer_norm(h) without the
affine, prenorm = h = hidden_states[-1].

Errors: max abs; rel = ||got - ref|| / ||ref|| over every token; worst token = the largest
||err|| / ||ref|| of one token (what a cosine loss sees); worst channel = the largest
rms(err) / std(ref) of one channel over all tokens (what per-channel normalization sees);
w=0.12 channel = rms(err) / std(ref) at channel 0, whose norm weight is 0.12. A float32 read
is shown where the default dtype is not float32. Run it with each dinocache (e.g. a checkout
of the previous format) to compare formats.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinocache import FeatureCache  # noqa: E402
from dinocache.config import ExtractOptions, parse_bucket_config  # noqa: E402
from dinocache.extract import extract  # noqa: E402
from dinocache.imaging import Preprocessing, model_input  # noqa: E402

STORAGE = ("bfloat16", "float16", "float8_e4m3fn")
FLAVOURS = ("normed", "ln_noaffine", "prenorm")
BUCKETS = {"buckets": [[224, 224], [320, 224], [224, 320]]}


def make_model(path: Path, seed: int = 0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(
        hidden_size=384,
        num_hidden_layers=4,
        num_attention_heads=6,
        intermediate_size=1536,
        num_register_tokens=4,
        patch_size=16,
        layerscale_value=1.0,
    )
    model = DINOv3ViTModel(config)
    with torch.no_grad():
        model.embeddings.register_tokens.normal_(0, 1.0)
        model.norm.weight.copy_((1 + 0.5 * torch.randn(384)).abs().clamp_min(0.05))
        model.norm.weight[0] = 0.12
        model.norm.bias.normal_(0, 0.3)
    model.save_pretrained(path)
    return model.float().eval()


def references(model, images: Path, cache: FeatureCache) -> dict[str, dict[str, torch.Tensor]]:
    """key -> flavour -> fp32 reference tokens [1 + R + N, D] (cls, registers, patches)."""
    prep = Preprocessing.from_record(cache.manifest["preprocessing"])
    out = {}
    for key in cache.keys():
        record = cache.record(key)
        bucket = cache.manifest["buckets"][record["bucket"]]
        size = (bucket["input_width"], bucket["input_height"])
        pixels = model_input(
            (images / key).read_bytes(), tuple(record["source_size"]), tuple(record["box"]), size, prep, 1 << 62
        )
        with torch.no_grad():
            result = model(pixel_values=pixels[None].float(), output_hidden_states=True)
        h = result.hidden_states[-1][0]
        out[key] = {
            "normed": result.last_hidden_state[0],
            "ln_noaffine": F.layer_norm(h, (h.shape[-1],), eps=model.norm.eps),
            "prenorm": h,
        }
    return out


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    ref = ref.double()
    err = (got.double() - ref).abs()
    channel = err.pow(2).mean(0).sqrt() / ref.std(0)
    return {
        "max_abs": float(err.max()),
        "rel": float(err.norm() / ref.norm()),
        "worst_token": float((err.norm(dim=1) / ref.norm(dim=1)).max()),
        "worst_channel": float(channel.max()),
        "w012_channel": float(channel[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="?", type=Path, default=REPO / "examples" / "images")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dinocache-flavours-"))
    model = make_model(work / "model")
    print("| storage | flavour | read dtype | max abs | rel | worst token | worst channel | w=0.12 channel |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    refs = None
    for storage in STORAGE:
        out = work / storage
        options = ExtractOptions(
            out=out,
            buckets=parse_bucket_config(BUCKETS),
            model=str(work / "model"),
            workers=0,
            progress=False,
            dtype="float32",
            storage_dtype=storage,
            keep_registers=True,
        )
        extract(args.images, options)
        if refs is None:
            refs = references(model, args.images, FeatureCache(out))
        for flavour in FLAVOURS:
            keys = FeatureCache(out).keys()
            ref = torch.cat([refs[key][flavour] for key in keys])
            for dtype in (None, torch.float32):
                cache = FeatureCache(out, flavour=flavour, dtype=dtype)
                got = torch.cat([tokens(cache[key]) for key in keys])
                e = errors(got, ref)
                shown = str(got.dtype).removeprefix("torch.") + (" (default)" if dtype is None else "")
                print(
                    f"| {storage} | {flavour} | {shown} | {e['max_abs']:.2e} | {e['rel']:.2e} | "
                    f"{e['worst_token']:.2e} | {e['worst_channel']:.2e} | {e['w012_channel']:.2e} |",
                    flush=True,
                )
                if got.dtype == torch.float32:
                    break  # the default read is float32 already


def tokens(item: dict) -> torch.Tensor:
    """cls, registers and patches of one read item as [1 + R + N, D]."""
    dim = item["cls"].shape[-1]
    return torch.cat([item["cls"][None], item["registers"], item["patches"].reshape(-1, dim)])


if __name__ == "__main__":
    main()
