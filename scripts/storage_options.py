"""Size on disk and fidelity of each storage option, measured side by side on one image folder.

    python scripts/storage_options.py examples/images --model random:vitb16

Every option is extracted from the same pixels with fp32 compute; fidelity is the per-token
cosine similarity of the stored tokens against bf16 storage (the default) and against fp32.
Pooled caches are compared with the same pooling applied to the reference: pooling is lossy by
design (4x fewer tokens), so the cosine only shows that nothing else is lost.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinocache import FeatureCache  # noqa: E402
from dinocache.config import ExtractOptions, load_bucket_config  # noqa: E402
from dinocache.extract import extract  # noqa: E402
from dinocache.model import load_model  # noqa: E402

OPTIONS = {
    "bfloat16 (default)": {},
    "float32": {"storage_dtype": "float32"},
    "float16": {"storage_dtype": "float16"},
    "float8_e4m3fn + per-row scale": {"storage_dtype": "float8_e4m3fn"},
    "--pool 2 (bf16)": {"pool": 2},
    "--keep-registers (bf16)": {"keep_registers": True},
    "--layers 6 (bf16)": {"layers": (6,)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument(
        "--buckets", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "example-small.yaml"
    )
    parser.add_argument("--model", default="random:vitb16")
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    config = load_bucket_config(args.buckets)
    caches = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in OPTIONS.items():
            out = Path(tmp) / str(len(caches))
            extract(
                args.images,
                ExtractOptions(
                    out=out, buckets=config, model=args.model, workers=0, progress=False, dtype="float32", **extra
                ),
                loaded=loaded,
            )
            caches[name] = FeatureCache(out)
        ref_bytes = sum(s["bytes"] for s in caches["bfloat16 (default)"].manifest["shards"])
        print(f"{len(caches['float32'])} images, {args.model}, fp32 compute; per-token cosine of the stored tokens\n")
        print(
            "| option | shard bytes | vs bf16 | patch cosine vs bf16 (mean / min) | vs fp32 (mean / min) "
            "| CLS vs fp32 (min) |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, cache in caches.items():
            size = sum(s["bytes"] for s in cache.manifest["shards"])
            row = [f"| {name} | {size:,} | {size / ref_bytes:.2f}x"]
            for ref_name in ("bfloat16 (default)", "float32"):
                patches, cls = _cosines(cache, caches[ref_name])
                row.append(f"{patches.mean():.6f} / {patches.min():.6f}")
            row.append(f"{_cosines(cache, caches['float32'])[1].min():.6f} |")
            print(" | ".join(row))


def _cosines(cache, ref):
    """Per-token cosine of patches and CLS against `ref` (pooled caches against the pooled reference)."""
    patch_cos, cls_cos = [], []
    for key in ref.keys():
        a, b = cache[key], ref[key]
        cls_cos.append(F.cosine_similarity(a["cls"].float(), b["cls"].float(), dim=0))
        pb = b["patches"].float()
        if a["patches"].shape != pb.shape:
            pb = F.avg_pool2d(pb.permute(2, 0, 1)[None], 2, ceil_mode=True, count_include_pad=False)[0].permute(1, 2, 0)
        patch_cos.append(
            F.cosine_similarity(a["patches"].float().reshape(-1, pb.shape[-1]), pb.reshape(-1, pb.shape[-1]), dim=-1)
        )
    return torch.cat(patch_cos), torch.stack(cls_cos)


if __name__ == "__main__":
    main()
