"""Hardening, part two (issue 25): tar links, deletes by name, reads over 2 GiB, a repair that
repairs, what a list file is trusted with, and tar members that used to vanish silently."""

import io
import os
import tarfile

import pytest

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
