"""Loading a model: peak host memory, peak GPU memory and time, lean vs the ordinary path.

  lean       dinocache's load_model: built (or loaded) in the compute dtype on its device
  ordinary   what 0.1 did: build in float32 on the host, then cast and move

Each measurement runs in a fresh process (peak RSS is per process).

    python scripts/bench_load.py --arch vith16plus --dtype bfloat16            # CPU: host memory
    python scripts/bench_load.py --arch vitl16 vith16plus vit7b16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {repo!r})
from dinocache.model import load_model, random_config
arch, dtype, device, mode = {arch!r}, {dtype!r}, {device!r}, {mode!r}
began = time.perf_counter()
if mode == "lean":
    loaded = load_model("random:" + arch, device=device, dtype=dtype)
    model = loaded.model
else:
    from transformers import DINOv3ViTModel
    torch.manual_seed(0)
    model = DINOv3ViTModel(random_config(arch)).to(device=device, dtype=getattr(torch, dtype)).eval()
if device.startswith("cuda"):
    torch.cuda.synchronize()
out = {{"arch": arch, "mode": mode, "dtype": dtype, "device": device, "seconds": time.perf_counter() - began,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9}}
if device.startswith("cuda"):
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
print("RESULT", json.dumps(out))
"""


def measure(arch: str, dtype: str, device: str, mode: str) -> dict:
    code = CHILD.format(repo=str(REPO), arch=arch, dtype=dtype, device=device, mode=mode)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"arch": arch, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["vith16plus"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", default=["ordinary", "lean"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(f"CPU: {cpu}; device {args.device}; dtype {args.dtype}")
    rows = []
    for arch in args.arch:
        for mode in args.modes:
            row = measure(arch, args.dtype, args.device, mode)
            rows.append(row)
            if "error" in row:
                print(f"{arch:>11} {mode:>9}: failed: {row['error']}")
                continue
            gpu = f", peak GPU {row['peak_gpu_gb']:.1f} GB" if "peak_gpu_gb" in row else ""
            print(
                f"{arch:>11} {mode:>9}: {row['params_b']:.2f} B params, peak host RSS {row['peak_rss_gb']:.2f} GB"
                f"{gpu}, {row['seconds']:.1f} s",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
