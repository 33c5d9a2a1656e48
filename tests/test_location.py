"""Where a cache is (CacheLocation: local folder or object storage, decided once) and the shard
stores a cache being written uses (LocalShards, RemoteShards): the store, not the state, puts a
remote cache's shards and commits into storage."""

from pathlib import Path

import fsspec

from dinocache.location import CacheLocation
from dinocache.names import table_name
from dinocache.store import LocalShards, RemoteShards

SHARD = "shards/b000-64x64-0123abcd-00000.safetensors"


def test_object_storage_urls_are_remote_and_paths_are_local(tmp_path):
    for url in ("s3://bucket/cache", "gs://bucket/cache", "memory://bucket/cache"):
        location = CacheLocation(url)
        assert location.is_remote and location.name == str(location) == url
    for path in (tmp_path, str(tmp_path), "dinocache_out", "file://not-a-remote"):
        location = CacheLocation(path)
        assert not location.is_remote and location.remote is None and location.name == str(path)
        assert location.local_view() == Path(str(path))
        assert type(location.shards(tmp_path)) is LocalShards


def test_a_remote_location_makes_its_remote_once_and_a_remote_store(tmp_path):
    location = CacheLocation("memory://bucket/location-cache")
    assert location.remote is location.remote and location.remote.url == "memory://bucket/location-cache"
    store = location.shards(tmp_path)
    assert isinstance(store, RemoteShards) and store.remote is location.remote and store.root == tmp_path


def test_the_remote_store_uploads_shards_and_commits_manifest_last(tmp_path):
    memory = fsspec.filesystem("memory")
    store = CacheLocation("memory://bucket/store-cache").shards(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / SHARD).write_bytes(b"shard")
    store.upload(tmp_path / SHARD, SHARD)
    assert memory.cat(f"/bucket/store-cache/{SHARD}") == b"shard" and not (tmp_path / SHARD).exists()

    old, new = table_name("0" * 12), table_name("1" * 12)
    memory.pipe(f"/bucket/store-cache/{old}", b"old table")
    (tmp_path / "index").mkdir()
    (tmp_path / new).write_bytes(b"new table")
    (tmp_path / "manifest.json").write_bytes(b"{}")
    store.after_commit([new], old)
    assert memory.cat(f"/bucket/store-cache/{new}") == b"new table"
    assert memory.cat("/bucket/store-cache/manifest.json") == b"{}"
    assert not memory.exists(f"/bucket/store-cache/{old}")


def test_a_local_store_has_nothing_to_upload(tmp_path):
    store = LocalShards(tmp_path)
    assert store.upload is None  # the writer leaves a local shard where it renamed it
    store.after_commit(["index/x"], None)  # a local commit is complete once its manifest is in place
