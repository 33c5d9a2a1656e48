"""The manifest and sample index are untrusted input: damaged or hostile content gives a clear
CacheError (or a verify problem), never a crash, a traceback or a read outside the cache."""

import copy
import json
import random
import re

import pytest
from test_verify_stats_cli import extract_cli
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.errors import DinocacheError
from dinocache.manifest import read_manifest
from dinocache.stats import cache_stats
from dinocache.verify import verify_cache


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = 400  # deep enough to matter, shallow enough for json.dumps to write it
JUNK = [
    None,
    -1,
    0,
    2**70,
    1e308,
    "x",
    "",
    "../../etc/passwd",
    "/etc/passwd",
    "shards/../../x",
    [],
    {},
    [1, 2],
    {"a": 1},
    True,
    "shards/\x00",
    float("nan"),
    5,
    [[1, 2], [3, 4]],
    {"seconds": "x"},
    [[[[[]]]]],
    nested(DEEP),
    "\udcff",
    "%s",
    -7,  # issue 21: the hints a list row or tar header gave, and terminal escapes
    1e20,
    1e30,
    "\x1b]0;pwned\x07\x1b[2J" * 1000,
]
HUGE_INT = "9" * 5000  # beyond Python's int parsing limit: spliced into the text


def paths(obj, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from paths(v, prefix + (i,))


def set_path(doc, path, value):
    if not path:
        return value
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory, tiny_model_dir):
    from conftest import save_scene

    root = tmp_path_factory.mktemp("untrusted")
    for i, (w, h) in enumerate([(300, 300), (600, 300), (280, 400)]):
        save_scene(root / "images" / f"{i}.png", w, h, seed=i)
    extract_cli(root / "images", root / "cache", tiny_model_dir)
    return root / "cache"


def exercise(cache_dir):
    """Everything a user can do with a cache; only DinocacheError may escape (KeyError for a missing key)."""
    try:
        cache = FeatureCache(cache_dir)
        for i in range(len(cache)):
            cache[i]
        for key in cache.keys():
            cache[key]
    except DinocacheError:
        pass
    try:
        cache_stats(cache_dir)
    except DinocacheError:
        pass
    report = verify_cache(cache_dir)  # never raises: reports
    return report


def test_fuzzed_manifests_never_crash(good_cache, tmp_path):
    original = json.loads((good_cache / "manifest.json").read_text())
    rng = random.Random(1)
    all_paths = list(paths(original))
    work = tmp_path / "cache"
    import shutil

    for _trial in range(120):
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(good_cache, work)
        doc = copy.deepcopy(original)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(all_paths)
            try:
                doc = set_path(doc, path, rng.choice(JUNK))
            except (TypeError, KeyError, IndexError):
                pass
        text = json.dumps(doc)
        if rng.random() < 0.1:  # a number beyond what int() parses
            text = text.replace('"count": ', f'"count": {HUGE_INT}', 1)
        if rng.random() < 0.05:  # nesting far deeper than any recursion limit
            text = "[" * 100_000 + text + "]" * 100_000
        (work / "manifest.json").write_text(text)
        report = exercise(work)
        if doc != original:
            assert isinstance(report.problems, list)


def test_fuzzed_sample_tables_never_crash(good_cache, tmp_path):
    """The sample table's safetensors header, mutated: dtypes, shapes, offsets, lists, nesting,
    key bytes. Only our own errors and verify findings may come out."""
    import hashlib
    import shutil

    manifest = json.loads((good_cache / "manifest.json").read_text())
    table_bytes = (good_cache / manifest["samples"]["file"]).read_bytes()
    n = int.from_bytes(table_bytes[:8], "little")
    header, data = json.loads(table_bytes[8 : 8 + n]), table_bytes[8 + n :]
    tensor_paths = [p for p in paths(header) if p and p[0] != "__metadata__"]
    rng = random.Random(2)
    work = tmp_path / "cache"
    for _trial in range(60):
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(good_cache, work)
        doc = copy.deepcopy(header)
        for _ in range(rng.randint(1, 3)):
            try:
                doc = set_path(doc, rng.choice(tensor_paths), rng.choice(JUNK + ["U8", "I64", "F16", [3], [1, 2, 3]]))
            except (TypeError, KeyError, IndexError):
                pass
        raw = json.dumps(doc).encode()
        body = bytearray(data)
        if rng.random() < 0.3 and body:  # key bytes or offsets garbled too
            body[rng.randrange(len(body))] = rng.randrange(256)
        blob = len(raw).to_bytes(8, "little") + raw + bytes(body)
        (work / manifest["samples"]["file"]).write_bytes(blob)
        doc_manifest = copy.deepcopy(manifest)
        doc_manifest["samples"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        (work / "manifest.json").write_text(json.dumps(doc_manifest))
        exercise(work)


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[]", b"null", b'{"format": "dinocache", "format_version": 99}', b"\xff\xfe garbage"]
)
def test_unreadable_manifests_give_a_clear_error(good_cache, tmp_path, content):
    import shutil

    work = tmp_path / "cache"
    shutil.copytree(good_cache, work)
    (work / "manifest.json").write_bytes(content)
    with pytest.raises(DinocacheError):
        read_manifest(work)
    result = CliRunner().invoke(app, ["stats", str(work)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not verify_cache(work).ok


def test_damaged_sample_index(good_cache, tmp_path):
    import shutil

    work = tmp_path / "cache"
    shutil.copytree(good_cache, work)
    manifest = read_manifest(work)
    index = work / manifest["samples"]["file"]
    data = bytearray(index.read_bytes())
    data[10:20] = b"\x00" * 10  # the header's JSON
    index.write_bytes(bytes(data))
    report = exercise(work)
    assert not report.ok and any("sample table" in p for p in report.messages())


def test_shard_paths_outside_the_cache_are_refused(good_cache, tmp_path):
    import shutil

    work = tmp_path / "cache"
    shutil.copytree(good_cache, work)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((work / read_manifest(work)["shards"][0]["file"]).read_bytes())
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "shards/../../outside.safetensors"
    (work / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DinocacheError, match="escapes"):
        cache = FeatureCache(work)
        for i in range(len(cache)):
            cache[i]
    assert any("escapes" in p for p in verify_cache(work).messages())


def test_reader_never_unpickles():
    import importlib
    import inspect
    import pkgutil

    import dinocache.index
    import dinocache.reader
    import dinocache.verify

    parts = [
        importlib.import_module(m.name) for m in pkgutil.iter_modules(dinocache.verify.__path__, "dinocache.verify.")
    ]
    assert len(parts) >= 5  # verify is a package: every part of it is checked
    for module in (dinocache.reader, dinocache.index, dinocache.verify, *parts):
        source = inspect.getsource(module)
        assert not re.search(r"torch\.load\(|pickle\.loads?\(|numpy\.load\(|np\.load\(", source), module.__name__
