"""A zip of images, read in place (issue 22's acceptance test of the Source seam): the keys, bytes
and features of the folder it was made from, through extract, plan and verify --source; its
members held to a tar member's rules (regular members only, valid keys, bounded reads)."""

import json
import os
import stat
import zipfile

import pytest
import torch
from conftest import save_scene
from typer.testing import CliRunner

from dinocache import FeatureCache
from dinocache.cli import app
from dinocache.config import ExtractOptions, parse_bucket_config
from dinocache.errors import DecodeError, DinocacheError
from dinocache.extract import extract
from dinocache.show import render
from dinocache.sources import open_source

BUCKETS = {"buckets": [[64, 64], [96, 48]]}
PICTURES = {"a.jpg": (64, 64), "sub/b.png": (100, 50), "sub/c.jpg": (70, 66)}
runner = CliRunner()


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    for i, (key, (w, h)) in enumerate(PICTURES.items()):
        save_scene(root / key, w, h, seed=i, **({"quality": 93} if key.endswith(".jpg") else {}))
    return root


def make_zip(folder, path):
    """The folder zipped, its members stored and deflated in turn, beside a folder entry and a
    caption (not images: left out)."""
    with zipfile.ZipFile(path, "w") as archive:
        for i, key in enumerate(sorted(PICTURES)):
            method = zipfile.ZIP_DEFLATED if i % 2 == 0 else zipfile.ZIP_STORED
            archive.write(folder / key, arcname=key, compress_type=method)
        archive.writestr("sub/", b"")
        archive.writestr("sub/b.txt", b"a caption")
    return path


def test_extract_plan_and_verify_read_a_zip_in_place_as_its_folder(folder, tmp_path, tiny_model_dir):
    photos = make_zip(folder, tmp_path / "photos.zip")
    methods = {i.filename: i.compress_type for i in zipfile.ZipFile(photos).infolist()}
    assert methods["a.jpg"] == zipfile.ZIP_DEFLATED and methods["sub/b.png"] == zipfile.ZIP_STORED
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    common = ["-b", str(tmp_path / "b.yaml"), "-m", str(tiny_model_dir)]
    plan = runner.invoke(app, ["plan", str(photos), *common, "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["images"] == len(PICTURES)
    options = ["--no-progress", "--workers", "0", "--dtype", "float32", "--storage-dtype", "float32"]
    for source, out in ((photos, "from-zip"), (folder, "from-folder")):
        result = runner.invoke(app, ["extract", str(source), *common, *options, "-o", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    zipped, reference = FeatureCache(tmp_path / "from-zip"), FeatureCache(tmp_path / "from-folder")
    assert sorted(zipped.keys()) == sorted(PICTURES)  # the member paths: the folder's keys
    for key in PICTURES:
        assert torch.equal(zipped[key]["patches"], reference[key]["patches"])
        assert zipped.record(key)["source_sha256"] == reference.record(key)["source_sha256"]
    assert not [p for p in (tmp_path / "from-zip").rglob("*") if p.suffix in (".jpg", ".png")]  # nothing extracted
    again = extract(
        str(photos),
        ExtractOptions(
            out=tmp_path / "from-zip",
            buckets=parse_bucket_config(BUCKETS),
            model=str(tiny_model_dir),
            workers=0,
            progress=False,
            dtype="float32",
            storage_dtype="float32",
        ),
    )
    assert (again.processed, again.skipped) == (0, len(PICTURES))  # size + time from the zip's directory
    verify = runner.invoke(app, ["verify", str(tmp_path / "from-zip"), "--source", str(photos), "--recompute", "3"])
    assert verify.exit_code == 0, verify.output
    # --recompute alone reopens the recorded zip, as it does a folder (README: "a local zip")
    again = runner.invoke(app, ["verify", str(tmp_path / "from-zip"), "--recompute", "2"])
    assert again.exit_code == 0, again.output
    assert f"--recompute reads the images from {photos}" in again.output
    assert render(tmp_path / "from-zip", "sub/b.png").size[0] > 0  # show reopens the recorded (local) zip
    save_scene(folder / "sub" / "b.png", 100, 50, seed=99)  # one picture changes; the zip is made again
    make_zip(folder, photos)
    changed = runner.invoke(app, ["verify", str(tmp_path / "from-zip"), "--source", str(photos), "--json"])
    assert changed.exit_code == 1
    assert [p["key"] for p in json.loads(changed.output)["problems"] if p["kind"] == "source_changed"] == ["sub/b.png"]


def hostile_zip(path, picture):
    """One member for each rule a member must pass, each with an image name."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("good.png", picture)
        for name in ("../up.png", "/abs.png", "a\\b.png", "./dot.png", "x//y.png"):
            archive.writestr(name, picture)
        link = zipfile.ZipInfo("link.png")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        fifo = zipfile.ZipInfo("fifo.png")
        fifo.create_system, fifo.external_attr = 3, (stat.S_IFIFO | 0o644) << 16
        archive.writestr(fifo, b"")
        archive.writestr("folder.png/", b"")
        archive.writestr("bz.png", picture, compress_type=zipfile.ZIP_BZIP2)
        archive.writestr("locked.png", picture)
        archive.getinfo("locked.png").flag_bits |= 0x1  # the directory says encrypted
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("twice.png", picture)
            archive.writestr("twice.png", picture)
        archive.writestr("swap.png", picture, compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("bomb.png", b"\0" * (4 << 20), compress_type=zipfile.ZIP_DEFLATED)
        archive.getinfo("bomb.png").file_size = 20_000  # inflates to 4 MiB: the directory says 20 kB
        archive.writestr("huge.png", b"\0" * 1000, compress_type=zipfile.ZIP_DEFLATED)
        archive.getinfo("huge.png").file_size = 1 << 40  # a 1 TiB member from 1 kB
    data = path.read_bytes()
    first = data.index(b"swap.png")  # its local header's name, before the directory's
    path.write_bytes(data[:first] + b"swip.png" + data[first + 8 :])
    return path


def test_zip_members_are_held_to_the_rules_of_tar_members(tmp_path):
    from conftest import scene

    picture = tmp_path / "p.png"
    scene(40, 30, 1).save(picture)
    files = {s.key: s for s in open_source(str(hostile_zip(tmp_path / "h.zip", picture.read_bytes()))).scan()}
    reasons = {key: (src.problem or ("ok",))[0] for key, src in files.items()}
    assert reasons == {
        "good.png": "ok",
        "../up.png": "bad_filename",
        "/abs.png": "bad_filename",
        "a\\b.png": "bad_filename",
        "./dot.png": "bad_filename",
        "x//y.png": "bad_filename",
        "link.png": "not_a_file",
        "fifo.png": "not_a_file",
        "folder.png": "not_a_file",
        "bz.png": "unsupported",
        "locked.png": "unsupported",
        "twice.png": "duplicate",
        "swap.png": "corrupt",
        "bomb.png": "ok",  # its directory entry is consistent: the inflate finds it out
        "huge.png": "corrupt",  # 1 kB cannot deflate 1 TiB
    }, reasons
    good = files["good.png"]
    assert good.source.read(good) == picture.read_bytes() and good.source.probe(good, 10**6) == (40, 30)
    bomb = files["bomb.png"]
    with pytest.raises(DecodeError, match="inflates past its declared 20000 bytes"):
        bomb.source.read(bomb)
    with pytest.raises(DecodeError) as refused:  # the header probe refuses it, and reads at most its header
        bomb.source.probe(bomb, 10**6)
    assert refused.value.reason == "not_an_image"


def test_the_header_probe_of_a_deflated_member_inflates_only_its_header(tmp_path, monkeypatch):
    from conftest import scene
    from PIL import Image

    picture = tmp_path / "p.png"
    scene(80, 48, 1).save(picture)
    junk = os.urandom(8 << 20)  # a picture followed by 8 MiB that no header read needs (incompressible)
    with zipfile.ZipFile(tmp_path / "p.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pic.png", picture.read_bytes() + junk)
    (src,) = open_source(str(tmp_path / "p.zip")).scan()
    read = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: read.append(n) or real_pread(fd, n, offset))
    assert src.source.probe(src, 10**9) == (80, 48)
    assert sum(read) < 256 * 1024, sum(read)  # a few inflate windows, not the 8 MiB member
    data = src.source.read(src)
    assert data.startswith(picture.read_bytes()) and Image.open(picture).size == (80, 48)


def test_a_zip_that_is_not_one_or_is_absent_is_a_clear_error(tmp_path):
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DinocacheError, match="not a readable zip"):
        open_source(str(tmp_path / "fake.zip")).scan()
    with pytest.raises(DinocacheError, match="does not exist"):
        open_source(str(tmp_path / "absent.zip")).scan()
    (tmp_path / "b.yaml").write_text(json.dumps(BUCKETS))
    result = runner.invoke(
        app, ["plan", str(tmp_path / "fake.zip"), "-b", str(tmp_path / "b.yaml"), "-m", "random:vits16"]
    )
    assert result.exit_code == 2 and "not a readable zip" in result.output, result.output


def test_a_remote_zip_is_spooled_once_and_a_linked_zip_is_refused(folder, tmp_path, tiny_model_dir, monkeypatch):
    import fsspec

    monkeypatch.setenv("DINOCACHE_SPOOL", str(tmp_path / "spool"))
    fsspec.filesystem("memory").pipe("/bucket/photos.zip", make_zip(folder, tmp_path / "photos.zip").read_bytes())
    options = ExtractOptions(
        out=tmp_path / "out",
        buckets=parse_bucket_config(BUCKETS),
        model=str(tiny_model_dir),
        workers=0,
        progress=False,
    )
    assert extract("memory://bucket/photos.zip", options).processed == len(PICTURES)
    assert [p.suffix for p in (tmp_path / "spool").iterdir()] == [".zip"]  # fetched whole, once
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.zip").symlink_to(tmp_path / "photos.zip")  # a link out of its folder
    with pytest.raises(DinocacheError, match="--follow-symlinks"):
        open_source(str(elsewhere / "linked.zip")).scan()
    assert len(open_source(str(elsewhere / "linked.zip"), follow_symlinks=True).scan()) == len(PICTURES)
