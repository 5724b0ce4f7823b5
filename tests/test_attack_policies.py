"""Attacks on the copy-before-write error policies (--on-cbw-error
break-guest-write|break-snapshot) and --cbw-timeout, end to end with the real
commands. TARGET or SOURCE lies on faultfs (tests/faults.py) or on a small
tmpfs. The oracle for a snapshot is a copy of SOURCE taken before it: a read
of a snapshot that returns data must return exactly that.

Each test that found a defect (a hung target holding up other snapshots,
a FULL job completing over clusters an abandoned copy never saved, cached
pages of a broken snapshot, an export refused without saying why) stays as
its regression test."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import (alive, is_mounted, need, pwrite_errno, random_bytes, run_snapfs, tmpfs,
                      wait_until, write_image)
from test_snapshots_on_demand import MiB, disk, status  # noqa: F401 (disk: a fixture)

KiB = 1 << 10
CLUSTER = 64 * KiB


# --- helpers ----------------------------------------------------------------

class Background:
    """Run `call` in a thread; `result(timeout)` is ("done", value),
    ("raised", exc) or ("running", None)."""

    def __init__(self, call, *args, **kwargs):
        self.outcome = ("running", None)
        self.thread = threading.Thread(target=self._run, args=(call, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, call, args, kwargs):
        try:
            self.outcome = ("done", call(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001
            self.outcome = ("raised", e)

    def result(self, timeout: float):
        self.thread.join(timeout)
        return self.outcome


def read_errno(path, length=MiB, offset=0) -> int | None:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            f.read(length)
    except OSError as e:
        return e.errno
    return None


@pytest.fixture
def rig(faulty, disk, mount):
    """faultfs, then the disk/mount fixtures; on the way out, the faults are
    cleared *before* the mounts are cleaned up (so that an unmount does not
    wait on a hung target)."""
    yield faulty
    try:
        faulty.clear()
    except (OSError, ValueError):
        pass


# --- a break while readers read ---------------------------------------------

def test_readers_racing_a_break_never_see_post_snapshot_data(tmp_path, disk):
    """Readers hammer the snapshot (page cache dropped each time) while
    writers overwrite the live disk and the target runs full: every read
    that returns data returns the point-in-time bytes, the others EIO."""
    d = disk(size=16 * MiB, seed=3)
    d.mount()
    before = d.source.read_bytes()
    bad: list[str] = []
    stop = threading.Event()
    with tmpfs(tmp_path / "small", "2M") as small:
        point = d.snapshot("snap", "--sync", "none", "--on-cbw-error", "break-snapshot",
                           "--cluster-size", "64K", target=small / "t.img")
        fds = [os.open(point / "disk.img", os.O_RDONLY) for _ in range(2)]
        counts = {"data": 0, "eio": 0}

        def reader(fd, seed):
            rnd = random.Random(seed)
            while not stop.is_set():
                off = rnd.randrange(0, 16 * MiB - 4096) & ~511
                length = rnd.choice([4096, 64 * KiB, 200 * KiB, MiB])
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                try:
                    got = os.pread(fd, length, off)
                except OSError as e:
                    if e.errno != errno.EIO:
                        bad.append(f"errno {e.errno}")
                    counts["eio"] += 1
                    continue
                counts["data"] += 1
                if got != before[off:off + len(got)]:
                    bad.append(f"post-snapshot data at {off}+{len(got)}")

        def writer(seed):
            rnd = random.Random(seed)
            fd = os.open(d.live, os.O_WRONLY)
            try:
                for _ in range(200):
                    if stop.is_set():
                        return
                    off = rnd.randrange(0, 16 * MiB - 256 * KiB)
                    os.pwrite(fd, rnd.randbytes(rnd.choice([512, 8192, 256 * KiB])), off)
                    time.sleep(0.005)
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(fd, i)) for i, fd in enumerate(fds)]
        threads += [threading.Thread(target=writer, args=(10 + i,)) for i in range(2)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(20)
            for fd in fds:
                os.close(fd)
        assert not bad, bad[:5]
        assert counts["data"] > 0 and counts["eio"] > 0, counts
        assert status(point)["broken"]
        run_snapfs("release", point)
        d.umount()


def test_cached_pages_are_not_served_right_after_the_break(tmp_path, disk):
    d = disk(size=8 * MiB, seed=4)
    d.mount()
    before = d.source.read_bytes()
    with tmpfs(tmp_path / "small", "1M") as small:
        point = d.snapshot("snap", "--sync", "none", "--on-cbw-error", "break-snapshot",
                           target=small / "t.img")
        fd = os.open(point / "disk.img", os.O_RDONLY)
        served_after_break = []
        stop = threading.Event()
        broke_at = [None]

        def reader():
            while not stop.is_set():
                try:
                    got = os.pread(fd, 4096, 0)
                except OSError:
                    return
                if broke_at[0] is not None:
                    served_after_break.append(got == before[:4096])

        try:
            assert os.pread(fd, MiB, 0) == before[:MiB]  # cached now
            t = threading.Thread(target=reader)
            t.start()
            assert pwrite_errno(d.live, b"N" * (2 * MiB), 4 * MiB) is None
            broke_at[0] = time.monotonic()
            time.sleep(0.5)
            stop.set()
            t.join(10)
        finally:
            os.close(fd)
        assert status(point)["broken"]
        run_snapfs("release", point)
        d.umount()
    assert not served_after_break, \
        f"{len(served_after_break)} reads returned data after the break"


# --- one hung target must not drag down the other snapshots ----------------

def a_hung_beside_b(faulty, disk, seed: int, a_options: list[str], b_options: list[str]):
    """A live disk with snapshot A (target on the faulty file system, its
    writes hung from now on) and snapshot B (a healthy target), both sync
    none: (the disk, A, B, SOURCE before any write)."""
    d = disk(size=4 * MiB, seed=seed)
    d.mount()
    before = d.source.read_bytes()
    a = d.snapshot("a", "--sync", "none", *a_options, target=faulty.path / "a.img")
    b = d.snapshot("b", "--sync", "none", *b_options)
    faulty.hang("write", name="a.img")
    return d, a, b, before


BREAK_AFTER_1S = ["--on-cbw-error", "break-snapshot", "--cbw-timeout", "1"]


def test_a_hung_target_does_not_break_another_snapshot(rig, disk):
    d, a, b, before = a_hung_beside_b(rig, disk, 5, BREAK_AFTER_1S, BREAK_AFTER_1S)
    assert pwrite_errno(d.live, b"x" * 4096, MiB) is None
    broken_a, broken_b = status(a)["broken"], status(b)["broken"]
    rig.clear()
    assert broken_a, "A's target hung past its timeout: A must break"
    assert not broken_b, f"B broke although its target is healthy: {broken_b}"
    assert (b / "disk.img").read_bytes() == before


def test_a_hung_target_does_not_fail_writes_for_another_snapshot(rig, disk):
    d, a, b, _ = a_hung_beside_b(rig, disk, 6, ["--cbw-timeout", "1"], ["--cbw-timeout", "1"])
    result = pwrite_errno(d.live, b"x" * 4096, MiB)
    info_a, info_b = status(a), status(b)
    rig.clear()
    assert result == errno.EIO  # A's copy timed out: the write fails (A's policy)
    assert info_a["failed_writes"] >= 1
    assert info_b["failed_writes"] == 0, f"B counted a failure: {info_b['last_error']}"


def test_timeout_holds_next_to_a_snapshot_without_timeout(rig, disk):
    d, a, b, before = a_hung_beside_b(rig, disk, 7, BREAK_AFTER_1S, [])
    write = Background(pwrite_errno, d.live, b"y" * 4096, MiB)
    outcome = write.result(3.5)
    broken_a = status(a)["broken"]
    rig.clear()
    write.result(30)
    assert (b / "disk.img").read_bytes() == before
    assert outcome == ("done", None), f"after 3.5 s with a 1 s timeout the write is {outcome}"
    assert broken_a


# --- the background job and a timed-out copy on the same clusters --------------

def test_full_job_completed_means_target_is_complete(rig, mount, tmp_path):
    faulty = rig
    source = write_image(faulty.path / "disk.img", random_bytes(4 * MiB, seed=8))
    before = (faulty.backing / "disk.img").read_bytes()
    last = 4 * MiB - CLUSTER
    inst = mount(source, sync="full", cluster_size="64K", speed="2M",
                 extra=["--cbw-timeout", "1"])
    # the copy-before-write's read of the last cluster's old data takes 3 s,
    # then fails (and so do the kernel's retries)
    started = time.monotonic()
    faulty.delay("read", 3, name="disk.img", offset=last, count=1)
    faulty.fail("read", errno.EIO, name="disk.img", offset=last)
    assert pwrite_errno(inst.live, b"z" * 4096, last) == errno.EIO
    assert wait_until(lambda: inst.status()["state"] != "running", timeout=10)
    time.sleep(max(0.0, started + 3.5 - time.monotonic()))  # the abandoned copy failed
    state = inst.status()["state"]
    faulty.clear()
    assert inst.snapshot.read_bytes() == before  # the snapshot itself stays exact
    run_snapfs("release", inst.snapshot_dir)
    target = inst.target.read_bytes()
    inst.umount()
    differs = [i for i in range(0, len(before), CLUSTER)
               if target[i:i + CLUSTER] != before[i:i + CLUSTER]]
    assert not (state == "completed" and differs), \
        f"job {state}, but TARGET differs from the image in clusters at {differs}"


def test_write_under_a_hung_job_copy_times_out(rig, mount, tmp_path):
    """The job's own copy of a cluster hangs; a write to it waits at most
    the timeout, fails (break-guest-write), and once the target answers the
    job goes on and the snapshot and TARGET are exact."""
    faulty = rig
    source = write_image(tmp_path / "disk.img", random_bytes(4 * MiB, seed=9))
    before = source.read_bytes()
    faulty.hang("write", name="t.img")
    inst = mount(source, sync="full", cluster_size="64K",
                 target=faulty.path / "t.img", extra=["--cbw-timeout", "1"])
    started = time.monotonic()
    result = pwrite_errno(inst.live, b"j" * 4096, 0)
    took = time.monotonic() - started
    assert result == errno.EIO and took < 8, (result, took)
    assert source.read_bytes() == before
    faulty.clear()
    assert wait_until(lambda: inst.status()["state"] == "completed", timeout=20)
    assert pwrite_errno(inst.live, b"j" * 4096, 0) is None
    assert inst.snapshot.read_bytes() == before
    run_snapfs("release", inst.snapshot_dir)
    assert (faulty.backing / "t.img").read_bytes() == before
    inst.umount()


# --- many writers, one slow target --------------------------------------------

@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_many_writers_on_the_same_clusters_with_a_slow_target(rig, mount, tmp_path, policy):
    faulty = rig
    source = write_image(tmp_path / "disk.img", random_bytes(2 * MiB, seed=10))
    before = source.read_bytes()
    inst = mount(source, sync="none", cluster_size="64K", target=faulty.path / "t.img",
                 extra=["--on-cbw-error", policy, "--cbw-timeout", "0.5"])
    faulty.delay("write", 1.5, name="t.img")
    results = []

    def writer(i):
        for k in range(3):
            off = (i * 1000 + k * 4096) % (256 * KiB)  # clusters 0..3, overlapping
            results.append(pwrite_errno(inst.live, bytes([65 + i]) * 5000, off))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - started
    assert set(results) <= {None, errno.EIO}, results
    info = inst.status()
    if policy == "break-guest-write":
        assert errno.EIO in results and info["failed_writes"] >= 1
        assert source.read_bytes()[256 * KiB:] == before[256 * KiB:]
        faulty.clear()
        time.sleep(0.5)
        assert inst.snapshot.read_bytes() == before
    else:
        assert results == [None] * 24 and info["broken"]
        assert read_errno(inst.snapshot) == errno.EIO
        faulty.clear()
    assert took < 30, took
    inst.umount()


# --- full target, SOURCE read errors ------------------------------------------

@pytest.mark.parametrize("timeout", ["5"])
def test_enospc_is_reported_as_enospc_with_a_timeout(tmp_path, disk, timeout):
    d = disk(size=8 * MiB, seed=11)
    d.mount()
    before = d.source.read_bytes()
    with tmpfs(tmp_path / "small", "512K") as small:
        extra = ["--cbw-timeout", timeout] if timeout else []
        point = d.snapshot("snap", "--sync", "none", *extra, target=small / "t.img")
        assert pwrite_errno(d.live, b"E" * (2 * MiB), 2 * MiB) == errno.ENOSPC
        assert d.source.read_bytes() == before
        info = status(point)
        assert info["failed_writes"] >= 1 and not info["broken"]
        assert (point / "disk.img").read_bytes() == before
        run_snapfs("release", point)
        d.umount()


@pytest.mark.parametrize("timeout", [None, "5"])
@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_source_read_error_under_each_policy(faulty, mount, policy, timeout):
    source = write_image(faulty.path / "disk.img", random_bytes(2 * MiB, seed=12))
    before = (faulty.backing / "disk.img").read_bytes()
    extra = ["--on-cbw-error", policy] + (["--cbw-timeout", timeout] if timeout else [])
    inst = mount(source, sync="none", cluster_size="64K", extra=extra)
    faulty.fail("read", errno.EIO, name="disk.img", offset=MiB)
    result = pwrite_errno(inst.live, b"S" * 4096, MiB + 100)
    info = inst.status()
    faulty.clear()
    written = (faulty.backing / "disk.img").read_bytes()
    if policy == "break-guest-write":
        assert result == errno.EIO
        assert written == before
        assert info["failed_writes"] >= 1 and "Input/output" in info["last_error"]
        assert not info["broken"]
        assert inst.snapshot.read_bytes() == before
    else:
        assert result is None
        assert written[MiB + 100:MiB + 4196] == b"S" * 4096
        assert info["broken"] and info["state"] == "failed"
        assert read_errno(inst.snapshot) == errno.EIO
    inst.umount()


# --- a hung target and release / umount / kill -9 --------------------------------

def test_release_with_a_hung_target_ends_once_it_answers(rig, mount, tmp_path):
    """What the user sees: release of a snapshot whose target hangs (a
    timed-out copy still stuck). It must not be stuck for good: once the
    target answers, it ends and leaves nothing."""
    faulty = rig
    source = write_image(tmp_path / "disk.img", random_bytes(2 * MiB, seed=13))
    inst = mount(source, sync="none", target=faulty.path / "t.img",
                 extra=["--cbw-timeout", "1"])
    faulty.hang("write", name="t.img")
    assert pwrite_errno(inst.live, b"h" * 4096, 0) == errno.EIO
    release = Background(run_snapfs, "release", inst.snapshot_dir, check=False, timeout=60)
    early = release.result(2)
    assert os.stat(inst.live).st_size == 2 * MiB  # the live disk still answers
    faulty.clear()
    outcome = release.result(40)
    assert outcome[0] == "done" and outcome[1].returncode == 0, (early, outcome)
    assert not is_mounted(inst.snapshot_dir)
    inst.umount()


def test_kill_9_while_a_timed_out_copy_is_stuck_then_resume(rig, disk):
    faulty = rig
    d = disk(size=4 * MiB, seed=14)
    d.mount()
    before = d.source.read_bytes()
    point = d.snapshot("snap", "--sync", "none", "--cbw-timeout", "1",
                       target=faulty.path / "t.img")
    faulty.hang("write", name="t.img")
    assert pwrite_errno(d.live, b"k" * 4096, MiB) == errno.EIO
    info = status(d.live_dir)
    os.kill(info["pid"], signal.SIGKILL)
    assert wait_until(lambda: not alive(info["pid"]), timeout=10)
    faulty.clear()
    assert wait_until(lambda: not any(alive(s["pid"]) for s in info["snapshots"]), timeout=10)
    run_snapfs("umount", d.live_dir, check=False)  # takes the dead mounts away
    assert d.source.read_bytes() == before
    d.mount()
    assert is_mounted(point)
    assert (point / "disk.img").read_bytes() == before
    assert pwrite_errno(d.live, b"k" * 4096, MiB) is None
    assert (point / "disk.img").read_bytes() == before
    assert not status(point)["broken"]
    run_snapfs("release", point)
    d.umount()


# --- the commands on a broken snapshot, NBD -------------------------------------

def test_commands_and_nbd_on_a_broken_snapshot(tmp_path, disk):
    d = disk(size=8 * MiB, seed=15)
    d.mount()
    with tmpfs(tmp_path / "small", "1M") as small:
        point = d.snapshot("snap", "--sync", "full", "--speed", "1M", "--on-cbw-error",
                           "break-snapshot", target=small / "t.img")
        sock = tmp_path / "before.sock"
        run_snapfs("export", point, "--socket", sock)
        uri = f"nbd+unix:///?socket={sock}"
        subprocess.run([need("nbdinfo"), uri], check=True, capture_output=True)
        assert pwrite_errno(d.live, b"B" * (4 * MiB), 2 * MiB) is None
        info = status(point)
        assert info["broken"] and info["state"] == "failed"
        # an export started before the break serves no data
        copy = subprocess.run([need("nbdcopy"), uri, str(tmp_path / "copy.img")],
                              capture_output=True, timeout=60)
        assert copy.returncode != 0, "nbdcopy copied a broken snapshot"
        # nor does one started after it
        late = run_snapfs("export", point, "--socket", tmp_path / "after.sock", check=False)
        assert late.returncode != 0, late
        waited = run_snapfs("wait", point, check=False)
        assert waited.returncode == 1 and "broken" in waited.stderr
        cancel = run_snapfs("cancel", point, check=False)
        assert status(point)["state"] == "failed", cancel  # stays failed, not cancelled
        assert "broken:" in run_snapfs("status", point).stdout
        live_info = status(d.live_dir)
        assert [s["broken"] is not None for s in live_info["snapshots"]] == [True]
        assert read_errno(point / "disk.img") == errno.EIO
        run_snapfs("release", point)
        assert not is_mounted(point)
        header = (small / "t.img.snapfs").read_bytes()[:4096]
        assert b'"failed"' in header
        d.umount()


def test_export_of_a_broken_snapshot_says_why(tmp_path, disk):
    d = disk(size=4 * MiB, seed=17)
    d.mount()
    with tmpfs(tmp_path / "small", "512K") as small:
        point = d.snapshot("snap", "--sync", "none", "--on-cbw-error", "break-snapshot",
                           target=small / "t.img")
        assert pwrite_errno(d.live, b"B" * (2 * MiB), MiB) is None
        late = run_snapfs("export", point, "--socket", tmp_path / "s.sock", check=False)
        run_snapfs("release", point)
        d.umount()
    assert late.returncode != 0 and "is broken" in late.stderr, late.stderr


# --- odd option values ------------------------------------------------------

def test_odd_timeouts_are_refused(tmp_path, disk):
    d = disk(size=MiB)
    d.mount()
    (tmp_path / "snap").mkdir()
    for value in ["inf", "-inf", "-1", "-0", "86401", "1e400", "", "0x10", "nan"]:
        result = run_snapfs("snapshot", d.live_dir, tmp_path / "snap", "--target",
                            tmp_path / "t.img", f"--cbw-timeout={value}", check=False)
        assert result.returncode == 2 and "bad timeout" in result.stderr, (value, result.stderr)
        assert not (tmp_path / "t.img").exists() and not is_mounted(tmp_path / "snap")
    d.umount()


def test_policy_options_on_mount_and_in_status(tmp_path, mount):
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=16))
    inst = mount(source, sync="none", extra=["--on-cbw-error", "break-snapshot",
                                             "--cbw-timeout", "0.25"])
    info = inst.status()
    assert info["on_cbw_error"] == "break-snapshot" and info["cbw_timeout"] == 0.25
    assert info["broken"] is None and info["failed_writes"] == 0 and info["last_error"] is None
    assert "timeout 0.25 s" in run_snapfs("status", inst.snapshot_dir).stdout
    assert pwrite_errno(inst.live, b"q" * 4096, 0) is None  # a healthy target: no break
    assert inst.status()["broken"] is None
    inst.umount()
