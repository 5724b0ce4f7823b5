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

import pytest

from conftest import alive, is_mounted, run_snapfs, tmpfs, wait_until
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
