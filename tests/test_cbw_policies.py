"""The error policies end to end: a snapshot whose target is on a small
tmpfs, so that saving old data runs out of space, with the real commands.

break-guest-write (the default): the guest's write fails with ENOSPC, the
snapshot stays exact (against a copy of the image taken before it), status
counts the failed writes. break-snapshot: the write goes through, the
snapshot breaks (every read fails with EIO, never data), its job ends failed
with the reason, and the live disk and every other snapshot go on."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from conftest import (alive, is_mounted, pwrite_errno, random_bytes, run_snapfs, tmpfs, wait_until,
                      write_image)
from test_snapshots_on_demand import MiB, disk, status  # noqa: F401 (disk: a fixture)


def dd_write(live, offset_mib: int, count_mib: int, seed_byte: bytes) -> subprocess.CompletedProcess:
    """Overwrite with dd as a guest would (O_DIRECT, no truncation)."""
    return subprocess.run(
        ["dd", "if=/dev/stdin", f"of={live}", "bs=1M", f"seek={offset_mib}", f"count={count_mib}",
         "iflag=fullblock", "oflag=direct", "conv=notrunc,fsync", "status=none"],
        input=seed_byte * (count_mib * MiB), capture_output=True)


def _read_fails(fd: int) -> bool:
    try:
        os.pread(fd, MiB, 0)
    except OSError as e:
        assert e.errno == errno.EIO, e
        return True
    return False


def test_default_policy_fails_the_guest_write_and_keeps_the_snapshot(tmp_path, disk):
    d = disk(size=16 * MiB)
    d.mount()
    before = d.source.read_bytes()
    with tmpfs(tmp_path / "small", "1M") as small:
        point = d.snapshot("snap", "--sync", "none", target=small / "t.img")
        result = dd_write(d.live, 2, 8, b"N")
        assert result.returncode != 0 and b"No space left" in result.stderr, result
        assert (point / "disk.img").read_bytes() == before, "the snapshot changed"
        info = status(point)
        assert info["failed_writes"] >= 1 and "No space" in info["last_error"]
        assert info["broken"] is None and info["on_cbw_error"] == "break-guest-write"
        human = run_snapfs("status", point).stdout
        assert "writes to the live disk failed" in human
        # the mounts still answer, and the snapshot can be released
        assert d.live.read_bytes()[:MiB] == before[:MiB]
        run_snapfs("release", point)
        d.umount()


def test_break_snapshot_lets_writes_through_and_only_that_snapshot_breaks(tmp_path, disk):
    d = disk(size=16 * MiB)
    d.mount()
    before = d.source.read_bytes()
    with tmpfs(tmp_path / "small", "1M") as small:
        lost = d.snapshot("lost", "--sync", "none", "--on-cbw-error", "break-snapshot",
                          target=small / "t.img")
        kept = d.snapshot("kept", "--sync", "none", "--on-cbw-error", "break-snapshot")
        held = os.open(lost / "disk.img", os.O_RDONLY)  # its pages are cached from here on
        try:
            assert os.pread(held, 16 * MiB, 0) == before
            assert dd_write(d.live, 2, 8, b"N").returncode == 0, "the guest's write failed"
            assert wait_until(lambda: _read_fails(held), timeout=5), \
                "a descriptor opened before the break still reads cached data"
        finally:
            os.close(held)
        assert d.live.read_bytes()[2 * MiB:10 * MiB] == b"N" * (8 * MiB)
        assert (kept / "disk.img").read_bytes() == before, "the other snapshot changed"
        read = subprocess.run(["dd", f"if={lost / 'disk.img'}", "of=/dev/null", "bs=64K",
                               "count=1", "status=none"], capture_output=True)
        assert read.returncode != 0 and b"Input/output error" in read.stderr, read
        info = status(lost)
        assert info["state"] == "failed" and "could not be saved" in info["error"]
        assert info["broken"] and "No space" in info["broken"]
        waited = run_snapfs("wait", lost, check=False)
        assert waited.returncode != 0 and "could not be saved" in waited.stderr
        assert "broken:" in run_snapfs("status", lost).stdout
        run_snapfs("release", lost)
        run_snapfs("release", kept)
        d.umount()
    assert not is_mounted(lost) and not is_mounted(d.live_dir)


@pytest.mark.parametrize("args, error", [
    (["--on-cbw-error", "ignore"], "invalid choice"),
    (["--cbw-timeout", "0"], "bad timeout"),
    (["--cbw-timeout", "nan"], "bad timeout"),
    (["--cbw-timeout", "soon"], "bad timeout"),
])
def test_bad_policy_options(tmp_path, disk, args, error):
    d = disk()
    d.mount()
    (tmp_path / "snap").mkdir()
    result = run_snapfs("snapshot", d.live_dir, tmp_path / "snap", "--target",
                        tmp_path / "t.img", *args, check=False)
    assert result.returncode == 2 and error in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.img").exists() and not is_mounted(tmp_path / "snap")
    d.umount()


def test_a_broken_snapshot_stays_broken_after_the_daemon_dies(tmp_path, disk):
    d = disk(size=16 * MiB)
    d.mount()
    with tmpfs(tmp_path / "small", "1M") as small:
        lost = d.snapshot("lost", "--sync", "none", "--on-cbw-error", "break-snapshot",
                          target=small / "t.img")
        assert dd_write(d.live, 2, 8, b"N").returncode == 0
        info = status(d.live_dir)
        os.kill(info["pid"], signal.SIGKILL)
        assert wait_until(lambda: not any(alive(s["pid"]) for s in info["snapshots"]))
        run_snapfs("umount", d.live_dir, check=False)  # takes the dead mounts away
        d.mount()
        assert is_mounted(lost)
        read = subprocess.run(["cmp", lost / "disk.img", d.source], capture_output=True)
        assert read.returncode == 2 and b"Input/output error" in read.stderr, read
        again = status(lost)
        assert again["broken"] and again["state"] == "failed"
        run_snapfs("release", lost)
        d.umount()


# --- with TARGET on faultfs: EIO, a hung target, a failing fsync ---------------

def test_break_snapshot_on_target_eio(faulty, mount, tmp_path):
    source = write_image(tmp_path / "disk.img", random_bytes(4 * MiB, seed=7))
    before = source.read_bytes()
    inst = mount(source, sync="none", target=faulty.path / "t.img",
                 extra=["--on-cbw-error", "break-snapshot"])
    faulty.fail("write", errno.EIO, name="t.img")
    assert pwrite_errno(inst.live, b"after" * 1000, MiB) is None
    assert source.read_bytes()[MiB:MiB + 5000] == b"after" * 1000
    info = inst.status()
    assert info["broken"] and "Input/output" in info["broken"] and info["state"] == "failed"
    with pytest.raises(OSError) as raised:
        inst.snapshot.read_bytes()
    assert raised.value.errno == errno.EIO
    faulty.clear()
    assert pwrite_errno(inst.live, b"more", 2 * MiB) is None  # the live disk goes on
    assert source.read_bytes()[:MiB] == before[:MiB]
    inst.umount()


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_timeout_on_a_hung_target(faulty, mount, tmp_path, policy):
    """A target that stops answering: after --cbw-timeout the write fails
    (EIO) or the snapshot breaks and the write goes through; when the target
    comes back, everything goes on and nothing is left behind."""
    source = write_image(tmp_path / "disk.img", random_bytes(4 * MiB, seed=8))
    before = source.read_bytes()
    inst = mount(source, sync="none", target=faulty.path / "t.img",
                 extra=["--on-cbw-error", policy, "--cbw-timeout", "1"])
    faulty.hang("write", name="t.img")
    started = time.monotonic()
    result = pwrite_errno(inst.live, b"late" * 1024, MiB)
    took = time.monotonic() - started
    assert took < 10, f"the write took {took:.1f} s with a 1 s timeout"
    assert os.stat(inst.live).st_size == 4 * MiB  # the live disk answers meanwhile
    if policy == "break-guest-write":
        assert result == errno.EIO
        assert source.read_bytes() == before, "a refused write reached SOURCE"
        assert inst.status()["failed_writes"] >= 1
        assert "more than 1 s" in inst.status()["last_error"]
    else:
        assert result is None
        assert "more than 1 s" in inst.status()["broken"]
    faulty.clear()  # the target answers again: the abandoned copy ends
    if policy == "break-guest-write":
        assert wait_until(lambda: pwrite_errno(inst.live, b"again", MiB) is None)
        assert inst.snapshot.read_bytes() == before, "the snapshot changed"
    inst.umount()


def test_break_snapshot_on_target_fsync_eio(faulty, mount, tmp_path):
    source = write_image(tmp_path / "disk.img", random_bytes(4 * MiB, seed=9))
    inst = mount(source, sync="none", target=faulty.path / "t.img",
                 extra=["--on-cbw-error", "break-snapshot"])
    assert pwrite_errno(inst.live, b"x" * 4096, 0) is None
    faulty.fail("fsync", errno.EIO, name="t.img")
    fd = os.open(inst.live, os.O_WRONLY)
    try:
        os.fsync(fd)  # the guest's fsync succeeds: the snapshot breaks instead
    finally:
        os.close(fd)
    assert inst.status()["broken"]
    faulty.clear()
    inst.umount()
