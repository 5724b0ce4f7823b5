"""Hostile tests of incremental backups while things happen: offline
changes to SOURCE, kill -9 at each stage, several snapshots at once, writers
racing with the backups, a qcow2 SOURCE with a backing file. The oracle is
qemu-img against the disk at each backup's moment."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import threading
import time

import pytest

from conftest import random_bytes, wait_until
from test_attack_common import snapfs, status
from test_attack_incremental import (CLUSTER, MiB, SIZE, Disk, backing_of, chain_bytes, chain_is,  # noqa: F401
                                     disk, env, qemu_img, qemu_io, refused_in_one_line)


def full_then_changes(d: Disk):
    d.mount()
    d.backup("full", "full")
    d.write(3 * CLUSTER, random_bytes(CLUSTER, 41))


def incremental_is_safe(d: Disk, name="inc") -> str:  # noqa: C901
    """The next incremental: refused in one line asking for a FULL, or
    exactly the disk at its moment."""
    moment = d.read()
    result = d.snapshot(name, "incremental", check=False)
    if result.returncode != 0:
        refused_in_one_line(result, "full backup")
        return "refused"
    d.wait(name)
    d.release(name)
    assert chain_is(d.root / f"{name}.qcow2", moment, d.root), \
        "a completed incremental whose chain is not the disk at its moment"
    return "exact"


# --- changes while nothing had SOURCE mounted -----------------------------------


def offline(d: Disk, how: str, tmp):
    src = str(d.source)
    if how == "dd":
        subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=4k", "count=1", "seek=300",
                        "conv=notrunc"], check=True, capture_output=True)
    elif how == "truncate-and-extend":
        data = d.source.read_bytes()
        os.truncate(src, SIZE - CLUSTER)
        os.truncate(src, SIZE)  # the last cluster now reads zeroes
        assert d.source.read_bytes() != data
    elif how == "cp-over":
        other = tmp / "other.img"
        data = bytearray(d.source.read_bytes())
        data[CLUSTER * 9:CLUSTER * 9 + 10] = b"cp over it"
        other.write_bytes(data)
        subprocess.run(["cp", str(other), src], check=True)
    elif how == "mv-in-place":
        other = tmp / "other.img"
        data = bytearray(d.source.read_bytes())
        data[CLUSTER * 11:CLUSTER * 11 + 10] = b"mv over it"
        other.write_bytes(data)
        os.rename(other, src)
    elif how == "write-then-restore-mtime":
        st = os.stat(src)
        with open(src, "r+b") as f:
            f.seek(CLUSTER * 13)
            f.write(b"sneaky")
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif how == "qemu-io":
        qemu_io(src, "write -P 0x33 1M 64k", fmt="raw")
    elif how == "touch":
        os.utime(src)
    else:
        raise AssertionError(how)


OFFLINE = ["dd", "truncate-and-extend", "cp-over", "mv-in-place", "write-then-restore-mtime",
           "qemu-io", "touch"]


@pytest.mark.parametrize("how", OFFLINE)
def test_offline_change_after_umount(disk, tmp_path, how):
    d = disk()
    full_then_changes(d)
    d.umount()
    offline(d, how, tmp_path)
    d.mount()
    if how != "touch":
        assert status(d.live_dir)["change_tracking_reset"], "an offline change went unseen"
    incremental_is_safe(d)


@pytest.mark.parametrize("how", ["dd", pytest.param("truncate-and-extend", marks=pytest.mark.slow),
                                 pytest.param("cp-over", marks=pytest.mark.slow), "qemu-io"])
def test_offline_change_after_kill_9_while_quiet(disk, tmp_path, how):
    d = disk()
    full_then_changes(d)
    time.sleep(2.5)  # quiet: SOURCE recorded
    d.kill9()
    time.sleep(2.5)  # well past the heartbeat's slack
    offline(d, how, tmp_path)
    d.mount()
    assert status(d.live_dir)["change_tracking_reset"], "an offline change went unseen"
    incremental_is_safe(d)


def test_offline_change_after_kill_9_while_writing(disk, tmp_path):
    """Killed while a writer goes on; the offline change comes 3 s later,
    past the 2 s heartbeat slack: it must be seen."""
    d = disk()
    full_then_changes(d)
    stop = threading.Event()

    def writer():
        fd = os.open(d.live, os.O_WRONLY)
        i = 0
        try:
            while not stop.is_set():
                os.pwrite(fd, random_bytes(4096, i), (i * 4096 * 7) % SIZE)
                i += 1
                time.sleep(0.01)
        except OSError:
            pass  # the daemon was killed under it
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the mount is dead
                os.close(fd)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(2.2)
        d.kill9()
    finally:
        stop.set()
        thread.join()
    time.sleep(3.5)
    offline(d, "dd", tmp_path)
    d.mount()
    assert status(d.live_dir)["change_tracking_reset"], "an offline change went unseen"
    incremental_is_safe(d)


@pytest.mark.xfail(strict=True, reason="documented limitation (docs/incremental.md): a write "
                   "by another program within 2 s of the daemon's death is not told apart; "
                   "this shows the incremental that follows is silently wrong")
def test_offline_change_within_two_seconds_of_a_kill_while_writing(disk, tmp_path):
    d = disk()
    full_then_changes(d)
    d.write(5 * CLUSTER, b"w" * 4096)  # writing: a heartbeat
    d.kill9()
    offline(d, "dd", tmp_path)  # at once: within the slack
    d.mount()
    incremental_is_safe(d)


def test_touch_through_the_live_mount_then_kill_9_keeps_tracking(disk):
    """`touch LIVE/disk.img` changes SOURCE's times through snapfs itself:
    not a change made while nothing had SOURCE mounted; after a kill -9
    the checkpoints must stay (no reset, the incremental goes on)."""
    d = disk()
    full_then_changes(d)
    time.sleep(2.5)  # quiet: SOURCE recorded
    os.utime(d.live)
    d.kill9()
    d.mount()
    assert status(d.live_dir)["change_tracking_reset"] is None
    assert incremental_is_safe(d) == "exact"


# --- qcow2 SOURCE with a backing file --------------------------------------------


def qcow2_source(d: Disk, tmp):
    base = tmp / "base.qcow2"
    raw = tmp / "base.raw"
    raw.write_bytes(random_bytes(SIZE, 51))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    raw.unlink()
    d.source.unlink()
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d.source)
    qemu_io(d.source, "write -P 0x11 0 128k")


def test_qcow2_source_backing_file_changed_while_unmounted(env, tmp_path):
    """The disk is SOURCE with its backing chain: a change to the backing
    file while nothing had SOURCE mounted changes the disk where the overlay
    holds nothing; change tracking cannot have seen it: it must reset, not
    build an incremental that misses it."""
    d = Disk(env.root, name="disk.qcow2")
    qcow2_source(d, env.root)
    d.mount()
    d.backup("full", "full")
    d.write(3 * CLUSTER, random_bytes(CLUSTER, 52))
    d.umount()
    qemu_io(env.root / "base.qcow2", "write -P 0x77 4M 64k")
    d.mount()
    incremental_is_safe(d)


def test_qcow2_source_tracking_survives_a_clean_umount(env):
    """Nothing touched SOURCE between a clean umount and the next mount:
    change tracking must go on (docs/incremental.md: "survives umount"),
    for a qcow2 SOURCE as for a raw one."""
    d = Disk(env.root, name="disk.qcow2")
    qcow2_source(d, env.root)
    d.mount()
    d.backup("full", "full")
    d.write(3 * CLUSTER, random_bytes(CLUSTER, 52))
    d.umount()
    d.mount()
    assert status(d.live_dir)["change_tracking_reset"] is None
    assert status(d.live_dir)["bytes_changed"] == CLUSTER
    assert incremental_is_safe(d) == "exact"


def test_qcow2_source_tracking_survives_kill_9_while_quiet(env):
    d = Disk(env.root, name="disk.qcow2")
    qcow2_source(d, env.root)
    d.mount()
    d.backup("full", "full")
    d.write(3 * CLUSTER, random_bytes(CLUSTER, 52))
    time.sleep(2.5)
    d.kill9()
    d.mount()
    assert status(d.live_dir)["change_tracking_reset"] is None
    assert incremental_is_safe(d) == "exact"


def test_qcow2_source_top_checkpoint_then_incrementals(env, tmp_path):
    """A TOP into qcow2 (backed by SOURCE's backing file) is a checkpoint:
    incrementals on it; zero clusters in the overlay over backing data too."""
    d = Disk(env.root, name="disk.qcow2")
    qcow2_source(d, env.root)
    qemu_io(d.source, "write -z 2M 128k")  # zero clusters hiding the backing file's data
    d.mount()
    top, m0 = d.backup("top", "top")
    assert chain_is(top, m0, d.root), "the TOP checkpoint is not the disk"
    d.write(2 * MiB + CLUSTER, random_bytes(100, 53))
    d.write(6 * MiB, bytes(CLUSTER))
    inc, m1 = d.backup("inc", "incremental")
    assert chain_is(inc, m1, d.root)
    d.write(7 * MiB, random_bytes(3 * CLUSTER, 54))
    inc2, m2 = d.backup("inc2", "incremental", "--cluster-size", "4K")
    assert chain_is(inc2, m2, d.root)
    assert qemu_img("check", inc2, check=False).returncode == 0


# --- kill -9 at every stage ---------------------------------------------------


def restart(d: Disk):
    d.kill9()
    result = d.mount(check=False)
    assert result.returncode == 0, result
    return result


def test_kill_9_between_wait_and_release(disk):
    d = disk()
    full_then_changes(d)
    moment = d.read()
    d.snapshot("inc", "incremental")
    d.wait("inc")
    restart(d)
    info = status(d.root / "inc")
    assert info["state"] == "completed" and info["checkpoint"] == "checkpoint", info
    d.release("inc")
    assert chain_is(d.root / "inc.qcow2", moment, d.root)
    d.write(20 * CLUSTER, b"next")
    assert incremental_is_safe(d, "inc2") == "exact"


def test_kill_9_right_after_the_snapshot_command(disk):
    d = disk()
    full_then_changes(d)
    moment = d.read()
    d.snapshot("inc", "incremental", "--speed", "64K")
    d.write(3 * CLUSTER, random_bytes(CLUSTER, 60))  # after its moment
    d.write(30 * CLUSTER, random_bytes(CLUSTER, 61))
    restart(d)
    d.write(31 * CLUSTER, random_bytes(CLUSTER, 62))
    d.wait("inc")
    with open(d.root / "inc" / d.source.name, "rb") as f:
        assert f.read() == moment
    d.release("inc")
    assert chain_is(d.root / "inc.qcow2", moment, d.root)
    assert incremental_is_safe(d, "inc2") == "exact"


def test_kill_9_during_writes_after_a_backup_twice(disk):
    d = disk()
    full_then_changes(d)
    for round_ in range(3):
        for i in range(20):
            d.write(random.Random(round_ * 100 + i).randrange(SIZE - 5000),
                    random_bytes(5000, round_ * 100 + i))
        restart(d)
    assert incremental_is_safe(d) == "exact"


def test_kill_9_while_an_incremental_is_cancelled_meanwhile(disk):
    """kill -9 while an incremental runs; after the restart it is cancelled:
    its changes go to the next one."""
    d = disk()
    full_then_changes(d)
    d.snapshot("inc", "incremental", "--speed", "1")
    d.write(50 * CLUSTER, b"during")
    restart(d)
    result = snapfs("cancel", d.root / "inc")
    assert result.returncode == 0, result
    d.release("inc")
    d.write(51 * CLUSTER, b"after")
    assert incremental_is_safe(d, "inc2") == "exact"
    assert backing_of(d.root / "inc2.qcow2") == "full.qcow2"


# --- several snapshots at once -------------------------------------------------


def test_full_and_incremental_at_once_incremental_first_released(disk):
    d = disk()
    full_then_changes(d)
    m1 = d.read()
    d.snapshot("inc", "incremental", "--speed", "256K")
    d.write(7 * CLUSTER, random_bytes(CLUSTER, 70))
    m2 = d.read()
    d.snapshot("full2", "full")
    d.write(3 * CLUSTER, random_bytes(CLUSTER, 71))
    d.write(8 * CLUSTER, random_bytes(CLUSTER, 72))
    d.wait("inc")
    d.release("inc")
    d.wait("full2")
    d.release("full2")
    assert chain_is(d.root / "inc.qcow2", m1, d.root)
    assert chain_is(d.root / "full2.qcow2", m2, d.root)
    d.write(9 * CLUSTER, b"next")
    assert incremental_is_safe(d, "inc2") == "exact"
    assert backing_of(d.root / "inc2.qcow2") == "full2.qcow2"


def test_two_incrementals_at_once_first_cancelled(disk):
    d = disk()
    full_then_changes(d)
    d.snapshot("a", "incremental", "--speed", "1")
    d.write(12 * CLUSTER, random_bytes(CLUSTER, 80))
    m_b = d.read()
    d.snapshot("b", "incremental")
    d.write(13 * CLUSTER, random_bytes(CLUSTER, 81))
    d.wait("b")
    assert snapfs("cancel", d.root / "a").returncode == 0
    d.release("b")  # reversed order
    d.release("a")
    assert chain_is(d.root / "b.qcow2", m_b, d.root)
    d.write(14 * CLUSTER, b"next")
    assert incremental_is_safe(d, "c") == "exact"
    assert backing_of(d.root / "c.qcow2") == "b.qcow2"


def test_two_incrementals_at_once_second_cancelled(disk):
    d = disk()
    full_then_changes(d)
    m_a = d.read()
    d.snapshot("a", "incremental")
    d.write(12 * CLUSTER, random_bytes(CLUSTER, 80))
    d.snapshot("b", "incremental", "--speed", "1")
    d.write(13 * CLUSTER, random_bytes(CLUSTER, 81))
    d.wait("a")
    assert snapfs("cancel", d.root / "b").returncode == 0
    d.release("b")
    d.release("a")
    assert chain_is(d.root / "a.qcow2", m_a, d.root)
    d.write(14 * CLUSTER, b"next")
    assert incremental_is_safe(d, "c") == "exact"
    assert backing_of(d.root / "c.qcow2") == "a.qcow2"


@pytest.mark.slow
def test_a_chain_of_twenty_incrementals(disk):
    """Nightly incrementals on one FULL for three weeks: docs/incremental.md
    refuses an incremental only for the reasons it lists (raw target, no
    checkpoint, a bad --base, a replaced or changed base); a long chain is
    not one of them."""
    d = disk(size=2 * MiB)
    d.mount()
    d.backup("b0", "full", check_mount=False)
    for i in range(1, 21):
        d.write(i * CLUSTER, random_bytes(100, i))
        target, moment = d.backup(f"b{i}", "incremental", check_mount=False)
    assert chain_is(target, moment, d.root)


def test_differentials_past_the_kept_checkpoints(disk):
    """Differentials on one FULL (--base FULL every day): once change
    tracking dropped the FULL (16 boundaries kept), --base FULL is refused in
    one line, and a plain incremental still builds exactly on the last one."""
    d = disk(size=2 * MiB)
    d.mount()
    first, _ = d.backup("b0", "full", check_mount=False)
    for i in range(1, 17):
        d.write(i * CLUSTER, random_bytes(100, i))
        target, moment = d.backup(f"b{i}", "incremental", "--base", first, check_mount=False)
        assert chain_is(target, moment, d.root)
    d.write(0, b"x")
    result = d.snapshot("old", "incremental", "--base", first, check=False)
    if result.returncode == 0:
        moment = d.read()
        d.wait("old")
        d.release("old")
        assert chain_is(d.root / "old.qcow2", moment, d.root)
    else:
        refused_in_one_line(result, "not a completed backup")
    assert incremental_is_safe(d, "last") == "exact"


# --- writers racing with backups ------------------------------------------------


class Writer:
    """Random writes of odd sizes at odd offsets (one pwrite each), and
    sequential runs across 4 MiB batches, until stopped; `pause()` stops
    them between two writes."""

    def __init__(self, path, seed):
        self.path = path
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.gate = threading.Lock()
        self.error = None
        self.count = 0
        self.thread = threading.Thread(target=self.run)

    def run(self):
        fd = os.open(self.path, os.O_WRONLY)
        rng = self.rng
        seq = rng.randrange(SIZE)
        try:
            while not self.stop.is_set():
                with self.gate:
                    if rng.random() < 0.3:  # sequential, across batches
                        length = rng.choice([128 << 10, 1 << 20])
                        if seq + length > SIZE:
                            seq = rng.randrange(SIZE // 2)
                        offset = seq
                        seq += length
                    else:
                        length = rng.choice([1, 511, 4096, 65536 + 1, 3 * 65536 - 7, 200000])
                        offset = rng.randrange(SIZE - length)
                    os.pwrite(fd, rng.randbytes(length), offset)
                    self.count += 1
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_incrementals_while_a_writer_hammers(disk, seed):
    """The writer pauses only around each `snapfs snapshot` (so that the
    disk's content at the moment is known); the backups then run while it
    writes on. Each chain must be the disk at its moment, and the snapshot's
    mount too."""
    d = disk()
    d.mount()
    with Writer(d.live, seed) as w:
        moments = []
        for i in range(6):
            time.sleep(0.3)
            name = f"b{i}"
            sync = "full" if i == 0 else "incremental"
            extra = ["--cluster-size", random.Random(seed * 10 + i).choice(["4K", "64K", "1M"])]
            with w.gate:
                moment = d.read()
                d.snapshot(name, sync, *extra)
            moments.append((name, moment))
            if i % 2:
                time.sleep(0.2)
                d.wait(name)
                with open(d.root / name / d.source.name, "rb") as f:
                    assert f.read() == moment, f"{name}: its mount is not its moment"
                d.release(name)
                assert chain_is(d.root / f"{name}.qcow2", moment, d.root), \
                    f"{name}: the chain is not the disk at its moment"
            else:
                d.wait(name)
                d.release(name)
                assert chain_is(d.root / f"{name}.qcow2", moment, d.root), \
                    f"{name}: the chain is not the disk at its moment"
        assert w.error is None and w.count > 50
    last = d.root / f"{moments[-1][0]}.qcow2"
    assert qemu_img("check", last, check=False).returncode == 0


def test_dd_sequential_across_batches_while_incremental(disk, tmp_path):
    """dd writes the disk sequentially with odd block sizes while an
    incremental is taken in the middle, with the writer paused at that
    moment; then the next incremental holds the rest."""
    d = disk(size=16 * MiB)
    d.mount()
    d.backup("full", "full", check_mount=False)
    src = tmp_path / "fill"
    src.write_bytes(random_bytes(16 * MiB, 90))
    subprocess.run(["dd", f"if={src}", f"of={d.live}", "bs=12345", "count=400", "conv=notrunc",
                    "oflag=direct", "iflag=fullblock"], check=True, capture_output=True)
    t1, m1 = d.backup("inc1", "incremental")
    assert chain_is(t1, m1, d.root)
    subprocess.run(["dd", f"if={src}", f"of={d.live}", "bs=1M", "skip=3", "seek=3", "count=9",
                    "conv=notrunc"], check=True, capture_output=True)
    subprocess.run(["dd", f"if=/dev/zero", f"of={d.live}", "bs=4096", "seek=1000", "count=700",
                    "conv=notrunc"], check=True, capture_output=True)
    t2, m2 = d.backup("inc2", "incremental", "--cluster-size", "2M")
    assert chain_is(t2, m2, d.root)


# --- snapfs changes ------------------------------------------------------------


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_changes_refused_for_other_snapshots(disk, sync):
    d = disk()
    d.mount()
    d.snapshot("s", sync, "--speed", "1")
    result = snapfs("changes", d.root / "s")
    refused_in_one_line(result, "not an incremental")
    result = snapfs("changes", d.root / "s", "--json")
    refused_in_one_line(result, "not an incremental")
    result = snapfs("changes", d.live_dir, "--json")
    assert result.one_line_error, result


def test_changes_json_covers_the_disk_and_matches_what_is_copied(disk):
    d = disk()
    full_then_changes(d)
    d.write(SIZE - 1, b"e")
    d.write(CLUSTER * 64 - 1, b"ab")  # across a 4 MiB batch boundary
    d.snapshot("inc", "incremental")
    listed = json.loads(snapfs("changes", d.root / "inc", "--json").stdout)
    text = snapfs("changes", d.root / "inc")
    d.wait("inc")
    d.release("inc")
    assert listed[0]["start"] == 0 and listed[-1]["start"] + listed[-1]["length"] == SIZE
    assert all(a["start"] + a["length"] == b["start"] and a["changed"] != b["changed"]
               for a, b in zip(listed, listed[1:]))
    changed = [(e["start"], e["length"]) for e in listed if e["changed"]]
    assert changed == [(3 * CLUSTER, CLUSTER), (63 * CLUSTER, 2 * CLUSTER),
                       (SIZE - CLUSTER, CLUSTER)]
    assert text.returncode == 0 and str(3 * CLUSTER) in text.stdout


def test_incrementals_while_a_writer_never_pauses(disk):
    """No pause at all: each chain must read exactly what the snapshot's own
    mount serves (its point-in-time image, read before release), whatever
    the writer was doing when the command ran; several writers, odd sizes,
    two incrementals overlapping."""
    d = disk()
    d.mount()
    writers = [Writer(d.live, seed) for seed in (11, 12, 13)]
    for w in writers:
        w.thread.start()
    try:
        time.sleep(0.2)
        d.snapshot("full", "full")
        d.wait("full")
        full_image = (d.root / "full" / d.source.name).read_bytes()
        d.release("full")
        assert chain_is(d.root / "full.qcow2", full_image, d.root)
        for i in range(4):
            time.sleep(0.3)
            a, b = f"a{i}", f"b{i}"
            d.snapshot(a, "incremental", "--cluster-size", "4K")
            time.sleep(0.1)
            d.snapshot(b, "incremental", "--cluster-size", "1M")
            images = {}
            for name in (a, b):
                d.wait(name)
                images[name] = (d.root / name / d.source.name).read_bytes()
            d.release(b)
            d.release(a)
            for name in (a, b):
                assert chain_is(d.root / f"{name}.qcow2", images[name], d.root), \
                    f"{name}: the chain is not what its snapshot served"
                assert qemu_img("check", d.root / f"{name}.qcow2", check=False).returncode == 0
    finally:
        for w in writers:
            w.__exit__()
    assert all(w.error is None and w.count > 20 for w in writers)


def test_snapshot_process_killed_during_an_incremental(disk):
    """kill -9 of the snapshot's own process while its incremental copies:
    it did not complete, so its changes go to the next incremental."""
    d = disk()
    full_then_changes(d)
    d.snapshot("inc", "incremental", "--speed", "1")
    pid = status(d.root / "inc")["pid"]
    os.kill(pid, 9)
    assert wait_until(lambda: not any(s["snapshot_dir"] == str(d.root / "inc")
                                      for s in status(d.live_dir)["snapshots"]), timeout=20)
    d.write(40 * CLUSTER, b"later")
    assert incremental_is_safe(d, "inc2") == "exact"
    assert backing_of(d.root / "inc2.qcow2") == "full.qcow2"


def test_fusermount_of_an_incremental_before_it_completed(disk):
    d = disk()
    full_then_changes(d)
    d.snapshot("inc", "incremental", "--speed", "1")
    subprocess.run(["fusermount3", "-u", str(d.root / "inc")], check=True)
    assert wait_until(lambda: not status(d.live_dir)["snapshots"], timeout=20)
    assert status(d.live_dir)["bytes_changed"] == CLUSTER
    assert incremental_is_safe(d, "inc2") == "exact"


def test_target_forced_over_the_base_of_its_base_is_refused(disk):
    """full <- inc1; an incremental (on inc1) with --force --target FULL
    would replace a backup its own chain reads through: refused, FULL
    intact."""
    d = disk()
    d.mount()
    full, m0 = d.backup("full", "full")
    d.write(1 * CLUSTER, random_bytes(CLUSTER, 90))
    inc1, m1 = d.backup("inc1", "incremental")
    d.write(2 * CLUSTER, random_bytes(CLUSTER, 91))
    result = d.snapshot("inc2", "incremental", "--force", target=full, check=False)
    if result.returncode == 0:
        d.wait("inc2")
        d.release("inc2")
    assert full.exists(), f"the FULL was deleted: {result}"
    assert chain_is(inc1, m1, d.root), f"inc1's chain was destroyed: {result}"
    assert result.one_line_error, result
