"""The sample table: merge semantics against a plain dict model, and its on-disk round trip."""

import random

import numpy as np
import pytest

from dinocache.errors import CacheError
from dinocache.index import SampleTable


def record(key, value):
    return {
        "key": key,
        "shard": value,
        "row": value + 1,
        "bucket": value % 3,
        "source_bytes": 10 * value,
        "source_mtime_ns": 2**62 + value,
        "source_sha256": f"{value:02x}" * 32,
        "source_size": [value, value + 1],
        "box": [0, 1, value, value + 2],
        "placement": value % 2,
    }


def test_random_merges_match_a_dict_model(tmp_path):
    rng = random.Random(0)
    model: dict[str, dict] = {}
    table = SampleTable.empty()
    for step in range(40):
        new = [record(f"d{rng.randint(0, 30)}/ü{rng.randint(0, 9)}.jpg", step) for _ in range(rng.randint(0, 25))]
        drop = set(rng.sample(sorted(model), min(len(model), rng.randint(0, 3))))
        table = table.merged(new, drop)
        for key in drop:
            model.pop(key)
        for r in new:
            model[r["key"]] = r
        assert table.keys() == sorted(model)
        for key, expected in model.items():
            assert table.record(table.find(key)) == expected
    path = tmp_path / "index.safetensors"
    path.write_bytes(table.to_bytes())
    loaded = SampleTable.load(path)
    assert loaded.keys() == sorted(model)
    assert loaded.find("not/there.jpg") == -1
    assert all(loaded.record(loaded.find(k)) == v for k, v in model.items())


def test_load_refuses_a_damaged_index(tmp_path):
    path = tmp_path / "index.safetensors"
    path.write_bytes(SampleTable.from_records([record("a", 1), record("b", 2)]).to_bytes())
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:40]))
    with pytest.raises(CacheError):
        SampleTable.load(path)
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CacheError):
        SampleTable.load(path)


def test_sort_order_is_python_string_order():
    keys = ["b", "a/z", "a", "Z", "é", "a-b", "ab"]
    table = SampleTable.from_records([record(k, i) for i, k in enumerate(keys)])
    assert table.keys() == sorted(keys)
    assert np.all(np.diff(table.key_offsets) >= 0)
