"""Hostile tests: disks in use (mappings, working directories, loop devices)
and a backup target stored on the very disk it backs up."""

from __future__ import annotations

import mmap
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import is_mounted, need, random_bytes
from test_attack_common import MiB, env, snapfs, status, write_at  # noqa: F401


def test_release_and_umount_refuse_while_the_snapshot_is_only_mapped(env):
    """Guard: a process that mapped the snapshot file and closed it, and one
    whose working directory is the snapshot's mount point, both hold it:
    release and umount refuse naming them; afterwards both succeed."""
    data = random_bytes(2 * MiB, seed=41)
    source = env.root / "disk.img"
    source.write_bytes(data)
    live, snap = env.dirs("live", "snap")
    assert snapfs("mount", source, live, snap, "--target", env.root / "t.img").returncode == 0
    mapper = subprocess.Popen(
        ["python3", "-c", "import mmap, sys, time\n"
         f"f = open({str(snap / 'disk.img')!r}, 'rb')\n"
         "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nf.close()\n"
         "print(m[:4].hex(), flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    sitter = None
    try:
        assert mapper.stdout.readline().strip() == data[:4].hex()
        for command in (["release", snap], ["umount", live]):
            result = snapfs(*command)
            assert result.one_line_error and f"process {mapper.pid}" in result.stderr, result
            assert is_mounted(snap) and is_mounted(live)
        mapper.kill()
        mapper.wait()
        sitter = subprocess.Popen(["sleep", "60"], cwd=snap)
        result = snapfs("release", snap)
        assert result.one_line_error and f"process {sitter.pid}" in result.stderr, result
        sitter.kill()
        sitter.wait()
        assert snapfs("release", snap).returncode == 0
        assert snapfs("umount", live).returncode == 0
    finally:
        for proc in (mapper, sitter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _abort_fuse_connections(points: list[Path]) -> None:
    """Abort the FUSE connections of our mounts (a daemon stuck in the
    kernel cannot be killed otherwise), through a private fusectl mount."""
    from snapfs import mounts

    devices = [m.device for m in mounts.mount_table()
               if m.fstype.startswith("fuse") and str(m.point) in map(str, points)]
    ctl = tempfile.mkdtemp(prefix="attack-fusectl-")
    try:
        if subprocess.run(["mount", "-t", "fusectl", "none", ctl]).returncode != 0:
            return
        try:
            for device in devices:
                try:
                    Path(ctl, device.split(":")[1], "abort").write_text("1")
                except OSError:
                    pass
        finally:
            subprocess.run(["umount", ctl])
    finally:
        os.rmdir(ctl)


def test_target_on_a_file_system_that_lives_on_the_live_disk(env):
    """FAILS, and deadlocks the daemon in the kernel: a careless user backs
    the disk up into the file system on that very disk (ext4 on the live
    disk, loop-mounted; --target FS/backup.img). Copy-before-write, called
    for the loop device's own (journal) writes, writes the old data into
    TARGET on that ext4, which waits for a journal commit, which waits for
    loop I/O to the live disk, which waits for the daemon: `snapfs snapshot`
    never returns, the daemon sits in D state (kill -9 does nothing), and
    every `sync` and `ps` on the machine hangs on it until the FUSE
    connection is aborted. It must be refused like a TARGET inside a snapfs
    mount: the target's file system is backed (through a loop device) by a
    file in a snapfs mount."""
    need("mkfs.ext4")
    source = env.root / "disk.img"
    with open(source, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(source)], check=True)
    live, snap, fs = env.dirs("live", "snap", "fs")
    assert snapfs("mount", source, live).returncode == 0
    loop_device = None
    try:
        subprocess.run(["mount", "-o", "loop", str(live / "disk.img"), str(fs)], check=True)
        from snapfs import mounts
        loop_device = mounts.find_mount(str(fs)).source
        assert loop_device.startswith("/dev/loop"), loop_device
        (fs / "data").write_bytes(random_bytes(8 * MiB, seed=42))
        subprocess.run(["sync", "-f", str(fs / "data")], check=True, timeout=30)
        result = snapfs("snapshot", live, snap, "--target", fs / "backup.img", timeout=20)
        assert result.returncode is not None, \
            "snapfs snapshot hung: the daemon deadlocked on its own loop-mounted file system"
        assert result.one_line_error, result
        assert not is_mounted(snap)
        assert not (fs / "backup.img").exists()
        assert status(live)["snapshots"] == []
    finally:
        _abort_fuse_connections([live, snap])
        env.kill_all()
        if loop_device is not None:
            subprocess.run(["umount", "-l", str(fs)])
            subprocess.run(["losetup", "-d", loop_device], capture_output=True)
