"""Peak memory of `plan` and `extract` over hostile sources: it stays bounded by the images'
pixels, whatever their files hold, and nothing hangs.

Builds, in a temporary folder: a folder and a tar whose picture is a 64x64 PNG followed by a
hole of HOLE GiB (sparse: no disk is used), a list file naming /dev/zero and a FIFO (with size
hints, so nothing is stat'ed first), and a brace pattern of 10M tar names. Runs `plan` and
`extract` (random ViT-S/16, CPU, in-process decoding) over each in one fresh process, and
prints its peak RSS and each command's exit code.

    python scripts/bench_hostile_memory.py --hole-gib 3

The bound: an image's file is read only if it holds at most 64 MiB + 32 bytes per pixel of its
header (scan.max_image_bytes), so memory is what the pixels need, never the file's size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys, time
from dinocache.cli import app
codes, seconds = [], []
for args in json.loads(sys.argv[1]):
    began = time.perf_counter()
    try:
        codes.append(app(args, standalone_mode=False) or 0)
    except SystemExit as exc:
        codes.append(exc.code)
    except Exception as exc:
        codes.append(f"{type(exc).__name__}: {exc}")
    seconds.append(round(time.perf_counter() - began, 2))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_rss_mb": round(peak, 1), "exit_codes": codes, "seconds": seconds}))
"""


def png_bytes(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def holed_tar(path: Path, good: bytes, holed: bytes, hole: int) -> None:
    """A tar whose second member is `holed` followed by `hole` zero bytes, written sparse."""

    def header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        return info.tobuf(tarfile.USTAR_FORMAT)

    with open(path, "wb") as fh:
        fh.write(header("good.png", len(good)) + good + b"\0" * (-len(good) % 512))
        fh.write(header("holed.png", len(holed) + hole))
        start = fh.tell()
        fh.write(holed)
        fh.truncate(start + -(-(len(holed) + hole) // 512) * 512 + 1024)  # the hole, then the end blocks


def build(root: Path, hole_gib: float) -> dict:
    """The hostile inputs; returns their paths."""
    hole = int(hole_gib * 1024**3)
    good, holed = png_bytes(seed=1), png_bytes(seed=2)
    folder = root / "folder"
    folder.mkdir()
    (folder / "good.png").write_bytes(good)
    with open(folder / "holed.png", "wb") as fh:
        fh.write(holed)
        fh.truncate(len(holed) + hole)
    holed_tar(root / "holed.tar", good, holed, hole)
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    rows = [
        {"path": str(folder / "good.png")},
        {"path": "/dev/zero", "key": "zero-hinted", "size": 4096, "mtime_ns": 1, "width": 64, "height": 64},
        {"path": "/dev/zero", "key": "zero", "size": 4096, "mtime_ns": 1},
        {"path": str(fifo), "key": "fifo-hinted", "size": 4096, "mtime_ns": 1, "width": 64, "height": 64},
        {"path": str(fifo), "key": "fifo", "size": 4096, "mtime_ns": 1},
        {"path": str(folder / "holed.png"), "key": "holed-hinted", "width": 64, "height": 64},
    ]
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "buckets.yaml").write_text('{"buckets": [[64, 64]]}')
    return {
        "folder": str(folder),
        "tar": str(root / "holed.tar"),
        "list": str(root / "list.jsonl"),
        "braces": str(root / "nope" / "{00000000..09999999}.tar"),
        "buckets": str(root / "buckets.yaml"),
    }


def commands(paths: dict, root: Path, model: str = "random:vits16") -> list[list[str]]:
    common = ["-b", paths["buckets"], "-m", model]
    out = []
    for name in ("folder", "tar", "list"):
        out.append(["plan", paths[name], *common, "--json"])
        run = ["extract", paths[name], *common, "-o", str(root / f"out-{name}"), "--workers", "0"]
        out.append([*run, "--no-progress", "--device", "cpu", "--dtype", "float32"])
    out.append(["plan", paths["braces"], *common])
    return out


def measure(root: Path, hole_gib: float, model: str = "random:vits16", timeout: float = 300) -> dict:
    paths = build(root, hole_gib)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(commands(paths, root, model))],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hole-gib", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.hole_gib)
    print(json.dumps({"hole_gib": args.hole_gib, **result}))


if __name__ == "__main__":
    main()
