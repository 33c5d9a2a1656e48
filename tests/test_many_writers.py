"""Many writers, one committer (issue 24): a writer of many holds a lease while it writes, and a
committer (merge, a single run) leaves its files in the making alone and refuses --overwrite;
a lease whose process is gone, or that is older than a day, is stale and deleted."""

import json
import socket
import subprocess
import sys
import time

import pytest
from test_crash import N_IMAGES, dataset, options  # noqa: F401

from dinocache.errors import CacheError
from dinocache.extract import extract
from dinocache.lock import WriterLease, live_leases
from dinocache.reports import merge_cache

TEMP_SHARD = ".b000-128x128-0123abcd-00000.safetensors.tmp"


def test_a_live_writers_lease_keeps_its_temp_files_and_refuses_overwrite(dataset, tmp_path, tiny_model_dir):
    _, images = dataset
    out = tmp_path / "out"
    opts = options(out, tiny_model_dir)
    opts.rank, opts.world_size = 0, 2
    extract(images, opts)
    with WriterLease(out) as lease:  # rank 1, still writing: its next shard is in a temp file
        (out / "shards" / TEMP_SHARD).write_bytes(b"half a shard")
        assert live_leases(out) == [f"pid {lease.owner['pid']} on {socket.gethostname()}"]
        assert merge_cache(out).samples == N_IMAGES // 2
        assert (out / "shards" / TEMP_SHARD).exists()
        with pytest.raises(CacheError, match="being written by 1 other writer"):
            extract(images, options(out, tiny_model_dir, overwrite=True))
        assert (out / "manifest.json").exists()
    assert merge_cache(out).samples == N_IMAGES // 2  # no writer left: a temp file is a dead write's
    assert not (out / "shards" / TEMP_SHARD).exists()


def test_a_lease_is_stale_once_its_process_is_gone_or_after_a_day(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leases = {
        "lease-000000000001.json": {"host": socket.gethostname(), "pid": int(gone.stdout), "started": time.time()},
        "lease-000000000002.json": {"host": "elsewhere", "pid": 1, "started": time.time() - 2 * 86400},
        "lease-000000000003.json": {"host": "elsewhere", "pid": 7, "started": time.time() - 3600},
    }
    (tmp_path / "ranks").mkdir()
    for name, holder in leases.items():
        (tmp_path / "ranks" / name).write_text(json.dumps(holder))
    assert live_leases(tmp_path) == ["pid 7 on elsewhere"]  # another host's: trusted for a day
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["lease-000000000003.json"]
