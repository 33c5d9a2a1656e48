"""Every source input is hostile (issue 21, source side): list files, tar headers and crops lines
are checked once, at the boundary. A malformed value is a DinocacheError or a recorded failure
whose record the manifest schema accepts (the cache is never bricked), reads are bounded by the
images' pixels, and nothing hangs."""

import http.server
import io
import json
import random
import tarfile
import threading

import pytest
from bench_hostile_memory import measure, png_bytes
from conftest import save_scene
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import DinocacheError
from dinocache.extract import extract
from dinocache.manifest import read_manifest
from dinocache.sources import open_source, scan_tar

runner = CliRunner()
BUCKETS = {"buckets": [[64, 64], [96, 48]]}


def run(source, out, model_dir, **kwargs):
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config(BUCKETS),
        model=str(model_dir),
        workers=0,
        progress=False,
        dtype="float32",
        **kwargs,
    )
    return extract(source, options)


def recordable(src) -> bool:
    """What any manifest holds for a source's size and mtime (docs/FORMAT.md), checked literally."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (src.size, src.mtime_ns))
    return ints and -1 <= src.size <= 2**62 and -(2**63) <= src.mtime_ns < 2**63


def pax_tar(path, members):
    """(name, data, mtime) members in a PAX tar; names may hold undecodable bytes (surrogates)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tar:
        for name, data, mtime in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return path


# ---- class 1: nothing extract records may fail the manifest schema ----------------------------------


def assert_cache_usable(out, good_keys, source, model_dir):
    """keys, stats, FeatureCache and a rerun of extract all work, and the good samples are there."""
    read_manifest(out)
    keys = runner.invoke(app, ["keys", str(out)])
    assert keys.exit_code == 0 and sorted(keys.output.split()) == sorted(good_keys), keys.output
    assert runner.invoke(app, ["stats", str(out)]).exit_code == 0
    cache = FeatureCache(out)
    assert sorted(cache.keys()) == sorted(good_keys) and all(cache[k]["cls"].numel() for k in good_keys)
    again = run(source, out, model_dir)
    assert again.processed == 0 and again.skipped == len(good_keys)


def test_hostile_list_rows_are_recorded_and_never_brick_the_cache(tmp_path, tiny_model_dir):
    save_scene(tmp_path / "a.png", 64, 64, seed=1)
    save_scene(tmp_path / "b.png", 96, 48, seed=2)
    rows = [
        {"path": "a.png"},
        {"path": "b.png", "size": "1234", "mtime_ns": "5", "width": 96, "height": 48},  # text hints are fine
        {"path": "a.png", "key": "negative", "size": -7, "mtime_ns": 5},
        {"path": "a.png", "key": "huge", "size": 1e20, "mtime_ns": 5},
        {"path": "a.png", "key": "future", "size": 10, "mtime_ns": 1e30},
        {"path": "a.png", "key": "fraction", "size": 10.5, "mtime_ns": 5},
        {"path": "a.png", "key": "digits", "size": "9" * 5000, "mtime_ns": 5},
        {"path": "a.png", "key": "sides", "width": -5, "height": 10},
        {"path": "a.png", "key": "wide", "width": 2**40, "height": 1},
        {"path": "a.png", "key": "word", "mtime_ns": "yesterday", "size": 3},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(str(tmp_path / "list.jsonl"), tmp_path / "out", tiny_model_dir)
    failures = {f["key"]: f["reason"] for f in read_manifest(tmp_path / "out")["failures"]}
    bad = {"negative", "huge", "future", "fraction", "digits", "sides", "wide", "word"}
    assert failures == {key: "bad_list_row" for key in bad} and result.processed == 2
    assert_cache_usable(tmp_path / "out", ["a.png", "b.png"], str(tmp_path / "list.jsonl"), tiny_model_dir)


def test_hostile_tar_headers_are_recorded_and_never_brick_the_cache(tmp_path, tiny_model_dir):
    members = [
        ("good.png", png_bytes(seed=1), 1_700_000_000),
        ("far-future.png", png_bytes(seed=2), 1e20),
        ("long-ago.png", png_bytes(seed=3), -1e20),
        ("caf\udce9.png", png_bytes(seed=4), 1_700_000_000),  # a Latin-1 name: not UTF-8
    ]
    tar = pax_tar(tmp_path / "t.tar", members)
    run(str(tar), tmp_path / "out", tiny_model_dir)
    failures = {f["key"]: f["reason"] for f in read_manifest(tmp_path / "out")["failures"]}
    assert failures == {"t.tar/far-future": "corrupt", "t.tar/long-ago": "corrupt", "t.tar/caf\\xe9": "bad_filename"}
    assert_cache_usable(tmp_path / "out", ["t.tar/good"], str(tar), tiny_model_dir)


# ---- class 4: malformed list files and crops lines are clear errors ----------------------------------


def parquet_bytes():
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"path": f"{i}.png"} for i in range(50)]), buffer)
    return buffer.getvalue()


MALFORMED_LISTS = {
    "nan.jsonl": '{"path": "a.png", "size": NaN, "mtime_ns": 1}\n',
    "infinity.jsonl": '{"path": "a.png", "size": 1, "mtime_ns": Infinity}\n',
    "nested.jsonl": "[" * 200_000 + "]" * 200_000 + "\n",
    "latin1.jsonl": b'{"path": "caf\xe9.png"}\n',
    "huge-field.csv": "path\n" + "a" * 200_000 + ".png\n",
    "latin1.csv": b"path\ncaf\xe9.png\n",
    "corrupt.parquet": b"PAR1 this is not parquet PAR1",
    "truncated.parquet": parquet_bytes()[:300],
    "a-folder.jsonl": None,
    "not-a-record.jsonl": "[1, 2]\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_LISTS))
def test_a_malformed_list_file_is_a_clear_error(tmp_path, name):
    content = MALFORMED_LISTS[name]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DinocacheError):
        open_source(str(path)).scan()
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    result = runner.invoke(app, ["plan", str(path), "-m", "random:vits16", "-b", str(tmp_path / "b.yaml")])
    assert result.exit_code == 2 and "fix:" in result.output, result.output


HOSTILE_TOKENS = [b"NaN", b"-Infinity", b"1e400", b"-7", b"[" * 5000, b"\xff\xfe", b'"', b"\x00", b"9" * 5000, b","]


def test_fuzzed_list_files_give_an_error_or_recordable_rows(tmp_path):
    """Seeded mutations of a good JSONL and CSV list: only DinocacheError, or rows whose size and
    mtime any manifest can hold."""
    for name in ("a.png", "b.png"):
        save_scene(tmp_path / name, 64, 64)
    good = {
        "list.jsonl": b'{"path": "a.png", "size": 120, "mtime_ns": 5, "width": 64, "height": 64}\n{"path": "b.png"}\n',
        "list.csv": b"path,size,mtime_ns,width,height\na.png,120,5,64,64\nb.png,,,,\n",
    }
    rng = random.Random(21)
    for case in range(120):
        name = rng.choice(sorted(good))
        data = bytearray(good[name])
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[at : at + rng.randint(0, 4)] = rng.choice(HOSTILE_TOKENS)
            else:
                data[at] = rng.randrange(256)
        (tmp_path / name).write_bytes(bytes(data))
        try:
            files = open_source(str(tmp_path / name)).scan()
        except DinocacheError:
            continue
        assert all(recordable(s) for s in files), (case, bytes(data))


def test_fuzzed_tar_headers_never_raise_and_record_only_recordable_values(tmp_path):
    members = [(f"m{i}.png", png_bytes(8, 8, seed=i), 1_700_000_000 + i) for i in range(3)]
    good = pax_tar(tmp_path / "good.tar", members).read_bytes()
    rng = random.Random(21)
    for case in range(150):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            block = rng.randrange(len(good) // 512) * 512
            at = block + rng.randrange(512)
            if rng.random() < 0.4:
                data[at : at + 4] = rng.choice(
                    [b"1e20", b"-1e9", b"\xff\xff\xff\xff", b"777777777777"[:4], b"\x80\x00"]
                )
            else:
                data[at] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        path = tmp_path / "fuzzed.tar"
        path.write_bytes(bytes(data))
        files = scan_tar(str(path))  # never raises
        assert all(recordable(s) for s in files), case


def test_crops_nested_deep_are_a_clear_error_for_plan_and_extract(tmp_path, tiny_model_dir):
    save_scene(tmp_path / "images" / "a.png", 64, 64)
    crops = tmp_path / "crops.jsonl"
    crops.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    for command in (["plan", "-m", "random:vits16"], ["extract", "-m", str(tiny_model_dir)]):
        result = runner.invoke(app, [command[0], str(tmp_path / "images"), *command[1:], "--crops", str(crops)])
        assert result.exit_code == 2 and "nested too deeply" in result.output, result.output


# ---- class 5: reads bounded by pixels, regular files only, lazy patterns ------------------------------


def test_holes_devices_fifos_and_huge_patterns_are_bounded_and_never_hang(tmp_path):
    """A 64x64 PNG followed by a 2 GiB hole (in a folder, a tar and a list), /dev/zero and a FIFO
    in a list, and a pattern of 10M tar names: plan and extract finish, within ~0.5 GB."""
    result = measure(tmp_path, hole_gib=2, timeout=180)
    assert result["exit_codes"] == [0, 0, 0, 0, 0, 0, 2], result
    assert result["peak_rss_mb"] < 1000, result  # reading a hole would take > 2048
    reasons = {}
    for name in ("folder", "tar", "list"):
        reasons.update({f["key"]: f["reason"] for f in read_manifest(tmp_path / f"out-{name}")["failures"]})
    assert reasons == {
        "holed.png": "too_large",
        "holed.tar/holed": "too_large",
        "holed-hinted": "too_large",
        "zero": "not_a_file",
        "zero-hinted": "not_a_file",
        "fifo": "not_a_file",
        "fifo-hinted": "not_a_file",
    }


# ---- class 8: a host that cannot be reached is not a missing file ---------------------------------


def test_an_unreachable_url_is_recorded_as_unreachable_and_a_404_as_missing(tmp_path):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(404)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rows = [
            {"url": "http://127.0.0.1:9/refused.png", "key": "refused"},
            {"url": f"http://127.0.0.1:{server.server_port}/gone.png", "key": "gone"},
        ]
        (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files = {s.key: s.problem for s in open_source(str(tmp_path / "urls.jsonl")).scan()}
    finally:
        server.shutdown()
    assert files["refused"][0] == "unreachable" and "cannot reach" in files["refused"][1]
    assert files["gone"][0] == "missing"


# ---- classes 10 and 11: crops and size hints ----------------------------------------------------------


def crops_file(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_a_box_outside_its_image_fails_that_image_only(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    save_scene(images / "a.png", 120, 80, seed=1)
    save_scene(images / "b.png", 120, 80, seed=2)
    crops = crops_file(
        tmp_path / "crops.jsonl",
        [
            {"key": "a.png", "size": [96, 64], "box": [0, 0, 120, 80]},
            {"key": "b.png", "size": [96, 64], "box": [0, 0, 121, 80]},  # one pixel too wide
        ],
    )
    result = runner.invoke(
        app,
        [
            "extract",
            str(images),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(tiny_model_dir),
            "--crops",
            crops,
            "--workers",
            "0",
            "--no-progress",
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    failures = {f["key"]: f for f in read_manifest(tmp_path / "out")["failures"]}
    assert list(failures) == ["b.png"] and failures["b.png"]["reason"] == "crop_outside"
    assert "120x80" in failures["b.png"]["detail"]
    assert FeatureCache(tmp_path / "out").keys() == ["a.png"]


def test_crop_boxes_of_another_aspect_than_their_size_are_warned_about(tmp_path, caplog):
    from dinocache.config import parse_bucket_config
    from dinocache.crops import load_crops

    images = tmp_path / "images"
    save_scene(images / "a.png", 300, 200)
    sources = open_source(str(images)).scan()
    config = parse_bucket_config({"buckets": [[96, 64], [64, 96]]})
    right = crops_file(tmp_path / "right.jsonl", [{"key": "a.png", "size": [96, 64], "box": [0, 0, 300, 200]}])
    swapped = crops_file(tmp_path / "swapped.jsonl", [{"key": "a.png", "size": [64, 96], "box": [0, 0, 300, 200]}])
    with caplog.at_level("WARNING", logger="dinocache"):
        load_crops(right, config, sources)
        assert "aspect ratio" not in caplog.text
        load_crops(swapped, config, sources)
    assert "1 of 1 crop(s)" in caplog.text and "[height, width]" in caplog.text
    plan = runner.invoke(app, ["plan", str(images), "--crops", swapped, "-m", "random:vits16"])
    assert plan.exit_code == 0 and "outside its --crops box" in plan.output, plan.output
    assert "aspect ratio change" not in plan.output


def test_list_sizes_taken_before_exif_rotation_are_named_and_fixed_by_the_next_run(tmp_path, tiny_model_dir):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 96x48, upright 48x96
    save_scene(images / "turned.jpg", 96, 48, quality=95, exif=exif.tobytes())
    rows = [{"path": "images/turned.jpg", "width": 96, "height": 48}]  # the stored size, as PIL's .size gives
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"buckets": parse_bucket_config({"buckets": [[96, 48], [48, 96]]})}
    first = extract(
        str(tmp_path / "list.jsonl"),
        ExtractOptions(
            out=tmp_path / "out", model=str(tiny_model_dir), workers=0, progress=False, dtype="float32", **options
        ),
    )
    failure = read_manifest(tmp_path / "out")["failures"][0]
    assert first.processed == 0 and failure["reason"] == "size_hint" and "EXIF" in failure["detail"]
    again = extract(
        str(tmp_path / "list.jsonl"),
        ExtractOptions(
            out=tmp_path / "out", model=str(tiny_model_dir), workers=0, progress=False, dtype="float32", **options
        ),
    )
    assert again.processed == 1
    assert FeatureCache(tmp_path / "out").record("images/turned.jpg")["source_size"] == [48, 96]


@pytest.mark.parametrize("pattern", ["{0..99999999}.tar", "{1.." + "9" * 5000 + "}.tar", "{a,b}{0..999999}.tar"])
def test_huge_brace_patterns_are_a_clear_error_at_once(tmp_path, pattern):
    import time

    began = time.perf_counter()
    with pytest.raises(DinocacheError):
        open_source(str(tmp_path / pattern)).scan()
    assert time.perf_counter() - began < 5
