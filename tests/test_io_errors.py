"""End to end: what snapfs does when the disks under it fail. SOURCE or
TARGET lies on faultfs (tests/faultfs.py), which fails operations on
command; ENOSPC also comes from a real full tmpfs.

The oracle for the snapshot is a copy of SOURCE taken before the snapshot.
Every test ends with both mounts answering and the snapshot exact once the
fault is gone. These run with the default policy (break-guest-write);
tests/test_cbw_policies.py covers break-snapshot and the timeout."""

from __future__ import annotations

import errno
import json
import os

import pytest

from conftest import fill, random_bytes, read_at, tmpfs, write_at, write_image

MiB = 1 << 20
KiB = 1 << 10
SIZE = 4 * MiB
CLUSTER = 64 * KiB
#: far from where a paced FULL job starts (it copies in order from 0)
LATE = 3 * MiB + 5 * KiB
#: slow enough that a FULL job stays below LATE for the whole test
SLOW = "256K"


def errno_of(call, *args) -> int | None:
    """The errno `call` fails with, None if it succeeds."""
    try:
        call(*args)
    except OSError as e:
        return e.errno
    return None


def snapshot_status(inst) -> dict:
    (info,) = inst.live_status()["snapshots"]
    return info


def assert_both_mounts_answer(inst) -> None:
    os.stat(inst.live)
    os.stat(inst.snapshot)
    read_at(inst.live, 0, 4096)
    read_at(inst.snapshot, 0, 4096)
    snapshot_status(inst)


def make_source(directory, seed=1) -> tuple:
    source = write_image(directory / "disk.img", random_bytes(SIZE, seed=seed))
    return source, source.read_bytes()


# --- TARGET fails during copy-before-write ------------------------------------

WRITE_FAULTS = [("ENOSPC", errno.ENOSPC, "No space left on device"),
                ("EIO", errno.EIO, "Input/output error")]


@pytest.mark.parametrize("sync", ["full", "none"])
@pytest.mark.parametrize("name,code,text", WRITE_FAULTS, ids=[f[0] for f in WRITE_FAULTS])
def test_target_write_fails_during_copy_before_write(faulty, mount, tmp_path, sync, name,
                                                     code, text):
    source, oracle = make_source(tmp_path)
    inst = mount(source, sync=sync, cluster_size="64K", speed=SLOW,
                 target=faulty.path / "target.img")
    faulty.fail("write", code, name="target.img", offset=3 * MiB)

    assert errno_of(write_at, inst.live, LATE, b"new data" * 512) == code, \
        "the guest's write fails with the target's error"
    assert source.read_bytes() == oracle, "SOURCE was not written"
    assert faulty.stats()["write"]["failed"] >= 1
    assert read_at(inst.snapshot, LATE, 4096) == oracle[LATE:LATE + 4096]
    assert inst.snapshot.read_bytes() == oracle
    status_then = json.dumps(snapshot_status(inst))
    assert_both_mounts_answer(inst)

    faulty.clear()
    write_at(inst.live, LATE, b"new data" * 512)
    assert read_at(inst.live, LATE, 4096) == b"new data" * 512
    assert inst.snapshot.read_bytes() == oracle
    assert (faulty.backing / "target.img").read_bytes()[LATE - LATE % CLUSTER:][:CLUSTER] \
        == oracle[LATE - LATE % CLUSTER:][:CLUSTER], "the old cluster reached TARGET"
    inst.umount()
    assert text in status_then, "status showed the error"


@pytest.mark.parametrize("sync", ["full", "none"])
def test_target_on_a_full_file_system(mount, tmp_path, sync):
    """ENOSPC from a real full disk: a small tmpfs holds TARGET. (With FULL,
    the job fails too, on its next chunk, and status shows that.)"""
    source, oracle = make_source(tmp_path)
    with tmpfs(tmp_path / "small", "2M") as small:
        inst = mount(source, sync=sync, cluster_size="64K", speed=SLOW,
                     target=small / "target.img")
        try:
            fill(small)
            assert errno_of(write_at, inst.live, LATE, b"x" * 4096) == errno.ENOSPC
            assert source.read_bytes() == oracle
            assert inst.snapshot.read_bytes() == oracle
            status_then = json.dumps(snapshot_status(inst))
            assert_both_mounts_answer(inst)
            os.unlink(small / "filler")
            write_at(inst.live, LATE, b"x" * 4096)
            assert inst.snapshot.read_bytes() == oracle
            inst.umount()
            assert "No space left on device" in status_then, "status showed the error"
        finally:
            inst.cleanup()


# --- TARGET fails fsync -----------------------------------------------------------

@pytest.mark.parametrize("sync", ["full", "none"])
def test_target_fsync_fails(faulty, mount, tmp_path, sync):
    source, oracle = make_source(tmp_path)
    inst = mount(source, sync=sync, cluster_size="64K", speed=SLOW,
                 target=faulty.path / "target.img")
    write_at(inst.live, LATE, b"A" * 4096)  # copy-before-write works
    faulty.fail("fsync", errno.EIO, name="target.img")
    fd = os.open(inst.live, os.O_RDWR)
    try:
        assert errno_of(os.fsync, fd) == errno.EIO, "the guest's fsync fails"
        assert errno_of(os.fdatasync, fd) == errno.EIO
        assert faulty.stats()["fsync"]["failed"] >= 2
        assert inst.snapshot.read_bytes() == oracle
        assert_both_mounts_answer(inst)
        faulty.clear()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert inst.snapshot.read_bytes() == oracle
    inst.umount()


# --- SOURCE fails reads ---------------------------------------------------------------

BAD = 2 * MiB  # SOURCE's reads fail from here on


@pytest.mark.parametrize("sync", ["full", "none"])
def test_source_read_fails(faulty, mount, sync):
    source, oracle = make_source(faulty.path)
    # a FULL job at 4M/s reaches BAD in half a second
    inst = mount(source, sync=sync, cluster_size="64K", speed="4M")
    faulty.fail("read", errno.EIO, name="disk.img", offset=BAD)

    assert errno_of(read_at, inst.live, LATE, 4096) == errno.EIO, "the guest's read fails"
    assert read_at(inst.live, 0, 4096) == oracle[:4096], "reads below BAD still work"
    assert errno_of(write_at, inst.live, LATE, b"w" * 4096) == errno.EIO, \
        "a write that cannot read the old data fails"
    assert errno_of(read_at, inst.snapshot, LATE, 4096) == errno.EIO, \
        "a snapshot read of what is not copied fails"
    assert read_at(inst.snapshot, 0, 4096) == oracle[:4096]
    if sync == "full":
        result = inst.wait(check=False)
        assert result.returncode == 1 and "Input/output error" in result.stderr, result.stderr
        info = snapshot_status(inst)
        assert info["state"] == "failed" and "Input/output error" in info["error"], info
    assert_both_mounts_answer(inst)

    faulty.clear()
    assert inst.snapshot.read_bytes() == oracle
    write_at(inst.live, LATE, b"w" * 4096)
    assert inst.snapshot.read_bytes() == oracle
    assert read_at(inst.live, LATE, 4096) == b"w" * 4096
    inst.umount()
    assert (faulty.backing / "disk.img").read_bytes()[LATE:LATE + 4096] == b"w" * 4096


# --- TARGET fails under the background job ---------------------------------------------

def test_target_write_fails_under_the_job(faulty, mount, tmp_path):
    """The job fails with the cause; copy-before-write goes on (the write
    passes once the disk does), and the snapshot stays exact."""
    source, oracle = make_source(tmp_path)
    faulty_target = faulty.path / "target.img"
    inst = mount(source, sync="full", cluster_size="64K", speed="1M", target=faulty_target)
    faulty.fail("write", errno.EIO, name="target.img")
    result = inst.wait(check=False)
    assert result.returncode == 1 and "Input/output error" in result.stderr, result.stderr
    info = snapshot_status(inst)
    assert info["state"] == "failed" and "Input/output error" in info["error"], info
    assert inst.snapshot.read_bytes() == oracle
    faulty.clear()
    write_at(inst.live, LATE, b"after" * 800)
    assert inst.snapshot.read_bytes() == oracle
    assert_both_mounts_answer(inst)
    inst.umount()
