"""verify, stats and the CLI contract (exit codes, default --out, errors without tracebacks)."""

import json

import pytest
from typer.testing import CliRunner

from dinocache.cli import app
from dinocache.manifest import DEFAULT_OUT, read_manifest

runner = CliRunner()
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def extract_cli(images, out, model_dir, *extra):
    result = runner.invoke(
        app,
        [
            "extract",
            str(images),
            "--buckets",
            str(REPO / "configs" / "example-small.yaml"),
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--workers",
            "0",
            "--no-progress",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture()
def cache_dir(mixed_images, tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    extract_cli(mixed_images, out, tiny_model_dir)
    return out


def test_verify_passes_on_a_fresh_cache(cache_dir):
    result = runner.invoke(app, ["verify", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert "OK: 4 samples" in result.output


def test_verify_fails_naming_the_shard_after_one_flipped_byte(cache_dir):
    shard = read_manifest(cache_dir)["shards"][0]["file"]
    path = cache_dir / shard
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x01  # inside the tensor data, header still valid
    path.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(cache_dir)])
    assert result.exit_code == 1
    assert shard in result.output and "sha256" in result.output


@pytest.mark.parametrize(
    "fault, words",
    [
        ("truncate", ["bytes", "truncated"]),
        ("delete", ["missing"]),
        ("extra", ["not in the manifest"]),
        ("escape", ["escapes", "not inside"]),
        ("duplicate", ["more than once"]),
        ("rows", ["points at row 999"]),
        ("row_count", ["has shape", "expected [5"]),
    ],
)
def test_verify_names_other_faults(cache_dir, fault, words):
    manifest = read_manifest(cache_dir)
    first = cache_dir / manifest["shards"][0]["file"]
    if fault == "truncate":
        first.write_bytes(first.read_bytes()[:-100])
    elif fault == "delete":
        first.unlink()
    elif fault == "extra":
        (cache_dir / "shards" / "stray.safetensors").write_bytes(first.read_bytes())
    else:
        if fault == "escape":
            manifest["shards"][0]["file"] = "shards/../../outside.safetensors"
        elif fault == "duplicate":
            rewrite_index(cache_dir, manifest, lambda recs: recs.insert(1, dict(recs[0])))
        elif fault == "rows":
            rewrite_index(cache_dir, manifest, lambda recs: recs[0].update(row=999))
        elif fault == "row_count":
            manifest["shards"][0]["rows"] = 5
        (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(cache_dir)])
    assert result.exit_code == 1
    assert any(w in result.output for w in words), result.output


def rewrite_index(cache_dir, manifest, mutate):
    """Edit the sample index the way a careless tool would: consistent sizes and checksums, wrong content."""
    import hashlib

    from dinocache.index import SampleTable
    from dinocache.manifest import load_samples

    table = load_samples(cache_dir, manifest)
    records = [table.record(i) for i in range(len(table))]
    mutate(records)
    data = SampleTable.from_sorted_records(records).to_bytes()
    (cache_dir / manifest["samples"]["file"]).write_bytes(data)
    manifest["samples"].update(count=len(records), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_verify_catches_nan(cache_dir):
    import hashlib

    from safetensors.torch import load_file, save_file

    manifest = read_manifest(cache_dir)
    shard = manifest["shards"][0]
    path = cache_dir / shard["file"]
    tensors = load_file(str(path))
    tensors["patches"][0, 0, 0] = float("nan")
    save_file(tensors, str(path))
    shard["bytes"] = path.stat().st_size
    shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # checksums cannot see it: the value scan must
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(cache_dir)])
    assert result.exit_code == 1 and "NaN" in result.output


def test_stats_reports_buckets_failures_model_and_bytes(mixed_images, tmp_path, tiny_model_dir):
    (mixed_images / "broken.jpg").write_text("nope")
    out = tmp_path / "cache"
    extract_cli(mixed_images, out, tiny_model_dir)
    result = runner.invoke(app, ["stats", str(out), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["images"] == 4 and stats["failed"] == 1
    assert stats["failures_by_reason"] == {"not_an_image": 1}
    assert stats["failures"][0]["key"] == "broken.jpg"
    by_name = {b["name"]: b for b in stats["buckets"]}
    assert by_name["210x300"]["images"] == 1 and by_name["210x300"]["input"] == "208x304"
    assert sum(b["share"] for b in stats["buckets"]) == pytest.approx(1.0)
    assert stats["bytes_on_disk"] >= sum(p.stat().st_size for p in (out / "shards").iterdir())
    assert stats["storage_dtype"] == "bfloat16" and stats["model"] == str(tiny_model_dir)
    human = runner.invoke(app, ["stats", str(out)])
    assert "208x304" in human.output and "not_an_image" in human.output and "broken.jpg" in human.output
    assert stats["damaged_shards"] == [] and "DAMAGED" not in human.output
    shards = sorted((out / "shards").iterdir())
    shards[0].unlink()
    with open(shards[1], "r+b") as f:
        f.truncate(10)
    damaged = json.loads(runner.invoke(app, ["stats", str(out), "--json"]).output)["damaged_shards"]
    assert sorted(damaged) == sorted(f"shards/{p.name}" for p in shards[:2])
    human = runner.invoke(app, ["stats", str(out)])
    assert human.exit_code == 0 and "DAMAGED    2 shard(s) missing or the wrong size" in human.output


def test_default_out_is_shared_by_extract_verify_and_stats(mixed_images, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "extract",
            str(mixed_images),
            "--buckets",
            str(REPO / "configs" / "example-small.yaml"),
            "--model",
            str(tiny_model_dir),
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / DEFAULT_OUT / "manifest.json").is_file()
    assert runner.invoke(app, ["verify"]).exit_code == 0
    stats = runner.invoke(app, ["stats", "--json"])
    assert stats.exit_code == 0 and json.loads(stats.output)["images"] == 4


@pytest.mark.parametrize(
    "args, words",
    [
        (["extract", "{images}", "--buckets", "{tmp}/missing.yaml"], ["does not exist", "--buckets"]),
        (["extract", "{tmp}/no-such-dir", "--buckets", "{cfg}"], ["input folder", "does not exist"]),
        (["extract", "{images}", "--buckets", "{cfg}", "--model", "{tmp}/no-model"], ["model path", "does not exist"]),
        (
            ["extract", "{images}", "--buckets", "{cfg}", "--model", "random:vitz99"],
            ["unknown architecture", "random:vits16"],
        ),
        (["extract", "{images}", "--buckets", "{cfg}", "--storage-dtype", "int8"], ["storage-dtype"]),
        (["extract", "{images}", "--buckets", "{cfg}", "--image-mean", "0.5,0.5"], ["--image-mean"]),
        (
            ["extract", "{images}", "--buckets", "{cfg}", "--out", "{tmp}/a-file", "--model", "random:vits16"],
            ["cannot create the output folder", "--out"],
        ),
        (["extract", "{images}", "--buckets", "{cfg}", "--layers", "x"], ["--layers"]),
        (["verify", "{tmp}/nothing-here"], ["does not exist"]),
        (["stats", "{tmp}"], ["no manifest.json"]),
    ],
)
def test_user_errors_have_a_message_and_no_traceback(mixed_images, tmp_path, args, words):
    (tmp_path / "a-file").write_text("I am a file, not a folder")
    args = [a.format(images=mixed_images, tmp=tmp_path, cfg=REPO / "configs" / "example-small.yaml") for a in args]
    result = runner.invoke(app, args + (["--no-progress"] if args[0] == "extract" else []))
    output = result.output + (result.stderr if result.stderr_bytes else "")
    assert result.exit_code in (1, 2), output
    assert "Traceback" not in output
    for word in words:
        assert word in output, output


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dinocache", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "extract" in proc.stdout and "verify" in proc.stdout


def test_verify_source_lists_missing_and_changed_images(cache_dir, mixed_images):
    from conftest import save_scene

    save_scene(mixed_images / "added.png", 200, 200, seed=9)
    save_scene(mixed_images / "wide.png", 600, 300, seed=42)  # rewritten: new size and mtime
    (mixed_images / "square.png").unlink()
    result = runner.invoke(app, ["verify", str(cache_dir), "--source", str(mixed_images)])
    assert result.exit_code == 1
    assert "added.png is in" in result.output and "wide.png changed" in result.output
    assert "1 cached image(s) are no longer in" in result.output
    assert "square.png" not in result.output.split("FAILED")[-1]


def test_verify_recompute_passes_clean_and_catches_swapped_rows(mixed_images, tmp_path, tiny_model_dir):
    from conftest import save_scene

    save_scene(mixed_images / "square2.png", 310, 300, seed=8)  # two images in one bucket
    cache_dir = tmp_path / "cache"
    extract_cli(mixed_images, cache_dir, tiny_model_dir)
    clean = runner.invoke(app, ["verify", str(cache_dir), "--source", str(mixed_images), "--recompute", "5"])
    assert clean.exit_code == 0, clean.output
    assert "recomputed 5 sample(s)" in clean.output
    # Swap the rows of two samples of one bucket: every checksum and shape still holds.
    manifest = read_manifest(cache_dir)

    def swap(records):
        by_bucket = {}
        for r in records:
            by_bucket.setdefault(r["bucket"], []).append(r)
        a, b = next(group for group in by_bucket.values() if len(group) >= 2)[:2]
        (a["shard"], a["row"]), (b["shard"], b["row"]) = (b["shard"], b["row"]), (a["shard"], a["row"])

    rewrite_index(cache_dir, manifest, swap)
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    assert runner.invoke(app, ["verify", str(cache_dir)]).exit_code == 0  # checksums cannot see it
    caught = runner.invoke(app, ["verify", str(cache_dir), "--source", str(mixed_images), "--recompute", "5"])
    assert caught.exit_code == 1
    assert caught.output.count("recomputed features differ") == 2, caught.output


def test_stats_histogram_and_runs(cache_dir):
    stats = json.loads(runner.invoke(app, ["stats", str(cache_dir), "--json"]).output)
    hist = {h["aspect"]: h["images"] for h in stats["aspect_histogram"]}
    assert sum(hist.values()) == stats["images"] == 4
    assert hist["2.00-4.00"] == 1 and hist["0.95-1.05"] == 1 and hist["0.67-0.80"] == 1 and hist["1.25-1.50"] == 1
    (run,) = stats["runs"]
    assert run["processed"] == 4 and run["images_per_second"] > 0
    human = runner.invoke(app, ["stats", str(cache_dir)]).output
    assert "source aspect ratio" in human and "img/s" in human and "2.00-4.00" in human


def test_a_file_given_as_the_cache_is_named_as_a_file(tmp_path):
    """From a newcomer trial: `stats cache/manifest.json` said the cache folder does not exist."""
    from dinocache.errors import CacheError
    from dinocache.manifest import read_manifest

    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(CacheError) as info:
        read_manifest(tmp_path / "manifest.json")
    assert "is a file" in str(info.value) and info.value.hint == f"pass the folder: {tmp_path}"
