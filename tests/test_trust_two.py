"""Hardening, part two (issue 25): tar links, deletes by name, reads over 2 GiB, a repair that
repairs, what a list file is trusted with, and tar members that used to vanish silently."""

import io
import json
import os
import tarfile

import pytest

from dinocache import FeatureCache
from dinocache.sources import open_source


def image_bytes(width=64, height=64, seed=0, suffix=".png"):
    from make_sample_images import scene

    buffer = io.BytesIO()
    scene(width, height, seed).save(buffer, format="PNG" if suffix == ".png" else "JPEG")
    return buffer.getvalue()


def write_tar(path, members):
    """`members`: (name, bytes) pairs, written in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---- 1. tar paths follow the link rule of folders ------------------------------------------------


@pytest.mark.parametrize("spec", ["linked.tar", "*.tar", "{linked,plain}.tar"])
def test_a_linked_tar_outside_the_source_folder_is_a_recorded_failure(tmp_path, spec):
    outside = write_tar(tmp_path / "outside" / "private.tar", [("secret.png", image_bytes())])
    folder = tmp_path / "tars"
    write_tar(folder / "plain.tar", [("mine.png", image_bytes(seed=1))])
    os.symlink(outside, folder / "linked.tar")
    files = {s.key: s for s in open_source(str(folder / spec)).scan()}
    assert "linked.tar/secret" not in files  # never read
    assert files["linked.tar"].problem[0] == "outside_source"
    assert "--follow-symlinks" in files["linked.tar"].problem[1]
    if spec != "linked.tar":
        assert files["plain.tar/mine"].problem is None
    followed = {s.key for s in open_source(str(folder / spec), follow_symlinks=True).scan()}
    assert "linked.tar/secret" in followed


def test_a_link_to_a_tar_inside_the_source_folder_is_read(tmp_path):
    folder = tmp_path / "tars"
    write_tar(folder / "real" / "a.tar", [("x.png", image_bytes())])
    os.symlink(folder / "real" / "a.tar", folder / "alias.tar")
    files = {s.key: s for s in open_source(str(folder / "alias.tar")).scan()}
    assert files["alias.tar/x"].problem is None


# ---- 2. deletes by name: only dinocache's own names, named by its records ------------------------

BUCKETS = {"buckets": [[64, 64], [96, 48]]}


def run(source, out, model_dir, **kwargs):
    from dinocache.config import ExtractOptions, parse_bucket_config
    from dinocache.extract import extract

    kwargs.setdefault("workers", 0)
    options = ExtractOptions(
        out=out, buckets=parse_bucket_config(BUCKETS), model=str(model_dir), progress=False, dtype="float32", **kwargs
    )
    return extract(source, options)


@pytest.fixture()
def images(tmp_path):
    from conftest import save_scene

    root = tmp_path / "images"
    for i, (w, h) in enumerate([(64, 64), (96, 48), (70, 64)]):
        save_scene(root / f"{i}.png", w, h, seed=i)
    return root


def rename_in_manifest(cache, section, new_name):
    """A tampered manifest: its first `section` entry now names `new_name` (a user's own file)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest[section][0]["file"] = new_name
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_naming_a_foreign_file_as_a_shard_never_gets_it_deleted(images, tmp_path, tiny_model_dir):
    cache = tmp_path / "cache"
    run(images, cache, tiny_model_dir)
    (cache / "shards" / "user-notes.txt").write_text("my notes")
    rename_in_manifest(cache, "shards", "shards/user-notes.txt")
    result = run(images, cache, tiny_model_dir, repair=True)
    assert "shards/user-notes.txt" in result.repaired_shards  # its rows were recomputed ...
    assert (cache / "shards" / "user-notes.txt").read_text() == "my notes"  # ... and the file left alone
    assert sorted(FeatureCache(cache).keys()) == ["0.png", "1.png", "2.png"]


def test_norm_stats_never_deletes_a_foreign_file_a_statistics_entry_names(images, tmp_path, tiny_model_dir):
    from dinocache.normstats import compute_statistics

    cache = tmp_path / "cache"
    run(images, cache, tiny_model_dir)
    compute_statistics(cache)
    (cache / "stats" / "my-notes.txt").write_text("keep me")
    rename_in_manifest(cache, "statistics", "stats/my-notes.txt")
    compute_statistics(cache)  # --recompute: replaces the entry of the same flavour and views
    assert (cache / "stats" / "my-notes.txt").read_text() == "keep me"


def test_a_remote_cache_never_deletes_an_object_with_a_foreign_name(tmp_path):
    import fsspec

    from dinocache.remote import Remote, RemoteShards

    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/cache/shards/foreign.txt", b"not ours")
    memory.pipe("/bucket/cache/shards/b000-64x64-0123abcd-00000.safetensors", b"ours")
    store = RemoteShards(Remote("memory://bucket/cache"), tmp_path / "mirror")
    store.delete("shards/foreign.txt")
    store.delete("shards/b000-64x64-0123abcd-00000.safetensors")
    assert memory.cat("/bucket/cache/shards/foreign.txt") == b"not ours"
    assert not memory.exists("/bucket/cache/shards/b000-64x64-0123abcd-00000.safetensors")


# ---- 3. reads over 2 GiB, and no more than the format needs ----------------------------------------


def member_source(tar_path, name):
    return next(s for s in open_source(str(tar_path)).scan() if s.key.endswith(name))


def test_a_member_larger_than_one_pread_is_read_whole(tmp_path, monkeypatch):
    """One os.pread returns at most ~2 GiB; here at most 1 MiB, so a 3 MiB member needs a loop."""
    from dinocache.sources import reading

    payload = os.urandom(3 * 1024 * 1024)
    src = member_source(write_tar(tmp_path / "t.tar", [("big.png", payload)]), "big")
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: real_pread(fd, min(n, 1 << 20), offset))
    monkeypatch.setattr(reading, "READ_CHUNK", 1 << 30, raising=False)  # as large as the kernel's cap
    assert bytes(src.source.read(src)) == payload


def test_the_header_probe_of_a_tar_member_reads_only_its_header(tmp_path, monkeypatch):
    from dinocache.placement import probe_source

    junk = b"\0" * (8 * 1024 * 1024)  # a picture followed by 8 MiB that no header read needs
    src = member_source(write_tar(tmp_path / "t.tar", [("pic.png", image_bytes(80, 48) + junk)]), "pic")
    read = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: read.append(n) or real_pread(fd, n, offset))
    assert probe_source(src, 10**9)[:3] == ("ok", 80, 48)
    assert sum(read) < 256 * 1024, sum(read)


# ---- 4. whatever a reader or verify refuses, --repair recomputes ------------------------------------


def test_repair_recomputes_a_shard_whose_header_was_altered_with_a_matching_checksum(images, tmp_path, tiny_model_dir):
    import hashlib

    from dinocache.errors import CacheError
    from dinocache.verify import verify_cache

    cache = tmp_path / "cache"
    run(images, cache, tiny_model_dir)
    manifest = json.loads((cache / "manifest.json").read_text())
    record = manifest["shards"][0]
    path = cache / record["file"]
    data = path.read_bytes()
    assert data.count(b'"grid":"4x4"') == 1
    data = data.replace(b'"grid":"4x4"', b'"grid":"4x5"')  # same length; the checksum updated to match
    path.write_bytes(data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="--repair"):
        reader = FeatureCache(cache)
        for i in range(len(reader)):
            reader[i]
    assert not verify_cache(cache).ok
    result = run(images, cache, tiny_model_dir, repair=True)
    assert record["file"] in result.repaired_shards and result.processed >= 1
    assert verify_cache(cache).ok
    reader = FeatureCache(cache)
    assert sorted(reader.keys()) == ["0.png", "1.png", "2.png"] and all(reader[i] for i in range(3))


# ---- 5. a list file is trusted input: say what it reaches before reading -----------------------------


def test_a_list_file_says_how_many_rows_lead_outside_its_folder_and_to_urls(tmp_path, monkeypatch, caplog):
    from dinocache.sources import listfile

    lists = tmp_path / "lists"
    lists.mkdir()
    rows = ["inside.png", "../elsewhere/a.png", "/abs/b.png", "http://127.0.0.1:9/c.png", "sub/../d.png"]
    (lists / "list.csv").write_text("path\n" + "".join(r + "\n" for r in rows))
    said = []
    monkeypatch.setattr(listfile, "_stat", lambda location: said.append(caplog.text) or (-1, -1, ("missing", "-")))
    with caplog.at_level("INFO", logger="dinocache"):
        open_source(str(lists / "list.csv")).scan()
    assert "2 file(s) outside its folder" in caplog.text and "1 URL(s)" in caplog.text
    assert said and all("outside its folder" in text for text in said)  # said before any file was looked at


# ---- 6. no tar member with an image name vanishes silently ----------------------------------------


def special_member(name, kind, **fields):
    info = tarfile.TarInfo(name)
    info.type = kind
    for field, value in fields.items():
        setattr(info, field, value)
    return info


def gnu_sparse_header(name, data):
    """A GNU sparse ('S') member header, as `tar --sparse` writes for a file full of holes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[156:157] = b"S"
    block[483:495] = b"%011o\0" % len(data)  # realsize
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    return bytes(block) + data + b"\0" * (-len(data) % 512)


def test_links_devices_duplicates_sparse_and_compressed_tars_are_recorded_with_their_reason(tmp_path):
    import gzip

    png = image_bytes()
    path = tmp_path / "tars" / "odd.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("good.png", png), ("dup.png", png), ("dup.png", image_bytes(seed=3))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(special_member("sym.png", tarfile.SYMTYPE, linkname="good.png"))
        tar.addfile(special_member("hard.png", tarfile.LNKTYPE, linkname="good.png"))
        tar.addfile(special_member("dev.png", tarfile.CHRTYPE, devmajor=1, devminor=5))
        tar.addfile(special_member("fifo.png", tarfile.FIFOTYPE))
    data = path.read_bytes()
    with tarfile.open(path) as tar:  # the sparse member goes before the end-of-archive blocks
        cut = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    path.write_bytes(data[:cut] + gnu_sparse_header("holes.png", png) + b"\0" * 1024)
    (tmp_path / "tars" / "packed.tar").write_bytes(gzip.compress(data))
    files = {s.key: s.problem for s in open_source(str(tmp_path / "tars" / "*.tar")).scan()}
    reasons = {key: problem[0] if problem else "ok" for key, problem in files.items()}
    assert reasons == {
        "odd.tar/good": "ok",
        "odd.tar/dup": "duplicate",
        "odd.tar/sym": "not_a_file",
        "odd.tar/hard": "not_a_file",
        "odd.tar/dev": "not_a_file",
        "odd.tar/fifo": "not_a_file",
        "odd.tar/holes": "unsupported",
        "packed.tar": "unsupported",
    }
    assert "link" in files["odd.tar/sym"][1] and "gzip" in files["packed.tar"][1]
