"""scripts/bench.py's presets run end to end: the smoke preset exercises the GPU preset's logic
(forward alone, extract variants after a warm-up, cosine against an fp32 forward, stages, the
table and the JSON) on the CPU with tiny sizes, so a GPU run is spent measuring, not debugging.
Nothing here is timed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_preset(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--preset",
            "smoke",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "results.json").read_text())
    (row,) = report["rows"]
    assert row["forward"]["img_per_s"] > 0 and row["recipe"]["img_per_s"] > 0 and row["load_seconds"] > 0
    assert [v["options"] for v in row["variants"]] == ["default", "--jpeg-draft", "--sdpa-backend math"]
    for variant in row["variants"]:
        assert variant["img_per_s"] > 0 and variant["processed"] == row["images"], variant
        assert variant["cosine_min"] >= 0.999, variant  # against an fp32 eager forward of the same pixels
        assert set(variant["stages"]) == {"decode_wait", "upload", "forward", "download", "write_wait", "commit"}
    assert "extract --jpeg-draft" in proc.stdout and "forward alone" in proc.stdout
    assert row["gflop_per_image"] > 0 and "plan_gpu_seconds" in row


def test_gpu_presets_fit_their_budgets_and_name_real_options():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench

    for name in ("gpu", "gpu-big"):
        for row in bench.PRESETS[name]:
            assert row.arch in ("vitl16", "vith16plus", "vit7b16")
            for variant in row.variants:
                assert set(variant) <= {"--compile", "--jpeg-draft", "--sdpa-backend", "cudnn"}
    assert {r.side for r in bench.PRESETS["gpu"]} == {1024, 512, 224}
