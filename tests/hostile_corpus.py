"""A golden corpus of hostile and unusual image files, with what dinocache must do with each.

    make_corpus(folder) -> {key: "ok" or a failure reason}

"ok" means the image must come out with features; anything else is the reason code it must be
recorded with. Every file is generated here (nothing binary is committed), deterministically.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# What Pillow's exif_transpose does for each orientation, and the inverse we store so that the
# upright picture comes back.
STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A structured RGB picture (gradients + blocks) so that features differ across it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, max(1, width - 8)), rng.integers(0, max(1, height - 8))
        rgb[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(rgb.astype(np.uint8))


def png_rgb16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png_bomb(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels, with (almost) no data behind it."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def ycck_jpeg(path: Path, cmyk: np.ndarray) -> None:
    """An Adobe YCCK JPEG that decodes to `cmyk` (Pillow only writes plain CMYK, so we encode the
    YCC values ourselves and flip the APP14 transform flag to 2 = YCCK)."""
    ycc = Image.merge("RGB", [Image.fromarray(cmyk[..., i].copy()) for i in range(3)]).convert("YCbCr")
    y, cb, cr = (np.asarray(c) for c in ycc.split())
    stored = np.stack([255 - y, 255 - cb, 255 - cr, cmyk[..., 3]], -1).astype(np.uint8)  # Pillow inverts Adobe CMYK
    buf = io.BytesIO()
    Image.fromarray(stored, "CMYK").save(buf, "JPEG", quality=100)
    data = bytearray(buf.getvalue())
    adobe = data.find(b"Adobe")
    data[adobe + 11] = 2
    path.write_bytes(bytes(data))


def cmyk_pattern(width: int = 48, height: int = 32) -> np.ndarray:
    cmyk = np.zeros((height, width, 4), np.uint8)
    cmyk[..., 0] = 200
    cmyk[: height // 2, :, 1] = 60
    cmyk[..., 2] = np.linspace(0, 255, width)[None, :].astype(np.uint8)
    cmyk[..., 3] = 30
    return cmyk


def make_corpus(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def ok(name: str) -> Path:
        expect[name] = "ok"
        return root / name

    # --- files that are not (whole) images ---------------------------------------------------
    (root / "zero-bytes.jpg").write_bytes(b"")
    expect["zero-bytes.jpg"] = "empty"
    good_jpeg = io.BytesIO()
    picture(160, 120, 1).save(good_jpeg, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    expect["truncated.jpg"] = "corrupt"
    good_png = io.BytesIO()
    picture(160, 120, 2).save(good_png, "PNG")
    (root / "truncated.png").write_bytes(good_png.getvalue()[: len(good_png.getvalue()) // 2])
    expect["truncated.png"] = "corrupt"
    (root / "text.jpg").write_text("Dear reader, I am a text file with an image extension.\n")
    expect["text.jpg"] = "not_an_image"
    (root / "random-bytes.png").write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect["random-bytes.png"] = "not_an_image"
    (root / "vector.png").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    expect["vector.png"] = "not_an_image"  # an unsupported format behind an image extension
    png_bomb(root / "bomb.png", 100_000, 100_000)
    expect["bomb.png"] = "too_large"

    # --- extreme geometry --------------------------------------------------------------------
    picture(1, 1).save(ok("one-pixel.png"))
    picture(1, 5000, 4).save(ok("one-by-5000.png"))

    # --- colour modes --------------------------------------------------------------------------
    Image.fromarray(cmyk_pattern(), "CMYK").save(ok("cmyk.jpg"), quality=100)
    ycck_jpeg(ok("ycck.jpg"), cmyk_pattern())
    gray = np.asarray(picture(96, 64, 5).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(ok("gray16.png"))
    rgb8 = np.asarray(picture(96, 64, 6))
    png_rgb16(ok("rgb16.png"), rgb8.astype(np.uint16) * 257)
    pal = picture(64, 64, 7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(ok("palette-transparent.png"), transparency=0)
    la = Image.merge("LA", (picture(64, 64, 8).convert("L"), Image.linear_gradient("L").resize((64, 64))))
    la.save(ok("gray-alpha.png"))
    Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64), "F").save(ok("float.tif"))

    # --- containers --------------------------------------------------------------------------
    frames = [picture(64, 48, s) for s in (10, 11, 12)]
    frames[0].save(ok("animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(ok("animated.webp"), save_all=True, append_images=frames[1:], duration=100, lossless=True)
    picture(200, 150, 13).save(ok("progressive.jpg"), quality=90, progressive=True)

    # --- EXIF orientation: eight files that are the same upright picture ------------------------
    upright = picture(80, 48, 14)
    (root / "orientation").mkdir()
    upright.save(ok("orientation/upright.png"))
    for orientation, method in STORE_FOR_ORIENTATION.items():
        stored = upright if method is None else upright.transpose(method)
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(ok(f"orientation/o{orientation}.png"), exif=exif)

    # --- file system hazards -----------------------------------------------------------------
    picture(32, 32, 15).save(root / "no-permission.png")
    os.chmod(root / "no-permission.png", 0)
    expect["no-permission.png"] = "ok" if os.geteuid() == 0 else "unreadable"  # root reads anything
    os.symlink("loop-b.jpg", root / "loop-a.jpg")
    os.symlink("loop-a.jpg", root / "loop-b.jpg")
    expect["loop-a.jpg"] = expect["loop-b.jpg"] = "unreadable"
    (root / "dir-loop").mkdir()
    os.symlink("..", root / "dir-loop" / "parent")  # a directory symlink loop: not followed
    return expect
