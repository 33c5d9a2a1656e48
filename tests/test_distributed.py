"""Several ranks, one cache: torchrun with gloo on CPU, explicit ranks plus `merge`, and the
cost-balanced split."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEVICE
from test_crash import N_IMAGES, assert_same_as_reference, dataset, durable_rows, extract_args, options  # noqa: F401

import dinocache
from dinocache import FeatureCache
from dinocache.distributed import split_by_cost
from dinocache.extract import extract, merge_cache


def free_port() -> int:
    """A port nobody listens on now (each torchrun gets its own: no TIME_WAIT clashes)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(root, images, out, model_dir, nproc, fault=None):
    env = {k: v for k, v in os.environ.items() if k not in ("DINOCACHE_FAULT", "RANK", "WORLD_SIZE")}
    if fault:
        env["DINOCACHE_FAULT"] = fault
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "dinocache",
        *extract_args(root, images, out, model_dir),
        "--device",
        DEVICE,  # TORCH_DEVICE=cuda: NCCL on the GPU (one rank per GPU)
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_ranks_equal_one_process(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    proc = torchrun(root, images, tmp_path / "out", tiny_model_dir, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{N_IMAGES} extracted by 2 ranks" in proc.stdout
    assert_same_as_reference(root, tmp_path / "out")
    runs = FeatureCache(tmp_path / "out").manifest["runs"]
    assert sorted(r["rank"] for r in runs[-2:]) == [0, 1] and all(r["processed"] == N_IMAGES // 2 for r in runs[-2:])
    assert not (tmp_path / "out" / "ranks").exists()


@pytest.mark.parametrize("rerun_ranks", [1, 3])
def test_a_rank_dies_and_a_rerun_with_another_world_size_completes(dataset, tmp_path, tiny_model_dir, rerun_ranks):
    root, images = dataset
    out = tmp_path / "out"
    died = torchrun(root, images, out, tiny_model_dir, 2, fault="decode:4:kill@1")
    assert died.returncode != 0
    if rerun_ranks == 1:
        done_before = durable_rows(out)
        result = extract(images, options(out, tiny_model_dir))
        assert result.processed == N_IMAGES - done_before  # what either rank finished is adopted, not redone
    else:
        again = torchrun(root, images, out, tiny_model_dir, rerun_ranks)
        assert again.returncode == 0, again.stderr[-3000:]
    assert_same_as_reference(root, out)


def test_one_rank_under_torchrun_equals_a_plain_run(dataset, tmp_path, tiny_model_dir):
    """The process-group path with one rank (NCCL on a GPU with TORCH_DEVICE=cuda, else gloo)
    gives the plain run's features bit for bit (fp32) and tears the group down."""
    root, images = dataset
    proc = torchrun(root, images, tmp_path / "out", tiny_model_dir, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "destroy_process_group" not in proc.stderr
    assert_same_as_reference(root, tmp_path / "out")


def test_sigterm_under_torchrun_stops_cleanly_and_a_rerun_completes(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    out = tmp_path / "out"
    stopped = torchrun(root, images, out, tiny_model_dir, 1, fault="decode:5:sigterm")
    # The rank stops after its batch, commits, and exits 143; torchrun then prints its own
    # ChildFailedError report (its traceback, not ours).
    assert stopped.returncode != 0 and "rerun the same command to resume" in stopped.stderr, stopped.stderr[-3000:]
    assert "exitcode  : 143" in stopped.stderr
    ours = str(Path(dinocache.__file__).parent) + os.sep  # not the checkout: its .venv holds torchrun
    assert not any(ours in line for line in stopped.stderr.splitlines() if line.strip().startswith("File"))
    assert durable_rows(out) < N_IMAGES
    again = torchrun(root, images, out, tiny_model_dir, 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_as_reference(root, out)


def test_explicit_ranks_then_merge(dataset, tmp_path, tiny_model_dir):
    root, images = dataset
    out = tmp_path / "out"
    for rank in (1, 0):  # any order, as SLURM array tasks finish
        opts = options(out, tiny_model_dir)
        opts.rank, opts.world_size = rank, 2
        extract(images, opts)
    assert not (out / "manifest.json").exists()  # no rank writes it
    assert len(list((out / "ranks").glob("*.json"))) == 2
    merged = merge_cache(out)
    assert merged.rank_reports == 2 and merged.samples == N_IMAGES and merged.processed == N_IMAGES
    assert_same_as_reference(root, out)


def test_merge_names_the_ranks_it_did_not_hear_from(dataset, tmp_path, tiny_model_dir):
    """Newcomer trial: rank 0 of 3 alone, merged, was reported as a plain success, and ranks of
    different --world-size mixed in one folder went unnoticed."""
    from typer.testing import CliRunner

    from dinocache.cli import app

    root, images = dataset
    out = tmp_path / "out"
    for rank, size in ((0, 3), (1, 2)):
        opts = options(out, tiny_model_dir)
        opts.rank, opts.world_size = rank, size
        extract(images, opts)
    merged = CliRunner().invoke(app, ["merge", str(out)])
    assert merged.exit_code == 0, merged.output
    assert "different --world-size (2, 3)" in merged.output
    assert "no report from rank(s) 0 of 2" in merged.output
    assert "no report from rank(s) 1, 2 of 3" in merged.output


def test_split_by_cost_balances_tokens_and_covers_everything():
    buckets = [0] * 7 + [1] * 5 + [2] * 3  # sorted by bucket, as plans are
    tokens = [4096, 1024, 3952]
    for world in (1, 2, 3, 4):
        shares = split_by_cost(buckets, tokens, world)
        assert sorted(i for share in shares for i in share) == list(range(len(buckets)))
        load = [sum(tokens[buckets[i]] for i in share) for share in shares]
        assert max(load) - min(load) <= max(tokens)  # within one image of the costliest bucket
        assert shares == split_by_cost(buckets, tokens, world)  # deterministic
    counts = [len(s) for s in split_by_cost([0, 0, 0, 1], [100, 1], 2)]
    assert counts in ([2, 2], [1, 3], [3, 1])
