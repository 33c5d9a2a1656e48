"""scripts/bench.py's smoke preset runs end to end (a smoke test: nothing here is timed)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_preset(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--preset",
            "smoke",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for name in ("recipe", "forward", "extract"):
        assert row[name]["images"] > 0 and row[name]["img_per_s"] > 0
    assert set(row["extract"]["stage_seconds"]) == {
        "decode_wait",
        "upload",
        "forward",
        "download",
        "write_wait",
        "commit",
    }
    assert row["extract_vs_recipe"] > 0 and "extract / recipe" in proc.stdout
    assert row["gflop_per_image"] > 0
