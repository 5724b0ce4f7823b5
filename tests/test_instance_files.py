"""The files an instance holds: SOURCE, TARGET and the copy map are locked
while it runs (a `--force` elsewhere must not truncate them under it), any
path the file system accepts works, and a start that fails leaves nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from conftest import SNAPFS, fill, is_mounted, random_bytes, run_snapfs, tmpfs, write_image

MiB = 1 << 20
CLUSTER = 64 << 10


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_force_never_replaces_a_file_a_running_instance_holds(tmp_path, mount):
    original = random_bytes(8 * MiB, seed=1)
    a = write_image(tmp_path / "a.img", original)
    copy = tmp_path / "copy.img"
    copy.write_bytes(original)
    first = mount(a, sync="none")  # nothing changes its files but writes
    with open(first.live, "r+b") as f:  # copy-before-write puts cluster 0 in the target
        f.write(b"new")
    b = write_image(tmp_path / "b.img", random_bytes(MiB, seed=2))
    (tmp_path / "l2").mkdir()
    (tmp_path / "p2").mkdir()
    held = {a: "source", first.target: "target",
            first.target.with_name(first.target.name + ".snapfs"): "target"}
    for path, what in held.items():
        before = digest(path)
        result = run_snapfs("mount", b, tmp_path / "l2", tmp_path / "p2", "--target", path,
                            "--force", check=False)
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "in use by another snapfs instance" in result.stderr, result.stderr
        assert digest(path) == before, f"{path} changed"
        assert not is_mounted(tmp_path / "l2") and not is_mounted(tmp_path / "p2")
    # the running instance never noticed
    assert first.snapshot.read_bytes() == original
    first.umount()
    assert first.target.read_bytes()[:CLUSTER] == original[:CLUSTER]


def long_folder(root, names):
    path = root
    for name in names:
        path = path / name
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("letter", ["x", "é", "\udcff"], ids=["ascii", "non-ascii", "not-utf8"])
def test_long_and_unusual_paths(tmp_path, letter):
    """Eight folders of the longest names the file system takes, for SOURCE,
    TARGET and both mount points: mount, write, wait, status, umount."""
    longest = 255 // len(os.fsencode(letter))
    names = [f"{i}{letter * (longest - 1)}" for i in range(8)]
    base = long_folder(tmp_path, names)
    original = random_bytes(4 * MiB, seed=3)
    source = write_image(base / "disk.img", original)
    live, snap = base / "live", base / "snap"
    live.mkdir()
    snap.mkdir()
    target = base / "target.img"
    run_snapfs("mount", source, live, snap, "--target", target)
    try:
        with open(live / "disk.img", "r+b") as f:
            f.write(b"changed")
        assert (snap / "disk.img").read_bytes() == original
        run_snapfs("wait", live)
        status = json.loads(run_snapfs("status", live, "--json").stdout)
        assert status["source"] == str(source)
        assert status["snapshots"][0]["target"] == str(target)
        status = json.loads(run_snapfs("status", snap, "--json").stdout)
        assert status["target"] == str(target) and status["state"] == "completed"
        shown = subprocess.run([*SNAPFS, "status", str(live)], capture_output=True)
        assert shown.returncode == 0 and os.fsencode(str(target)) in shown.stdout, shown.stderr
        result = subprocess.run([*SNAPFS, "umount", str(live)], capture_output=True)
        assert result.returncode == 0 and result.stderr == b"", result.stderr
    finally:
        for point in (live, snap):
            if is_mounted(point):
                subprocess.run(["fusermount3", "-u", "-z", point])
    assert target.read_bytes() == original
    from snapfs.backup.copymap import CopyMap

    copymap = CopyMap.open(str(target) + ".snapfs")
    try:
        assert copymap.info["state"] == "completed"
        assert copymap.info["target"] == str(target)
    finally:
        copymap.close()


@pytest.fixture
def full_fs(tmp_path):
    """A tmpfs with no room left: a sparse raw target fits, its copy map not."""
    with tmpfs(tmp_path / "full", "1m") as point:
        fill(point)
        yield point


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_no_room_for_the_copy_map(tmp_path, full_fs, foreground):
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=4))
    (tmp_path / "live").mkdir()
    (tmp_path / "snap").mkdir()
    args = ["mount", str(source), str(tmp_path / "live"), str(tmp_path / "snap"),
            "--target", str(full_fs / "t.img"), "--cluster-size", "4K"]
    if foreground:
        args.append("--foreground")
    result = subprocess.run([*SNAPFS, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "snapfs: " in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"copy map {full_fs / 't.img.snapfs'}" in errors[0], errors[0]
    assert "No space left" in errors[0]
    assert sorted(p.name for p in full_fs.iterdir()) == ["filler"], "left behind"
    assert not is_mounted(tmp_path / "live") and not is_mounted(tmp_path / "snap")
