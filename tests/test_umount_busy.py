"""`snapfs umount` never pulls a disk from under its user: while anything
holds the live disk or the snapshot (a loop device with a mounted file
system, an open file), it refuses in one line naming what holds it and
changes nothing. `--lazy` detaches anyway, and the instance keeps serving
whoever still has the disk until the last lets go."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import alive, is_mounted, random_bytes, run_snapfs, wait_until, write_image

MiB = 1 << 20


def umount_refused(inst, *expect: str) -> str:
    result = run_snapfs("umount", inst.live_dir, check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "busy" in lines[0], result.stderr
    for words in expect:
        assert words in lines[0], lines[0]
    assert is_mounted(inst.live_dir) and is_mounted(inst.snapshot_dir)
    assert all(alive(pid) for pid in inst.pids)
    return lines[0]


def test_umount_refuses_while_a_file_system_on_the_live_disk_is_mounted(tmp_path, mount):
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.txt").write_text("before\n")
    source = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(source), "32M"], check=True)
    inst = mount(source, sync="none")
    point = tmp_path / "point"
    point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(inst.live), str(point)], check=True)
    try:
        (point / "a.txt").write_text("during\n")
        umount_refused(inst, "loop device", str(point))
        # the file system goes on working, its writes reach the disk
        (point / "b.txt").write_text("after the refusal\n")
        subprocess.run(["sync", "-f", str(point / "b.txt")], check=True)
    finally:
        subprocess.run(["umount", str(point)], check=True)  # frees the loop device too
    inst.umount()
    result = subprocess.run(["e2fsck", "-fn", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    listing = subprocess.run(["debugfs", "-R", "cat /b.txt", str(source)], capture_output=True,
                             text=True)
    assert listing.stdout == "after the refusal\n"


@pytest.mark.parametrize("which", ["live", "snapshot"])
def test_umount_refuses_while_a_process_has_a_file_open(tmp_path, mount, which):
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=1))
    inst = mount(source, sync="none")
    path = inst.live if which == "live" else inst.snapshot
    holder = subprocess.Popen(["sleep", "600"], stdin=open(path, "rb"))
    try:
        assert wait_until(lambda: os.path.exists(f"/proc/{holder.pid}/fd/0"))
        umount_refused(inst, f"process {holder.pid} (sleep)")
    finally:
        holder.kill()
        holder.wait()
    inst.umount()


def test_lazy_umount_serves_until_the_last_user_lets_go(tmp_path, mount):
    original = random_bytes(MiB, seed=2)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="full")
    inst.wait()
    fd = os.open(inst.live, os.O_RDWR)
    try:
        result = run_snapfs("umount", "--lazy", inst.live_dir)
        assert result.stderr == ""
        assert not is_mounted(inst.live_dir), "--lazy detaches the live mount at once"
        assert not is_mounted(inst.snapshot_dir), "the snapshot, not in use, is released"
        time.sleep(0.5)
        assert os.pwrite(fd, b"still served", 4096) == 12, "the open disk keeps working"
        assert os.pread(fd, 12, 4096) == b"still served"
        assert alive(inst.pids[0])
    finally:
        os.close(fd)
    assert wait_until(lambda: not any(alive(pid) for pid in inst.pids), timeout=30)
    assert source.read_bytes()[4096:4108] == b"still served"
    assert inst.target.read_bytes() == original
