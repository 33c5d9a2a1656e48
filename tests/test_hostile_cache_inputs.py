"""Issue 21, the cache side: rank reports, locks, statistics files, remote manifests and the
model's identity are untrusted input too. Every malformed value ends as dinocache's own error
(exit 2, no traceback) or a verify finding; nothing extract or merge writes ever fails the
manifest schema; nothing is written outside OUT; nothing is fetched that the command line did
not name."""

import copy
import json
import random
import shutil

import pytest
from conftest import fresh_bucket, save_scene
from test_untrusted_manifest import JUNK, paths, set_path
from typer.testing import CliRunner

from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import CacheError, DinocacheError
from dinocache.extract import extract
from dinocache.manifest import read_manifest, write_manifest
from dinocache.names import FORMAT_VERSION
from dinocache.reports import merge_cache
from dinocache.state import CacheState

BUCKETS = {"buckets": [[64, 64], [96, 48]]}
runner = CliRunner()


def run(images, out, model_dir, **kwargs):
    kwargs.setdefault("workers", 0)
    options = ExtractOptions(
        out=out, buckets=parse_bucket_config(BUCKETS), model=str(model_dir), progress=False, dtype="float32", **kwargs
    )
    return extract(images, options)


def make_images(root):
    for i, (w, h) in enumerate([(64, 64), (96, 48), (70, 64)]):
        save_scene(root / f"{i}.png", w, h, seed=i)
    return root


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, tiny_model_dir):
    """A cache written by two ranks without a process group: shards and rank reports, no manifest."""
    root = tmp_path_factory.mktemp("ranked")
    images = make_images(root / "images")
    for rank in (0, 1):
        run(images, root / "out", tiny_model_dir, rank=rank, world_size=2)
    return root / "out"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("plain")
    run(make_images(root / "images"), root / "out", tiny_model_dir)
    return root / "out"


def copy_of(cache, tmp_path, name="work"):
    work = tmp_path / name
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(cache, work, symlinks=True)
    return work


def clean_exit(result):
    """Exit 0, 1 or 2 with no traceback: our own outcome, whatever it is."""
    assert result.exit_code in (0, 1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


# ---- class 1: nothing extract or merge writes fails its own schema ------------------------------


def test_a_failure_with_impossible_hints_is_recorded_cleanly(cache, tmp_path):
    """A list row's `size: -7` / `1e20` or `mtime_ns: 1e30` (or a tar's negative PAX mtime) reached
    the manifest as is, and every later command called the cache "not a valid manifest"."""
    work = copy_of(cache, tmp_path)
    settings = {k: read_manifest(work)[k] for k in ("model", "preprocessing", "storage", "buckets")}
    state = CacheState.open(work, settings, overwrite=False)
    for i, (size, mtime) in enumerate([(-7, 1), (1e20, 1), (5, 1e30), (5, -(10**30)), (True, "x")]):
        state.add_failure(f"bad-{i}.png", size, mtime, "missing", "x" * 5000)
    state.commit()
    manifest = read_manifest(work)  # readable: the good samples stay reachable
    recorded = {f["key"]: f for f in manifest["failures"]}
    assert recorded["bad-0.png"]["source_bytes"] == -1 and recorded["bad-1.png"]["source_bytes"] == -1
    assert recorded["bad-2.png"]["source_mtime_ns"] == "-1" and recorded["bad-3.png"]["source_mtime_ns"] == "-1"
    assert len(recorded["bad-0.png"]["detail"]) <= 1000
    assert manifest["samples"]["count"] == 3


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["failures"].append({"key": "k", "reason": "r", "detail": "", "source_bytes": -7}),
        lambda m: m["runs"].append({"processed": float("nan")}),
        lambda m: m["runs"].append({"stage_seconds": "x"}),
        lambda m: m["model"].update(extra=float("inf")),
    ],
)
def test_a_manifest_that_fails_the_schema_is_never_written(cache, tmp_path, change):
    work = copy_of(cache, tmp_path)
    before = (work / "manifest.json").read_bytes()
    manifest = read_manifest(work)
    change(manifest)
    with pytest.raises(CacheError, match="not writing"):
        write_manifest(work, manifest)
    assert (work / "manifest.json").read_bytes() == before


def test_the_commit_path_checks_the_manifest_before_writing(cache, tmp_path):
    work = copy_of(cache, tmp_path)
    before = (work / "manifest.json").read_bytes()
    settings = {k: read_manifest(work)[k] for k in ("model", "preprocessing", "storage", "buckets")}
    state = CacheState.open(work, settings, overwrite=False)
    state.failures["x"] = {"key": "x", "reason": "r", "detail": "", "source_bytes": 1e20, "source_mtime_ns": "1"}
    with pytest.raises(CacheError, match="not writing"):
        state.commit()
    assert (work / "manifest.json").read_bytes() == before


def rank_reports(out):
    return sorted((out / "ranks").glob("rank-*.json"))


MALFORMED_REPORTS = [
    ("failures", [{"key": "zz.png", "reason": "x", "detail": "d", "source_bytes": -7, "source_mtime_ns": "1"}]),
    ("failures", [{"key": "zz.png", "reason": "x", "detail": "d", "source_bytes": 1e20, "source_mtime_ns": "1"}]),
    ("failures", [{"key": "zz.png", "reason": "x", "source_bytes": 1, "source_mtime_ns": "1e30"}]),
    ("failures", "x"),
    ("run", {"processed": "many"}),
    ("run", {"processed": 1, "stage_seconds": "x"}),
    ("run", []),
    ("settings", {}),
    ("settings", {"model": [], "preprocessing": 1, "storage": None, "buckets": {}}),
    ("settings", []),
    ("shards", [{"file": "../../x"}]),
    ("rank", "zero"),
]


@pytest.mark.parametrize("field,value", MALFORMED_REPORTS)
def test_merge_refuses_a_malformed_rank_report_and_the_cache_stays_readable(ranked, tmp_path, field, value):
    work = copy_of(ranked, tmp_path)
    bad = rank_reports(work)[0]
    report = json.loads(bad.read_text())
    report[field] = value
    bad.write_text(json.dumps(report))
    result = runner.invoke(app, ["merge", str(work)])
    clean_exit(result)
    assert result.exit_code == 0  # the other rank's report and every shard are merged
    manifest = read_manifest(work)
    assert manifest["samples"]["count"] == 3  # shards are adopted on their own merits
    assert bad.exists()  # left for the user to see, never used
    assert not any(f["key"] == "zz.png" for f in manifest["failures"])


def test_merge_with_only_malformed_reports_says_so(ranked, tmp_path):
    work = copy_of(ranked, tmp_path)
    for path in rank_reports(work):
        path.write_text(json.dumps({**json.loads(path.read_text()), "settings": {}}))
    result = runner.invoke(app, ["merge", str(work)])
    clean_exit(result)
    assert result.exit_code == 2 and "malformed" in result.output


def test_fuzzed_rank_reports_never_brick_the_cache(ranked, tmp_path):
    original = json.loads(rank_reports(ranked)[0].read_text())
    all_paths = [p for p in paths(original) if p]
    rng = random.Random(21)
    for _trial in range(25):
        work = copy_of(ranked, tmp_path)
        doc = copy.deepcopy(original)
        for _ in range(rng.randint(1, 3)):
            try:
                doc = set_path(doc, rng.choice(all_paths), rng.choice(JUNK))
            except (TypeError, KeyError, IndexError):
                pass
        rank_reports(work)[0].write_text(json.dumps(doc))
        clean_exit(runner.invoke(app, ["merge", str(work)]))
        if (work / "manifest.json").exists():
            read_manifest(work)  # whatever merge wrote, it reads back


# ---- class 2: --rank/--world-size writes nothing through a link -----------------------------------


@pytest.mark.parametrize("linked", ["shards", "ranks"])
def test_a_rank_refuses_a_linked_cache_folder(tmp_path, tiny_model_dir, linked):
    images = make_images(tmp_path / "images")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / linked).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DinocacheError, match="symbolic link"):
        run(images, out, tiny_model_dir, rank=0, world_size=2)
    assert list(elsewhere.iterdir()) == []
    with pytest.raises(DinocacheError, match="symbolic link"):
        merge_cache(out)


# ---- class 3: no network request that the command line did not name -------------------------------


@pytest.fixture()
def listening():
    """A local HTTP server that records every request it gets."""
    import http.server
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def record_input(work, input_dir):
    manifest = read_manifest(work)
    for run_record in manifest["runs"]:
        run_record["input_dir"] = input_dir
    (work / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["url", "list file of urls"])
def test_a_recorded_input_is_never_fetched(cache, tmp_path, listening, kind):
    url, hits = listening
    work = copy_of(cache, tmp_path)
    if kind == "url":
        record_input(work, f"{url}/list.jsonl")
    else:  # a list file shipped inside the cache, naming a host
        (work / "list.jsonl").write_text(json.dumps({"url": f"{url}/0.png", "key": "0.png"}) + "\n")
        record_input(work, str(work / "list.jsonl"))
    shown = runner.invoke(app, ["show", str(work), "0.png", "-o", str(tmp_path / "x.png")])
    clean_exit(shown)
    assert shown.exit_code == 2 and "--source" in shown.output
    verified = runner.invoke(app, ["verify", str(work), "--recompute", "1"])
    clean_exit(verified)
    assert verified.exit_code == 2 and "--source" in verified.output
    assert hits == []


# ---- classes 4 and 6: statistics files are checked like shards ----------------------------------


@pytest.fixture(scope="module")
def with_stats(cache, tmp_path_factory):
    from dinocache.normstats import compute_statistics

    out = tmp_path_factory.mktemp("stats") / "out"
    shutil.copytree(cache, out)
    compute_statistics(out)
    return out


def replace_statistics(work, data=None, tensors=None, metadata=None, file=None):
    """Swap the statistics file for other bytes and re-record its size and sha256, as an
    attacker (or a careless edit) would, so only the content checks can catch it."""
    import hashlib

    import torch
    from safetensors.torch import save

    manifest = read_manifest(work)
    entry = manifest["statistics"][0]
    if tensors is not None:
        from dinocache.stfile import SafetensorsFile

        original = SafetensorsFile(work / entry["file"])
        base = {name: original.tensor(name) for name in original.entries}
        base.update(tensors)
        base = {k: v for k, v in base.items() if v is not None}
        data = save({k: v.contiguous() for k, v in base.items()}, metadata=metadata or original.metadata)
    (work / entry["file"]).unlink()
    if file is not None:
        entry["file"] = file
    if data is not None:
        (work / entry["file"]).write_bytes(data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (work / "manifest.json").write_text(json.dumps(manifest))
    del torch


def _pickle_bytes():
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"patches_mean": torch.zeros(64)}, buffer)
    return buffer.getvalue()


def _statistics_cases():
    import torch

    d = 64
    return {
        "nan variance": dict(tensors={"patches_var": torch.full((d,), float("nan"), dtype=torch.float64)}),
        "negative variance": dict(tensors={"cls_var": -torch.ones(d, dtype=torch.float64)}),
        "1e308 variance": dict(tensors={"patches_var": torch.full((d,), 1e308, dtype=torch.float64)}),
        "[1]-shaped mean": dict(tensors={"patches_mean": torch.zeros(1, dtype=torch.float64)}),
        "float32 mean": dict(tensors={"cls_mean": torch.zeros(d)}),
        "a tensor missing": dict(tensors={"cls_var": None}),
        "an extra tensor": dict(tensors={"key": torch.zeros(3, dtype=torch.float64)}),
        "another flavour": dict(tensors={}, metadata={"format": "dinocache-statistics", "flavour": "prenorm"}),
        "garbage bytes": dict(data=b"\x00garbage" * 100),
        "a pickle": dict(data=_pickle_bytes()),
        "an entry naming a .pt": dict(data=_pickle_bytes(), file="stats/normed-channel-000000000000.pt"),
        "deleted": dict(),
    }


@pytest.mark.parametrize("case", list(_statistics_cases()))
def test_bad_statistics_are_a_verify_finding_and_a_clear_reader_error(with_stats, tmp_path, case):
    from dinocache import FeatureCache

    work = copy_of(with_stats, tmp_path)
    FeatureCache(work, normalize=True)[0]  # the good file is accepted
    replace_statistics(work, **_statistics_cases()[case])
    verified = runner.invoke(app, ["verify", str(work)])
    clean_exit(verified)
    assert verified.exit_code == 1 and "statistics" in verified.output
    with pytest.raises(CacheError, match="statistics"):
        FeatureCache(work, normalize=True)
    clean_exit(runner.invoke(app, ["norm-stats", str(work), "--export", str(tmp_path / "s.json"), "--style", "json"]))
    clean_exit(runner.invoke(app, ["stats", str(work)]))


# ---- class 8: a run that cached nothing never says OK -------------------------------------------


def extract_args(source, out, model_dir):
    return [
        "extract",
        str(source),
        "-o",
        str(out),
        "-m",
        str(model_dir),
        "--workers",
        "0",
        "--no-progress",
        "--dtype",
        "float32",
    ]


@pytest.mark.parametrize("kind", ["broken images", "list relative to another folder"])
def test_a_run_where_every_image_failed_exits_1_and_verify_says_empty(tmp_path, tiny_model_dir, kind):
    import yaml

    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump(BUCKETS))
    if kind == "broken images":
        source = tmp_path / "images"
        source.mkdir()
        for i in range(3):
            (source / f"{i}.png").write_bytes(b"not a picture " * i)
    else:
        make_images(tmp_path / "data" / "images")
        source = tmp_path / "lists" / "list.jsonl"  # paths written relative to data/, not to the list
        source.parent.mkdir()
        source.write_text("".join(json.dumps({"path": f"images/{i}.png"}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    result = runner.invoke(app, [*extract_args(source, out, tiny_model_dir), "-b", str(config)])
    clean_exit(result)
    assert result.exit_code == 1 and "0 extracted" in result.output and "no image was extracted" in result.output
    assert len(read_manifest(out)["failures"]) == 3  # the failures are recorded all the same
    verified = runner.invoke(app, ["verify", str(out)])
    clean_exit(verified)
    assert verified.exit_code == 1 and "no samples" in verified.output and "OK" not in verified.output
    as_json = json.loads(runner.invoke(app, ["verify", str(out), "--json"]).stdout)
    assert not as_json["ok"] and [p["kind"] for p in as_json["problems"]] == ["empty"]


def test_a_rerun_with_nothing_new_still_exits_0(cache, tmp_path, tiny_model_dir):
    import yaml

    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump(BUCKETS))
    work = copy_of(cache, tmp_path)
    images = make_images(tmp_path / "images")
    result = runner.invoke(app, [*extract_args(images, work, tiny_model_dir), "-b", str(config), "--new-source"])
    clean_exit(result)
    assert result.exit_code == 0


# ---- class 9: a model is known by its weights, not by the spelling of its path ---------------------


@pytest.fixture()
def spelled(tmp_path, tiny_model_dir):
    """The tiny model as ./tiny-dinov3 in the working folder, a copy elsewhere, and a folder of the
    same name, config and final norm whose block weights differ."""
    import os

    import torch
    from transformers import DINOv3ViTModel

    shutil.copytree(tiny_model_dir, "tiny-dinov3")
    shutil.copytree(tiny_model_dir, tmp_path / "copy" / "tiny-dinov3")
    other = DINOv3ViTModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.get_parameter("model.layer.0.mlp.up_proj.weight").normal_()
    other.save_pretrained(tmp_path / "other" / "tiny-dinov3")
    return {
        "name": "tiny-dinov3",
        "dot": "./tiny-dinov3",
        "absolute": os.path.abspath("tiny-dinov3"),
        "copy": str(tmp_path / "copy" / "tiny-dinov3"),
        "other": str(tmp_path / "other" / "tiny-dinov3"),
    }


def test_every_spelling_and_copy_of_a_checkpoint_is_the_same_model(tmp_path, spelled):
    images = make_images(tmp_path / "images")
    out = tmp_path / "out"
    assert run(images, out, spelled["name"]).processed == 3
    recorded = read_manifest(out)["model"]
    assert recorded["weights_fingerprint"].startswith("v1:") and recorded["id"] == "tiny-dinov3"
    for name in ("dot", "absolute", "copy"):
        again = run(images, out, spelled[name])
        assert again.processed == 0 and again.skipped == 3, name
    assert read_manifest(out)["model"] == recorded  # the cache keeps its record
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0, result.output


def test_a_folder_with_the_same_name_config_and_norm_but_other_weights_is_refused(tmp_path, spelled):
    images = make_images(tmp_path / "images")
    out = tmp_path / "out"
    run(images, out, spelled["name"])
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(CacheError, match="other weights"):
        run(images, out, spelled["other"])
    assert (out / "manifest.json").read_bytes() == before


def test_an_older_cache_keeps_its_identity_record(tmp_path, spelled, monkeypatch):
    """A cache written before fingerprints (model id + final norm) is still added to with the
    same folder under any spelling, and keeps its record (its shards say the same)."""
    import dinocache.model

    images = make_images(tmp_path / "images")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(dinocache.model, "file_fingerprint", lambda files: None)
        run(images, out, spelled["name"])
    recorded = read_manifest(out)["model"]
    assert "weights_fingerprint" not in recorded
    (images / "3.png").write_bytes((images / "0.png").read_bytes())
    assert run(images, out, spelled["dot"]).processed == 1
    assert read_manifest(out)["model"] == recorded
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


def test_the_fingerprint_reads_little(tiny_model_dir):
    """Sampled, not hashed whole: a few KiB per tensor (measured: 12 ms for a 1.2 GB ViT-L)."""
    from dinocache.model import FINGERPRINT_BLOCK, file_fingerprint

    path = tiny_model_dir / "model.safetensors"
    assert file_fingerprint([path]) == file_fingerprint([path])
    damaged = bytearray(path.read_bytes())
    damaged[-100] ^= 0xFF  # inside the last tensor's sampled tail
    copy = path.parent.parent / "damaged.safetensors"
    copy.write_bytes(bytes(damaged))
    assert file_fingerprint([copy]) != file_fingerprint([path])
    assert FINGERPRINT_BLOCK <= 4096


# ---- class 5 and 7: the lock is read bounded, and what it says is shown safely ----------------------


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo"])
def test_a_lock_that_is_a_link_or_a_fifo_is_refused_at_once(cache, tmp_path, tiny_model_dir, kind):
    import os
    import subprocess
    import sys

    work = copy_of(cache, tmp_path)
    if kind == "fifo":
        os.mkfifo(work / ".lock")
    else:
        (work / ".lock").symlink_to("/dev/zero")
    # In a process of its own: before the fix this read 3 GiB or waited on the FIFO for ever.
    merged = subprocess.run(
        [sys.executable, "-m", "dinocache", "merge", str(work)], capture_output=True, text=True, timeout=120
    )
    assert merged.returncode == 2 and "not a lock dinocache wrote" in merged.stderr, merged.stderr[-2000:]
    with pytest.raises(CacheError, match="not a lock dinocache wrote"):
        run(make_images(tmp_path / "images"), work, tiny_model_dir)


def test_a_huge_lock_with_escapes_is_not_printed_whole(cache, tmp_path):
    work = copy_of(cache, tmp_path)
    for holder in ({"host": "\x1b[2J\x1b[31m" * 300_000, "pid": 1}, {"host": "\x1b]0;pwned\x07" + "x" * 900, "pid": 1}):
        (work / ".lock").write_text(json.dumps(holder))
        result = runner.invoke(app, ["merge", str(work)])
        clean_exit(result)
        assert result.exit_code == 2 and len(result.output) < 1000 and "\x1b" not in result.output


def test_untrusted_text_is_escaped_and_cut():
    from dinocache.errors import untrusted

    shown = untrusted("\x1b[31m" + "y" * 500)
    assert "\x1b" not in shown and shown.startswith("\\x1b[31m") and len(shown) < 260 and "more characters" in shown


# ---- object storage: the remote is the truth, its manifest is capped, the logs are quiet ----------

URL = "s3://hostile/cache"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto_server import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture()
def s3(s3_endpoint, tmp_path, monkeypatch):
    yield from fresh_bucket(s3_endpoint, "hostile", tmp_path, monkeypatch)


def test_a_recreated_bucket_is_not_judged_by_the_old_mirror(s3, tmp_path, tiny_model_dir):
    fs, _ = s3
    images = make_images(tmp_path / "images")
    assert run(images, URL, tiny_model_dir).processed == 3
    fs.rm("hostile", recursive=True)  # the bucket is emptied and made again
    fs.mkdir("hostile")
    result = run(images, URL, "random:vits16", storage_dtype="float16")  # another model: a new cache
    assert result.processed == 3
    from dinocache import FeatureCache

    cache = FeatureCache(URL)
    assert cache.manifest["model"]["id"] == "random:vits16" and cache.manifest["storage"]["dtype"] == "float16"


def test_a_huge_remote_manifest_is_refused_unread(s3, monkeypatch):
    import dinocache.manifest

    fs, _ = s3
    monkeypatch.setattr(dinocache.manifest, "MAX_MANIFEST_BYTES", 10_000)
    fs.pipe_file(f"{URL}/manifest.json", b"[" + b" " * 50_000 + b"]")
    for args in (["stats", URL], ["verify", URL], ["keys", URL]):
        result = runner.invoke(app, args)
        clean_exit(result)
        assert result.exit_code in (1, 2) and "larger than 10000 bytes" in result.output


def test_normalize_without_statistics_names_the_remote_cache(s3, tmp_path, tiny_model_dir):
    from dinocache import FeatureCache

    run(make_images(tmp_path / "images"), URL, tiny_model_dir)
    with pytest.raises(CacheError) as caught:
        FeatureCache(URL, normalize=True)
    assert URL in str(caught.value) and str(tmp_path / "mirror") not in str(caught.value)


def test_s3_commands_print_no_botocore_info_lines(s3, tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys

    _, env = s3
    run(make_images(tmp_path / "images"), URL, tiny_model_dir)
    stats = subprocess.run(
        [sys.executable, "-m", "dinocache", "stats", URL], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert stats.returncode == 0, stats.stderr[-2000:]
    assert "botocore" not in stats.stderr and "credentials" not in stats.stderr.lower(), stats.stderr


# ---- class 11: FeatureCache follows docs/FORMAT.md ----------------------------------------------


def rewrite_shard_metadata(work, **changes):
    """Shard 0 with its metadata changed, re-recorded (size, sha256) in the manifest."""
    import hashlib

    from safetensors.torch import save

    from dinocache.stfile import SafetensorsFile

    manifest = read_manifest(work)
    record = manifest["shards"][0]
    shard = SafetensorsFile(work / record["file"])
    tensors = {name: shard.tensor(name) for name in shard.entries}
    data = save(tensors, metadata={**shard.metadata, **changes})
    (work / record["file"]).write_bytes(data)
    record.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (work / "manifest.json").write_text(json.dumps(manifest))


def rewrite_table_rows(work, change):
    """The sample table with `change(arrays)` applied, re-recorded in the manifest."""
    import hashlib

    import numpy as np
    from safetensors.numpy import save

    from dinocache.manifest import load_samples

    manifest = read_manifest(work)
    table = load_samples(work, manifest)
    arrays = {"key_bytes": np.array(table.key_bytes), "key_offsets": np.array(table.key_offsets)}
    arrays.update({n: np.array(c) for n, c in table.columns.items()})
    change(arrays)
    data = save(arrays, metadata={"format": "dinocache-samples", "format_version": "2", "rows": "3"})
    (work / manifest["samples"]["file"]).write_bytes(data)
    manifest["samples"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (work / "manifest.json").write_text(json.dumps(manifest))


def _swap_first_keys(arrays):
    import numpy as np

    offsets, raw = arrays["key_offsets"], arrays["key_bytes"].tobytes()
    keys = [raw[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    keys[0], keys[1] = keys[1], keys[0]  # same lengths ("0.png", "1.png"): offsets stay right
    arrays["key_bytes"] = np.frombuffer(b"".join(keys), np.uint8).copy()


def _share_a_row(arrays):
    arrays["shard"][1], arrays["row"][1] = arrays["shard"][0], arrays["row"][0]
    arrays["bucket"][1] = arrays["bucket"][0]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda w: rewrite_shard_metadata(w, format_version=str(FORMAT_VERSION + 1)),  # a future version
        lambda w: rewrite_shard_metadata(w, format="notdino"),
        lambda w: rewrite_shard_metadata(w, format_version="1"),  # a version-1 shard in a current cache
        lambda w: rewrite_table_rows(w, _swap_first_keys),
        lambda w: rewrite_table_rows(w, _share_a_row),
    ],
    ids=["shard of a future version", "shard format notdino", "shard of version 1", "unsorted keys", "shared row"],
)
def test_the_reader_refuses_what_format_md_says_a_reader_must(cache, tmp_path, tamper):
    from dinocache import FeatureCache

    work = copy_of(cache, tmp_path)
    tamper(work)
    with pytest.raises(CacheError):
        reader = FeatureCache(work)
        for key in reader.keys():
            reader[key]
    verified = runner.invoke(app, ["verify", str(work)])
    clean_exit(verified)
    assert verified.exit_code == 1


# ---- class 4: a --model folder whose pytorch_model.bin is a pickle ---------------------------------


@pytest.mark.parametrize("payload", ["pickle of objects", "garbage"])
def test_a_pickled_pytorch_model_bin_is_refused_without_a_traceback(tmp_path, tiny_model_dir, payload):
    import collections
    import pickle

    import yaml

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    data = pickle.dumps({"x": collections.Counter("abc")}) if payload != "garbage" else b"\x80garbage" * 10
    (folder / "pytorch_model.bin").write_bytes(data)
    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump(BUCKETS))
    images = make_images(tmp_path / "images")
    result = runner.invoke(app, [*extract_args(images, tmp_path / "out", folder), "-b", str(config)])
    clean_exit(result)
    assert result.exit_code == 2 and "the weights of" in result.output


# ---- class 10: the smaller ones -------------------------------------------------------------------


def test_a_sampler_that_would_give_no_batch_says_so(cache):
    from dinocache import BucketBatchSampler, FeatureCache

    reader = FeatureCache(cache)
    with pytest.warns(UserWarning, match="no batch"):
        assert len(BucketBatchSampler(reader, batch_size=64, drop_last=True)) == 0
    with pytest.warns(UserWarning, match="no batch"):
        BucketBatchSampler(reader, batch_size=2, drop_last=True, world_size=4)  # one full batch, four ranks
    assert len(BucketBatchSampler(reader, batch_size=64)) == 2  # without drop_last: one short batch per bucket
    assert len(BucketBatchSampler(reader, batch_size=2, drop_last=True)) == 1


def test_collating_nothing_is_a_clear_error():
    from dinocache import collate_features

    with pytest.raises(ValueError, match="no samples"):
        collate_features([])


def test_an_out_folder_inside_the_images_is_named(tmp_path, tiny_model_dir, caplog):
    images = make_images(tmp_path / "images")
    with caplog.at_level("WARNING", logger="dinocache"):
        run(images, images / "cache", tiny_model_dir)
    assert any("inside the image folder" in r.getMessage() for r in caplog.records)


def test_untrusted_manifest_text_reaches_the_terminal_escaped_and_cut(cache, tmp_path):
    work = copy_of(cache, tmp_path)
    manifest = read_manifest(work)
    evil = "\x1b]0;pwned\x07\x1b[2J" * 100_000
    manifest["failures"].append(
        {"key": "zz.png", "reason": evil, "detail": evil, "source_bytes": 1, "source_mtime_ns": "1"}
    )
    manifest["runs"][0].update(device=evil, started=evil)
    manifest["model"]["id"] = evil
    (work / "manifest.json").write_text(json.dumps(manifest))
    for args in (["stats", str(work)], ["show", str(work), "zz.png", "-o", str(tmp_path / "x.png")]):
        result = runner.invoke(app, args)
        clean_exit(result)
        assert "\x1b" not in result.output and len(result.output) < 10_000, args


# ---- generated cases: statistics files and locks ---------------------------------------------------


def test_generated_statistics_files_are_used_only_when_sound(with_stats, tmp_path):
    """Random shapes, dtypes and values: whatever verify accepts the reader applies, whatever it
    refuses the reader refuses too, and neither ever raises anything but our own error."""
    import torch

    from dinocache import FeatureCache

    rng = random.Random(2121)
    shapes = [(64,), (1,), (63,), (8, 8, 64), (64, 1), ()]
    values = [0.0, 1.0, -1.0, float("nan"), float("inf"), 1e308, -1e300, 3e38]
    for _trial in range(24):
        work = copy_of(with_stats, tmp_path)
        name = rng.choice(["patches_mean", "patches_var", "cls_mean", "cls_var"])
        dtype = rng.choice([torch.float64, torch.float64, torch.float32, torch.int64])
        shape = rng.choice(shapes)
        tensor = (
            torch.full(shape, rng.choice(values), dtype=torch.float64)
            if dtype == torch.float64
            else torch.zeros(shape, dtype=dtype)
        )
        replace_statistics(work, tensors={name: tensor})
        verified = runner.invoke(app, ["verify", str(work)])
        clean_exit(verified)
        try:
            FeatureCache(work, normalize=True)[0]
            accepted = True
        except CacheError:
            accepted = False
        assert accepted == (verified.exit_code == 0), (name, dtype, tensor.shape, verified.output)


def test_generated_lock_contents_give_a_clean_refusal(cache, tmp_path):
    rng = random.Random(2122)
    work = copy_of(cache, tmp_path)
    for _trial in range(12):
        content = bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 100, 5000])))
        if rng.random() < 0.5:
            content = json.dumps({"host": rng.choice(JUNK), "pid": rng.choice(JUNK)}, default=str).encode()
        (work / ".lock").write_bytes(content)
        result = runner.invoke(app, ["merge", str(work)])
        clean_exit(result)
        assert "\x1b" not in result.output and len(result.output) < 2000
