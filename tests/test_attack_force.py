"""Hostile tests: `--force` and replaced files.

"Files a running instance holds are never truncated by --force", and a
snapshot brought back after a crash must be "proven exact": a TARGET or copy
map replaced since must keep it from coming back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess

import pytest

from conftest import is_mounted, need, random_bytes, wait_until, alive
from test_attack_common import CLUSTER, MiB, env, snapfs, status, write_at  # noqa: F401


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("target_format,sync", [("qcow2", "top"), ("raw", "full")])
def test_force_never_truncates_the_backing_file_of_the_live_disk(env, target_format, sync):
    """FAILS: with a qcow2 overlay mounted, `snapfs snapshot LIVE SNAP
    --target base.raw --force` (base.raw: the overlay's backing file, which
    the live process has open and reads from) is not refused as a held file:
    the daemon truncates base.raw (qcow2 target: then fails with "backing
    chain loop" and *deletes* base.raw; raw target: a zero-filled target in
    its place). The live disk's contents change under its user."""
    qemu_img = need("qemu-img")
    base = env.root / "base.raw"
    base.write_bytes(random_bytes(4 * MiB, seed=11))
    overlay = env.root / "vm.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    str(overlay)], check=True, cwd=env.root)
    live, snap = env.dirs("live", "snap")
    assert snapfs("mount", overlay, live, "--format", "qcow2").returncode == 0
    guest_before = digest(live / "vm.qcow2")
    base_before = digest(base)
    result = snapfs("snapshot", live, snap, "--target", base, "--force", "--sync", sync,
                    "--target-format", target_format)
    assert base.exists(), "the backing file of the live disk was deleted"
    assert digest(base) == base_before, "the backing file of the live disk was overwritten"
    assert digest(live / "vm.qcow2") == guest_before, "the live disk changed under its user"
    assert result.one_line_error, result
    assert "in use" in result.stderr, result
    assert not is_mounted(snap)
    assert snapfs("umount", live).returncode == 0


def test_target_replaced_by_force_after_a_crash_is_not_brought_back(env):
    """FAILS: after kill -9 of the live daemon, another instance takes a
    snapshot with `--force --target T` (T, T.snapfs: the dead instance's
    target and copy map). --force truncates them in place (O_TRUNC keeps
    device, inode and generation), so the next `snapfs mount SOURCE LIVE`
    takes them for the same files and brings the old snapshot back "exact":
    it then shows data written after it was taken (and the other disk's
    data). It must be reported as not brought back instead."""
    a_data = random_bytes(4 * MiB, seed=12)
    a = env.root / "a.img"
    a.write_bytes(a_data)
    b = env.image("b.img", seed=13)
    live, snap, live2, snap2 = env.dirs("live", "snap", "live2", "snap2")
    target = env.root / "ta.img"
    assert snapfs("mount", a, live, snap, "--target", target, "--sync", "none").returncode == 0
    write_at(live / "a.img", 0, b"\0" * (8 * CLUSTER))  # copied before write into ta.img
    assert (snap / "a.img").read_bytes() == a_data
    pid = status(live)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    snapfs("umount", live)  # detaches what the dead daemon left; exits 1, saying so
    assert not is_mounted(live) and not is_mounted(snap)

    other = snapfs("mount", b, live2, snap2, "--target", target, "--force", "--sync", "none")
    assert other.returncode == 0, other
    assert snapfs("umount", live2).returncode == 0

    again = snapfs("mount", a, live)
    assert again.returncode == 0, again
    if is_mounted(snap):
        assert (snap / "a.img").read_bytes() == a_data, \
            "brought back a snapshot whose target was replaced: it shows later data"
    else:
        assert "not brought back" in again.stderr, again
    assert snapfs("umount", live).returncode == 0


def test_force_onto_a_copy_map_of_the_live_disk_itself(env):
    """Guard: --force with TARGET such that TARGET.snapfs is SOURCE, or
    TARGET is SOURCE through a hard link or a symbolic link, is refused in
    one line and SOURCE is untouched."""
    source = env.image("x.snapfs", seed=14)
    live, snap = env.dirs("live", "snap")
    assert snapfs("mount", source, live).returncode == 0
    before = digest(source)
    (env.root / "hard").hardlink_to(source)
    (env.root / "soft").symlink_to(source)
    for target in (env.root / "x", env.root / "hard", env.root / "soft"):
        result = snapfs("snapshot", live, snap, "--target", target, "--force")
        assert result.one_line_error, result
        assert not is_mounted(snap)
        assert digest(source) == before
    assert not (env.root / "x").exists()
    assert snapfs("umount", live).returncode == 0
