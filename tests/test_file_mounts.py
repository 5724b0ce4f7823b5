"""LIVE and SNAPSHOT on regular files: the image appears at that path itself,
as with qemu-storage-daemon's FUSE export. LIVE may be SOURCE itself, so a
VM's configuration keeps its path; umount gives the path back to the plain
file, holding every write."""

from __future__ import annotations

import os
import subprocess

from conftest import is_mounted, random_bytes, run_snapfs, write_at, write_image

MiB = 1 << 20


def test_live_disk_over_its_own_file(tmp_path):
    original = random_bytes(8 * MiB, seed=1)
    source = write_image(tmp_path / "vm.img", original)
    snap = tmp_path / "monday.img"
    snap.write_bytes(b"")  # a placeholder the snapshot appears on
    try:
        run_snapfs("mount", source, source)
        assert is_mounted(source)
        run_snapfs("snapshot", source, snap, "--target", tmp_path / "backup.img")
        assert is_mounted(snap) and snap.read_bytes() == original
        write_at(source, 4096, b"written through the same path")
        model = bytearray(original)
        model[4096:4096 + 29] = b"written through the same path"
        assert source.read_bytes() == bytes(model)
        assert snap.read_bytes() == original
        info = run_snapfs("status", source, "--json").stdout
        assert f'"live": "{source}"' in info and f'"snapshot": "{snap}"' in info
        run_snapfs("wait", snap)
        run_snapfs("umount", source)
        assert not is_mounted(source) and not is_mounted(snap)
        assert source.read_bytes() == bytes(model), "the plain file holds every write"
        assert snap.read_bytes() == b"", "the placeholder is back"
        assert (tmp_path / "backup.img").read_bytes() == original
    finally:
        for path in (source, snap):
            if is_mounted(path):
                subprocess.run(["fusermount3", "-u", "-z", str(path)])


def test_a_file_system_on_the_live_file_is_never_pulled_away(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.txt").write_text("before\n")
    source = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(source), "32M"], check=True)
    point = tmp_path / "point"
    point.mkdir()
    try:
        run_snapfs("mount", source, source)
        subprocess.run(["mount", "-o", "loop", str(source), str(point)], check=True)
        try:
            result = run_snapfs("umount", source, check=False)
            assert result.returncode == 1 and "loop device" in result.stderr, result.stderr
            assert is_mounted(source)
            (point / "b.txt").write_text("after\n")
        finally:
            subprocess.run(["umount", str(point)], check=True)
        run_snapfs("umount", source)
        assert not is_mounted(source)
        listing = subprocess.run(["debugfs", "-R", "cat /b.txt", str(source)],
                                 capture_output=True, text=True)
        assert listing.stdout == "after\n"
    finally:
        if is_mounted(source):
            subprocess.run(["fusermount3", "-u", "-z", str(source)])


def test_refusals_on_files(tmp_path):
    source = write_image(tmp_path / "vm.img", random_bytes(MiB, seed=2))
    other = write_image(tmp_path / "other.img", b"x")
    for args, expect in (
            (["mount", source, "/dev/null"], "neither a directory nor a regular file"),
            (["mount", source, other, other, "--target", tmp_path / "t.img"], "the same"),
            (["mount", source, other, source, "--target", tmp_path / "t.img"], "is SOURCE"),
            (["mount", source, other, tmp_path / "missing", "--target", tmp_path / "t.img"],
             "no such directory or file")):
        result = run_snapfs(*args, check=False)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert expect in result.stderr, result.stderr
        assert not is_mounted(source) and not is_mounted(other)
    assert sorted(os.listdir(tmp_path)) == ["other.img", "vm.img"]
