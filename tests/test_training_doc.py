"""docs/TRAINING.md runs as written: its shell lines (with a tiny model in place of the real one)
and its Python blocks, in order, against small data -- including a fake kohya latent cache and
fake SimpleTuner metadata for the crop converters."""

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import save_scene
from PIL import Image
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
BUCKETS_256 = [(256, 256), (224, 288), (288, 224), (192, 320), (320, 192)]
PICTURES = {
    "cat.jpg": (640, 480),
    "dog.png": (300, 400),
    "sub/wide.png": (900, 420),
    "sub/tall.jpg": (380, 700),
    "square.png": (500, 500),
    "rotated.jpg": (480, 640),
}  # rotated.jpg: EXIF orientation 6


def blocks(text):
    return re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S)


def nearest(width, height):
    return min(BUCKETS_256, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(width / height)))


def make_data(root: Path):
    images = root / "data" / "images"
    for key, (w, h) in PICTURES.items():
        path = images / key
        if key == "rotated.jpg":  # stored 640x480 landscape, EXIF says rotate: upright 480x640
            path.parent.mkdir(parents=True, exist_ok=True)
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.new("RGB", (h, w), (90, 140, 200)).save(path, exif=exif.tobytes())
        else:
            save_scene(path, w, h, seed=len(key), **({"quality": 92} if key.endswith(".jpg") else {}))
    for key, (w, h) in PICTURES.items():  # kohya: latents beside each image, sizes as stored (no EXIF)
        stored = (h, w) if key == "rotated.jpg" else (w, h)
        bw, bh = nearest(*stored)
        np.savez(
            images / f"{Path(key).with_suffix('')}_{stored[0]:04d}x{stored[1]:04d}_sdxl.npz",
            latents=np.zeros((4, bh // 8, bw // 8), np.float32),
            original_size=np.array(stored),
            crop_ltrb=np.array([0, 0, bw, bh]),
        )
    metadata = {}  # SimpleTuner: cover-resize to the intermediary size, centre crop to the target
    for key, (w, h) in PICTURES.items():
        tw, th = nearest(w, h)
        scale = max(tw / w, th / h)
        iw, ih = round(w * scale), round(h * scale)
        stored = (h, w) if key == "rotated.jpg" else (w, h)
        metadata[str((images / key).resolve())] = {
            "original_size": list(stored),
            "intermediary_size": [iw, ih],
            "target_size": [tw, th],
            "crop_coordinates": [(ih - th) // 2, (iw - tw) // 2],
            "aspect_ratio": round(tw / th, 3),
        }
    (images / "aspect_ratio_bucket_metadata_mydata.json").write_text(json.dumps(metadata))
    shutil.copytree(REPO / "configs", root / "configs")


def run_shell(block: str, model_dir: Path, family_dirs: dict):
    for line in block.strip().splitlines():
        args = shlex.split(line)
        assert args[0] == "dinocache", line
        if "--model" in args:  # a tiny model of the family the line names
            named = args[args.index("--model") + 1]
            if "siglip2" in named:
                args[args.index("--model") + 1] = str(family_dirs["siglip2"])
            elif "dinov2" in named:
                args[args.index("--model") + 1] = str(family_dirs["with-registers" in named])
            else:
                args[args.index("--model") + 1] = str(model_dir)
        if args[1] == "extract":
            args += ["--workers", "0", "--no-progress"]
        if args[1] == "norm-stats":
            args += ["--no-progress"]
        result = runner.invoke(app, args[1:])
        assert result.exit_code == 0, (line, result.output)


def test_training_md_runs_as_written(tmp_path, tiny_model_dir, monkeypatch):
    from test_dinov2 import tiny_dinov2
    from test_siglip2 import tiny_siglip

    family_dirs = {"siglip2": tmp_path / "tiny-siglip2"}  # DINOv2: keyed by registers
    tiny_siglip(image_size=256).save_pretrained(family_dirs["siglip2"])
    for registers in (False, True):
        family_dirs[registers] = tmp_path / f"tiny-dinov2-{registers}"
        tiny_dinov2(registers).save_pretrained(family_dirs[registers])
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    kinds = []
    for kind, body in blocks((REPO / "docs" / "TRAINING.md").read_text()):
        kinds.append(kind)
        if kind == "bash":
            run_shell(body, tiny_model_dir, family_dirs)
        else:
            exec(compile(body, "TRAINING.md", "exec"), namespace)  # noqa: S102 - the doc's own code
    assert kinds.count("python") >= 5 and kinds.count("bash") >= 5
    # The converters produced crops extract accepted, one per image but kohya's sideways one.
    kohya = [json.loads(line) for line in (tmp_path / "kohya-crops.jsonl").read_text().splitlines()]
    assert {c["key"] for c in kohya} == set(PICTURES) - {"rotated.jpg"}
    simpletuner = [json.loads(line) for line in (tmp_path / "simpletuner-crops.jsonl").read_text().splitlines()]
    assert {c["key"] for c in simpletuner} == set(PICTURES)
    for crops in (kohya, simpletuner):
        for crop in crops:
            (bw, bh), (left, top, right, bottom) = crop["size"], crop["box"]
            width, height = PICTURES[crop["key"]]
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert abs((right - left) / (bottom - top) - bw / bh) < 0.02, crop  # the bucket's aspect
            assert abs((left + right) / 2 - width / 2) <= 1 and abs((top + bottom) / 2 - height / 2) <= 1  # centred
    for name, crops in (("kohya_dino", kohya), ("simpletuner_dino", simpletuner)):
        cache = FeatureCache(tmp_path / name)
        assert len(cache) == len(PICTURES)  # an image the file does not list follows the bucket rule
        for crop in crops:
            record = cache.record(crop["key"])
            assert record["box"] == crop["box"] and record["placement"] == 1
    assert FeatureCache(tmp_path / "kohya_dino").record("rotated.jpg")["placement"] == 0


@pytest.mark.parametrize("doc", ["README.md", "docs/TRAINING.md"])
def test_configs_the_docs_name_exist(doc):
    text = (REPO / doc).read_text()
    for config in set(re.findall(r"configs/[\w.-]+\.yaml", text)):
        assert (REPO / config).is_file(), (doc, config)
