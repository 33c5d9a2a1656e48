"""Write the small sample pictures in examples/images (synthetic, so they carry no licence).

Mixed aspect ratios, a PNG with alpha, a 16-bit PNG and a JPEG with an EXIF rotation, so the
README's first command exercises buckets and the decode policy. Rerun to regenerate:
    python scripts/make_sample_images.py examples/images
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A sky gradient, a ground band, a sun and some boxes: structure that DINO features pick up."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array([70, 130, 200]) * (1 - y) + np.array([200, 220, 255]) * y).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).copy())
    draw = ImageDraw.Draw(img)
    horizon = int(height * rng.uniform(0.55, 0.75))
    draw.rectangle([0, horizon, width, height], fill=(60, 140, 60))
    r = int(min(width, height) * 0.12)
    cx, cy = int(width * rng.uniform(0.2, 0.8)), int(horizon * rng.uniform(0.2, 0.5))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 210, 60))
    for _ in range(4):
        w, h = int(width * rng.uniform(0.05, 0.2)), int(height * rng.uniform(0.1, 0.3))
        x0 = int(rng.uniform(0, width - w))
        draw.rectangle([x0, horizon - h, x0 + w, horizon], fill=tuple(int(v) for v in rng.integers(40, 220, 3)))
    return img


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sizes = {
        "square": (400, 400),
        "portrait": (420, 600),
        "landscape": (640, 448),
        "panorama": (800, 400),
        "tall": (300, 640),
    }
    for seed, (name, (w, h)) in enumerate(sizes.items()):
        scene(w, h, seed).save(out / f"{name}.jpg", quality=90)
    rgba = scene(480, 480, 10).convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    ImageDraw.Draw(alpha).ellipse([40, 40, 440, 440], fill=255)
    rgba.putalpha(alpha)
    rgba.save(out / "cutout-alpha.png")
    gray16 = (np.asarray(scene(512, 384, 11).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(out / "gray-16bit.png")
    # Stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view): upright it is 448x640.
    rotated = scene(448, 640, 12).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    nested = out / "phone"
    nested.mkdir(exist_ok=True)
    rotated.save(nested / "IMG_0001.JPG", quality=90, exif=exif)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/images"))
