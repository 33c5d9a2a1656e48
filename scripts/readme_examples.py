"""The README's sample outputs, from real runs: so they stay true.

Each README block between `<!-- output: COMMAND -->` and `<!-- end output -->` is the output of
COMMAND, run after the README's first command (the sample pictures, a random ViT-S/16) in a
scratch folder. `--write` rewrites the blocks; `--check` (what the test suite runs) fails when
a block is stale. Volatile parts (times, throughput, the machine's compute dtype, free disk) are
masked before comparing.

    python scripts/readme_examples.py --write
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- output: (.+?) -->\n```\n)(.*?)(```\n<!-- end output -->)", re.S)
SETUP = [
    "extract",
    str(REPO / "examples" / "images"),
    "--buckets",
    str(REPO / "configs" / "example-small.yaml"),
    "--model",
    "random:vits16",
    "--no-progress",
]


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run(
        [sys.executable, "-m", "dinocache", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    if proc.returncode not in (0, 1):
        raise SystemExit(f"dinocache {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def outputs(commands: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "examples").symlink_to(REPO / "examples")
        (cwd / "configs").symlink_to(REPO / "configs")
        run(SETUP, cwd)
        result = {}
        for command in commands:
            args = shlex.split(command)
            assert args[0] == "dinocache", command
            text = run(args[1:], cwd)
            result[command] = f"$ {command}\n{text}"
        return result


def mask(text: str) -> str:
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "<time>", text)
    text = re.sub(r"^(<time>\s+\S+\s+\d+\s+\d+)\s+[\d.]+\s+[\d.]+", r"\1 <s> <rate>", text, flags=re.M)
    text = re.sub(r"compute (bfloat16|float32)", "compute <dtype>", text)
    text = re.sub(r"^disk .*$", "disk <free>", text, flags=re.M)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = REPO / "README.md"
    text = readme.read_text()
    commands = [m.group(2) for m in BLOCK.finditer(text)]
    fresh = outputs(commands)
    stale = [c for c, m in zip(commands, BLOCK.finditer(text)) if mask(m.group(3)) != mask(fresh[c])]
    if args.write:
        readme.write_text(BLOCK.sub(lambda m: m.group(1) + fresh[m.group(2)] + m.group(4), text))
        print(f"rewrote {len(commands)} block(s): {', '.join(commands)}")
    elif stale:
        raise SystemExit(
            "README output blocks are stale (run `python scripts/readme_examples.py --write`): " + ", ".join(stale)
        )
    else:
        print(f"{len(commands)} README output block(s) match a real run")


if __name__ == "__main__":
    main()
