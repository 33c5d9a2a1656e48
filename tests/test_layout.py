"""The layout owner (layout.py): plan's projection equals what extract writes for every storage
option, every storage dtype of the table round-trips, and the format spec's own example reads
what FeatureCache reads."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_scene, token_cosine

from dinocache import FeatureCache
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.extract import extract
from dinocache.layout import STORAGE_DTYPES, Layout
from dinocache.plan import plan_extraction
from dinocache.verify import verify_cache

REPO = Path(__file__).resolve().parents[1]
V2 = REPO / "tests" / "data" / "v2"
BUCKETS = {"buckets": [[64, 64], [96, 48], [48, 96]]}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout") / "images"
    for i, (w, h) in enumerate([(64, 64), (100, 50), (50, 100), (64, 66), (200, 100)]):
        save_scene(root / f"pic{i}.png", w, h, seed=i)
    save_scene(root / "deeper" / "ünïcode name.png", 64, 64, seed=9)
    return root


def extract_with(images, out, model_dir, layout: Layout, shard_mb: float = 512):
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config(BUCKETS),
        model=str(model_dir),
        workers=0,
        progress=False,
        dtype="float32",
        storage_dtype=layout.dtype,
        keep_registers=layout.registers,
        pool=layout.pool,
        layers=layout.layers,
        flip=layout.flip,
        shard_max_bytes=int(shard_mb * 1024**2),
    )
    extract(images, options)
    return FeatureCache(out)


GRID = [
    Layout(dtype=d, pool=p, registers=r, layers=k)
    for d, p, r, k in itertools.product(STORAGE_DTYPES, (1, 2), (False, True), ((), (1,)))
]
GRID += [Layout(flip=True), Layout(dtype="float8_e4m3fn", flip=True, registers=True, layers=(2,), pool=2)]


def test_plan_projects_exactly_what_extract_writes_for_every_option(images, tmp_path, tiny_model_dir):
    for n, layout in enumerate(GRID):
        for shard_mb in (512, 0.01):  # one shard per bucket, and shards cut every few rows
            cache = extract_with(images, tmp_path / f"c{n}-{shard_mb}", tiny_model_dir, layout, shard_mb)
            written = sum(s["bytes"] for s in cache.manifest["shards"])
            projected = plan_extraction(
                images,
                parse_bucket_config(BUCKETS),
                str(tiny_model_dir),
                layout,
                shard_max_bytes=int(shard_mb * 1024**2),
            )
            assert projected.shards == len(cache.manifest["shards"]), layout
            assert abs(projected.projected_bytes - written) <= 0.01 * written, (
                layout,
                shard_mb,
                projected.projected_bytes,
                written,
            )


@pytest.mark.parametrize("dtype", sorted(STORAGE_DTYPES))
def test_every_storage_dtype_round_trips(images, tmp_path, tiny_model_dir, dtype):
    """A new row of STORAGE_DTYPES is covered here without another line of test code."""
    ref = extract_with(images, tmp_path / "ref", tiny_model_dir, Layout(dtype="float32"))
    got = extract_with(images, tmp_path / dtype, tiny_model_dir, Layout(dtype=dtype, registers=True))
    assert verify_cache(tmp_path / dtype).ok
    floor = 0.99 if STORAGE_DTYPES[dtype].itemsize == 1 else 0.999
    for key in ref.keys():
        a, b = ref[key], got[key]
        for name in ("cls", "patches"):
            assert b[name].shape == a[name].shape
            cos = token_cosine(b[name].reshape(-1, 64), a[name].reshape(-1, 64))
            assert cos.min() >= floor, (dtype, name, cos.min())


def format_example() -> str:
    text = (REPO / "docs" / "FORMAT.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "def read_sample" in b)
    return example


@pytest.mark.parametrize(
    "layout",
    [
        Layout(),
        Layout(pool=2),
        Layout(dtype="float8_e4m3fn"),
        Layout(dtype="float16"),
        Layout(dtype="float32"),
        Layout(layers=(1, 2)),
        Layout(flip=True, registers=True),
    ],
    ids=["default", "pool2", "float8", "float16", "float32", "layers", "flip"],
)
def test_the_format_spec_example_reads_what_feature_cache_reads(images, tmp_path, layout):
    # A final LayerNorm with a real affine (tests/data/v2/model), so that normed differs from
    # what format 3 stores and the example must apply weight and bias exactly as FeatureCache does.
    extract_with(images, tmp_path / "cache", V2 / "model", layout)
    assert_format_example_reads_like_feature_cache(tmp_path / "cache")


@pytest.mark.parametrize("name", ["v1/cache-v1", "v1/cache-v1-f8", "v2/cache-v2", "v2/cache-v2-f8"])
def test_the_format_spec_example_reads_format_1_and_2_caches(name):
    assert_format_example_reads_like_feature_cache(REPO / "tests" / "data" / name)


def assert_format_example_reads_like_feature_cache(root: Path) -> None:
    cache = FeatureCache(root)
    namespace: dict = {}
    exec(format_example(), namespace)  # noqa: S102 - the spec's own code, run as a stranger would
    for key in cache.keys():
        theirs = namespace["read_sample"](str(root), key)
        ours = cache[key]
        names = {n for n, v in ours.items() if isinstance(v, torch.Tensor)}
        assert set(theirs) == names, key
        for name in names:
            assert theirs[name].shape == ours[name].shape, (key, name)
            assert theirs[name].dtype == ours[name].dtype, (key, name)
            assert torch.equal(theirs[name], ours[name]), (key, name)


def test_a_format_1_cache_still_reads(tmp_path):
    """tests/data/v1 was written by dinocache 0.1.0: it reads, verifies, and its values are the
    raw tensors of its shards."""
    from safetensors import safe_open

    from dinocache.errors import CacheError

    for name in ("cache-v1", "cache-v1-f8"):
        root = REPO / "tests" / "data" / "v1" / name
        assert verify_cache(root).ok, verify_cache(root).messages()
        cache = FeatureCache(root)
        assert len(cache) == 3 and cache.manifest["format_version"] == 1
        for key in cache.keys():
            record = cache.record(key)
            shard = cache.manifest["shards"][record["shard"]]
            bucket = cache.manifest["buckets"][record["bucket"]]
            with safe_open(str(root / shard["file"]), "pt") as fh:
                names = set(fh.keys())
                raw = fh.get_tensor("patches")[record["row"]].float()
                if "patches_scale" in fh.keys():
                    raw = raw * fh.get_tensor("patches_scale")[record["row"]]
            assert torch.equal(cache[key]["patches"].float().reshape(raw.shape), raw)
            assert cache[key]["patches"].dtype == (torch.float32 if "patches_scale" in names else torch.bfloat16)
            assert cache[key]["grid"] == tuple(bucket["stored_grid"])
        for flavour in ("ln_noaffine", "prenorm"):  # format 1 records no final norm: refused, as before
            with pytest.raises(CacheError, match="rebuild"):
                FeatureCache(root, flavour=flavour)


@pytest.mark.parametrize("name", ["cache-v2", "cache-v2-f8"])
def test_a_format_2_cache_reads_every_flavour_as_before(name):
    """tests/data/v2 was written by dinocache at 3d7826d (format 2: the normed tokens themselves),
    which also saved what its FeatureCache read for every key, flavour and feature
    (tests/data/v2/generate.py). Both read paths (the batch gather and norm-stats' _read) must
    give the same tensors, dtype included."""
    from safetensors.torch import load_file

    from dinocache.errors import CacheError

    root = V2 / name
    assert verify_cache(root).ok, verify_cache(root).messages()
    expected = load_file(str(V2 / f"expected-{name}.safetensors"))
    compared = set()
    for flavour in ("normed", "ln_noaffine", "prenorm"):
        if not any(k.startswith(flavour + "|") for k in expected):
            with pytest.raises(CacheError, match="--pool"):
                FeatureCache(root, flavour=flavour)
            continue
        cache = FeatureCache(root, flavour=flavour)
        assert cache.manifest["format_version"] == 2 and cache.layout.normed_values == "normed"
        for item in cache.__getitems__(list(range(len(cache)))):
            for feature, value in item.items():
                if isinstance(value, torch.Tensor):
                    want = expected[f"{flavour}|{item['key']}|{feature}"]
                    assert value.dtype == want.dtype and torch.equal(value, want), (flavour, feature)
                    compared.add(f"{flavour}|{item['key']}|{feature}")
        for shard_index in range(len(cache.manifest["shards"])):
            keys = [k for k in cache.keys() if cache.record(k)["shard"] == shard_index]
            rows = np.array([cache.record(k)["row"] for k in keys])
            read = cache._read(cache._handle(shard_index), shard_index, rows, set(cache.layout.views()))
            for j, key in enumerate(keys):
                for feature, value in read.items():
                    want = expected[f"{flavour}|{key}|{feature}"]
                    assert value.dtype == want.dtype and torch.equal(value[j], want), (flavour, feature)
    assert compared == set(expected)


def test_format_2_orphan_shards_are_not_adopted_into_a_format_3_cache(tmp_path, monkeypatch):
    """A format-2 shard of the very same settings holds normed tokens where format 3 holds z:
    a run must recompute its rows rather than adopt it."""
    import shutil

    monkeypatch.chdir(V2)  # tests/data/v2's manifests name the model "model"
    new = tmp_path / "new"
    (new / "shards").mkdir(parents=True)
    for shard in (V2 / "cache-v2" / "shards").iterdir():  # as if a crashed run had left them
        shutil.copy(shard, new / "shards" / shard.name)
    options = ExtractOptions(
        out=new,
        buckets=parse_bucket_config({"buckets": [[64, 64], [96, 48]]}),
        model="model",
        workers=0,
        progress=False,
        dtype="float32",
        keep_registers=True,
        layers=(1,),
        flip=True,
    )
    result = extract(REPO / "tests" / "data" / "v1" / "images", options)
    assert result.shards_adopted == 0 and result.processed == 3
    assert {p.kind for p in verify_cache(new).problems} == {"unlisted_shard"}


def test_a_format_3_manifest_must_say_what_its_normed_features_hold(tmp_path):
    """Without storage.normed_values a reader would take z for normed: a format-3 manifest that
    lacks it (here a format-2 cache relabelled) is refused, and formats 1-2 may not carry it."""
    import shutil

    from dinocache.errors import CacheError
    from dinocache.layout import storage_problems

    shutil.copytree(V2 / "cache-v2", tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["format_version"] = 3
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="normed_values"):
        FeatureCache(tmp_path / "cache")
    record = Layout().record()
    assert storage_problems(record, 3) == [] and record["normed_values"] == "ln_noaffine"
    assert storage_problems({**record, "normed_values": "prenorm"}, 3)
    assert storage_problems(record, 2) and storage_problems(manifest["storage"], 2) == []


def test_a_format_1_cache_is_not_extended_but_can_be_rebuilt(tmp_path):
    import shutil

    from dinocache.errors import CacheError

    data = REPO / "tests" / "data" / "v1"
    shutil.copytree(data / "cache-v1", tmp_path / "cache")
    options = ExtractOptions(
        out=tmp_path / "cache",
        buckets=parse_bucket_config(json.loads((data / "b.yaml").read_text())),
        model=str(data / "model"),
        workers=0,
        progress=False,
        dtype="float32",
        keep_registers=True,
        layers=(1,),
    )
    with pytest.raises(CacheError, match="older dinocache"):
        extract(data / "images", options)
    options.overwrite = True
    result = extract(data / "images", options)
    assert result.processed == 3 and FeatureCache(tmp_path / "cache").manifest["format_version"] == 3


def test_every_name_dinocache_gives_a_file_is_one_it_owns():
    """names.py writes the file names and the patterns deletes are checked against: each
    formatter's output must match its folder's pattern, or dinocache could not clean up after
    itself (and a loosened pattern would let it delete others' files)."""
    from dinocache.manifest import owned_name
    from dinocache.names import rank_report_name, shard_name, statistics_name, table_name

    names = [
        shard_name(3, "832x1216", "1a2b3c4d", 7),
        shard_name(120, "64x64", "00000000", 123456),
        table_name("0123456789ab"),
        "ranks/" + rank_report_name(3, "1a2b3c4d"),
        statistics_name("ln_noaffine", "position", "0123456789ab"),
        statistics_name("normed", "channel", "abcdefabcdef"),
    ]
    assert all(owned_name(n) for n in names), [n for n in names if not owned_name(n)]
    assert not any(owned_name(n) for n in ("shards/notes.txt", "stats/my-notes.txt", "index/samples.json"))
