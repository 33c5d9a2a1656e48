"""FeatureCache, BucketBatchSampler and collate_features in a training-loop shape."""

import pytest
import torch
from conftest import save_scene, tiny_config
from torch.utils.data import DataLoader

from dinocache import BucketBatchSampler, FeatureCache, collate_features
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.extract import extract


@pytest.fixture(scope="module")
def affine_model_dir(tmp_path_factory):
    """A tiny DINOv3 whose final LayerNorm has a real affine, so that normed differs from z."""
    from transformers import DINOv3ViTModel

    torch.manual_seed(5)
    model = DINOv3ViTModel(tiny_config())
    with torch.no_grad():
        model.norm.weight.uniform_(0.1, 1.7)
        model.norm.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("affine-reader")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reader")
    images = root / "images"
    sizes = [(300, 300)] * 7 + [(600, 300)] * 5 + [(280, 400)] * 4
    for i, (w, h) in enumerate(sizes):
        save_scene(images / f"{i:02d}.png", w, h, seed=i)
    options = ExtractOptions(
        out=root / "out",
        buckets=parse_bucket_config({"buckets": [[224, 224], [384, 192], [210, 300]]}),
        model=str(tiny_model_dir),
        workers=0,
        progress=False,
    )
    extract(images, options)
    return FeatureCache(root / "out")


def test_lookup_by_key_and_index(cache):
    assert len(cache) == 16 and "00.png" in cache and "zz.png" not in cache
    by_key = cache["03.png"]
    by_index = cache[cache.index_of("03.png")]
    assert torch.equal(by_key["patches"], by_index["patches"])
    assert by_key["patches"].shape == (14, 14, 64)
    with pytest.raises(KeyError, match="not in the cache"):
        cache["zz.png"]
    with pytest.raises(KeyError, match=r"did you mean '03.png'"):  # a typo gets the near keys
        cache["03.jpg"]


def test_indices_behave_like_a_sequence(cache):
    last = cache[len(cache) - 1]
    assert torch.equal(cache[-1]["patches"], last["patches"]) and cache[-1]["key"] == last["key"]
    assert cache.record(-1) == cache.record(len(cache) - 1)
    assert cache.bucket_of("03.png") == cache.bucket_of(cache.index_of("03.png")) == cache.record("03.png")["bucket"]
    assert cache[torch.tensor(2)]["key"] == cache[2]["key"]  # a 0-d tensor from a sampler is an index too
    for bad in (len(cache), -len(cache) - 1):
        with pytest.raises(IndexError, match="out of range"):
            cache[bad]
    with pytest.raises(TypeError, match="key .* or an integer index"):
        cache[1.0]


def test_dtype_cast(cache, tmp_path):
    fc = FeatureCache(cache.root, dtype=torch.float32)
    assert fc["00.png"]["cls"].dtype == torch.float32


def test_batches_hold_one_bucket_and_cover_every_sample_once(cache):
    sampler = BucketBatchSampler(cache, batch_size=3, seed=1)
    seen = []
    for batch in sampler:
        assert len({cache.bucket_of(i) for i in batch}) == 1
        assert 1 <= len(batch) <= 3
        seen += batch
    assert sorted(seen) == list(range(16))
    assert len(sampler) == len(list(sampler))


def test_shuffle_depends_on_seed_and_epoch_only(cache):
    a = list(BucketBatchSampler(cache, batch_size=2, seed=7))
    assert a == list(BucketBatchSampler(cache, batch_size=2, seed=7))  # a restart gives the same order
    b = BucketBatchSampler(cache, batch_size=2, seed=7)
    b.set_epoch(1)
    assert list(b) != a
    assert list(BucketBatchSampler(cache, batch_size=2, seed=8)) != a


def test_ranks_get_disjoint_batches_and_equal_counts(cache):
    world = 3
    per_rank = [
        list(BucketBatchSampler(cache, batch_size=2, seed=3, rank=r, world_size=world, drop_last=True))
        for r in range(world)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    padded = [list(BucketBatchSampler(cache, batch_size=2, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert len({len(b) for b in padded}) == 1
    assert {i for batches in padded for batch in batches for i in batch} == set(range(16))


@pytest.mark.parametrize("world", [2, 7, 9, 20, 40])
def test_more_ranks_than_batches_still_gives_every_rank_the_same_count(cache, world):
    # batch 8 over 16 samples in a few buckets: fewer batches than ranks for the larger worlds;
    # a rank with one batch fewer would leave the others waiting at their collective
    for drop_last in (False, True):
        per_rank = [
            list(BucketBatchSampler(cache, batch_size=8, seed=1, rank=r, world_size=world, drop_last=drop_last))
            for r in range(world)
        ]
        counts = {len(batches) for batches in per_rank}
        assert len(counts) == 1, (world, drop_last, [len(b) for b in per_rank])
        sizes = [
            len(BucketBatchSampler(cache, 8, seed=1, rank=r, world_size=world, drop_last=drop_last))
            for r in range(world)
        ]
        assert sizes == [len(batches) for batches in per_rank]
        if not drop_last:
            assert counts != {0} and {i for b in per_rank for batch in b for i in batch} == set(range(16))


def test_collate_pads_patches_and_masks_them(cache):
    items = [cache["00.png"], cache["07.png"]]  # 14x14 = 196 and 12x24 = 288 patches
    batch = collate_features(items)
    assert batch["patches"].shape == (2, 288, 64) and batch["cls"].shape == (2, 64)
    assert batch["mask"].sum(1).tolist() == [196, 288]
    assert torch.equal(batch["patches"][0, :196], items[0]["patches"].reshape(-1, 64))
    assert torch.all(batch["patches"][0, 196:] == 0)
    assert batch["grid"].tolist() == [[14, 14], [12, 24]]
    # The guide's DiT block takes key_padding_mask = ~context_mask: padded slots must be ignored.
    attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    q = torch.randn(2, 5, 64)
    out_full, _ = attn(q, batch["patches"].float(), batch["patches"].float(), key_padding_mask=~batch["mask"])
    out_alone, _ = attn(
        q[:1], items[0]["patches"].reshape(1, -1, 64).float(), items[0]["patches"].reshape(1, -1, 64).float()
    )
    torch.testing.assert_close(out_full[:1], out_alone, atol=1e-5, rtol=1e-5)


def test_dataloader_with_workers(cache):
    loader = DataLoader(
        cache, batch_sampler=BucketBatchSampler(cache, batch_size=4, seed=0), collate_fn=collate_features, num_workers=2
    )
    total = 0
    for batch in loader:
        assert batch["mask"].all()  # one bucket per batch: nothing to pad
        total += len(batch["key"])
    assert total == 16


def test_resume_from_a_step_after_a_restart(cache):
    world = 2
    full = [list(BucketBatchSampler(cache, batch_size=2, seed=5, rank=r, world_size=world)) for r in range(world)]
    for rank in range(world):
        restarted = BucketBatchSampler(cache, batch_size=2, seed=5, rank=rank, world_size=world)
        restarted.load_state_dict({"epoch": 0, "start_step": 3, "seed": 5})
        assert list(restarted) == full[rank][3:]
        assert len(restarted) == len(full[rank]) - 3
    other = BucketBatchSampler(cache, batch_size=2, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict({"epoch": 0, "start_step": 1, "seed": 5})


@pytest.mark.parametrize("storage", ["float8_e4m3fn", "bfloat16"])
def test_a_batch_read_equals_reading_each_sample_alone(tmp_path, affine_model_dir, storage):
    """The batch path (one gather per shard into shared batch tensors) against item-by-item reads,
    across shards, in and out of file order, for every read mode (bfloat16: normed is the chunked
    affine of the stored z, ln_noaffine a plain gather)."""
    images = tmp_path / "images"
    for i in range(12):
        save_scene(images / f"{i:02d}.png", 300 if i % 3 else 600, 300, seed=i)
    out = tmp_path / "out"
    options = ExtractOptions(
        out=out,
        buckets=parse_bucket_config({"buckets": [[224, 224], [384, 192]]}),
        model=str(affine_model_dir),
        workers=0,
        progress=False,
        flip=True,
        shard_max_bytes=60_000,
        storage_dtype=storage,
    )
    extract(images, options)
    for kwargs in ({}, {"flavour": "prenorm"}, {"flavour": "ln_noaffine"}, {"dtype": torch.float16}):
        cache = FeatureCache(out, **kwargs)
        alone = {i: cache.__getitems__([i])[0] for i in range(len(cache))}
        for order in ([3, 1, 7, 0, 11], [0, 1, 2], list(range(12))[::-1]):
            together = cache.__getitems__(order)
            for i, item in zip(order, together):
                assert item["key"] == alone[i]["key"]
                for name in ("cls", "patches", "cls_flip", "patches_flip"):
                    assert torch.equal(item[name], alone[i][name]), (kwargs, order, name)
        picked = cache.__getitems__([(2, True), (5, False), (4, True)])
        for (i, flipped), item in zip([(2, True), (5, False), (4, True)], picked):
            assert torch.equal(item["patches"], alone[i]["patches_flip" if flipped else "patches"])
            assert "patches_flip" not in item and item["flipped"] is flipped
    # one bucket in one call: collate hands over the batch tensors themselves
    cache = FeatureCache(out)
    same_bucket = [i for i in range(len(cache)) if cache.bucket_of(i) == 0][:4]
    items = cache.__getitems__(same_bucket)
    batch = collate_features(items)
    assert batch["patches"].data_ptr() == items[0]["patches"].data_ptr()
    assert batch["mask"].all() and batch["patches"].shape[0] == 4


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # a read-only map, on purpose
@pytest.mark.parametrize("step", [1 << 20, 100, 50, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_affine_rows_is_weight_times_z_plus_bias_for_any_step(tmp_path, monkeypatch, step, dtype):
    """reader.affine_rows (the normed flavour's batch path) against the formula, whether a step
    holds all rows, one row, or part of a row (4 rows of 5 tokens x 16 channels), gathering from
    a read-only map that it must never write, into non-contiguous batch slots."""
    import numpy as np

    from dinocache import reader

    monkeypatch.setattr(reader, "AFFINE_STEP", step)
    torch.manual_seed(0)
    z = torch.randn(6, 5, 16).to(dtype)
    weight, bias = torch.rand(16) + 0.05, torch.randn(16)
    raw = z.view(torch.int16) if dtype == torch.bfloat16 else z
    raw.numpy().tofile(tmp_path / "z.bin")
    mapped = np.memmap(tmp_path / "z.bin", dtype=raw.numpy().dtype, mode="r", shape=tuple(z.shape))
    source = torch.from_numpy(np.asarray(mapped)).view(dtype)
    dest = torch.full((5, 5, 16), 7.0, dtype=dtype)
    rows, slots = np.array([4, 0, 5, 2]), np.array([3, 0, 4, 1])
    reader.affine_rows(source, rows, dest, slots, weight, bias)
    for row, slot in zip(rows, slots):
        want = (z[row].float() * weight + bias).to(dtype)
        assert torch.equal(dest[slot], want), (row, slot)
    assert torch.equal(dest[2], torch.full((5, 16), 7.0, dtype=dtype))  # untouched
    assert torch.equal(source, z)  # the map is read, never written


def test_recycled_batch_buffers_are_reused_only_once_released():
    from dinocache.reader import batch_buffer

    first = batch_buffer((40, 1024, 256), torch.bfloat16)  # 20 MB: from the recycled pool
    address = first.data_ptr()
    first.fill_(1)
    view = first[7]  # a sample's view keeps the whole buffer in use
    del first
    second = batch_buffer((40, 1024, 256), torch.bfloat16)
    assert second.data_ptr() != address and torch.all(view == 1)
    del view
    third = batch_buffer((40, 1024, 256), torch.bfloat16)
    assert third.data_ptr() == address  # released: reused, no new page faults


def test_shard_windows_keep_the_shuffle_deterministic_complete_and_local(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    for i in range(24):
        save_scene(images / f"{i:02d}.png", 300, 300, seed=i)
    out = tmp_path / "out"
    extract(
        images,
        ExtractOptions(
            out=out,
            buckets=parse_bucket_config({"buckets": [[224, 224]]}),
            model=str(tiny_model_dir),
            workers=0,
            progress=False,
            shard_max_bytes=40_000,
        ),
    )
    cache = FeatureCache(out)
    shards = cache.shard_indices()
    assert len(set(shards.tolist())) >= 6
    windowed = BucketBatchSampler(cache, batch_size=2, seed=1, shard_window=2)
    batches = list(windowed)
    assert sorted(i for b in batches for i in b) == list(range(24))
    assert batches == list(BucketBatchSampler(cache, batch_size=2, seed=1, shard_window=2))
    # Walking the epoch, each shard is entered once: its samples come in one stretch of batches.
    stretch = [int(shards[i]) for b in batches for i in b]
    entered = [s for k, s in enumerate(stretch) if k == 0 or stretch[k - 1] != s]
    assert len(entered) <= 2 * len(set(stretch))  # a window of 2 interleaves at most two shards
    windowed.set_epoch(1)
    assert list(windowed) != batches
    resumed = BucketBatchSampler(cache, batch_size=2, seed=1, shard_window=2)
    resumed.set_epoch(1, start_step=4)
    assert list(resumed) == list(windowed)[4:]


def test_iter_shard_rows_reads_every_live_row_once_as_indexing_does(cache):
    """The public row iterator norm-stats streams through: each live sample's values exactly
    once, valued as cache[i] gives them, in chunks of at most chunk_rows(grid) rows."""
    from collections import Counter

    def row(cls, patches) -> bytes:  # bf16 has no numpy dtype: its bits
        return cls.view(torch.int16).numpy().tobytes() + patches.view(torch.int16).numpy().tobytes()

    streamed = Counter()
    for grid, chunks in cache.iter_shard_rows(("",), {"cls", "patches"}, chunk_rows=lambda grid: 3):
        for batch in chunks:
            assert set(batch) == {"cls", "patches"} and 1 <= len(batch["cls"]) <= 3
            assert tuple(batch["patches"].shape[1:3]) == grid
            streamed.update(row(c, p) for c, p in zip(batch["cls"], batch["patches"]))
    indexed = Counter(row(cache[i]["cls"], cache[i]["patches"]) for i in range(16))
    assert streamed == indexed and sum(streamed.values()) == len(cache) == 16
