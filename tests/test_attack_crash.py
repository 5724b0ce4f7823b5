"""Hostile tests: crashes, concurrent writers and full targets, each snapshot
checked against an oracle copy of the live disk made while no write was in
flight, just before the snapshot was taken."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading

import pytest

from conftest import alive, assert_nothing_left_beside, is_mounted, need, random_bytes, wait_until
from test_attack_common import MiB, env, files_below, snapfs, status, write_at  # noqa: F401

SIZE = 8 * MiB


def random_writes(path, seed: int, count: int, max_len=200_000) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            off = rng.randrange(SIZE)
            data = rng.randbytes(min(rng.randrange(1, max_len), SIZE - off))
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


class Writer(threading.Thread):
    """Writes at random until stopped or until the disk goes away."""

    def __init__(self, path, seed):
        super().__init__(daemon=True)
        self.path, self.seed = path, seed
        self.stop = threading.Event()
        self.writes = 0

    def run(self):
        rng = random.Random(self.seed)
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError:
            return
        try:
            while not self.stop.is_set():
                off = rng.randrange(SIZE)
                try:
                    os.pwrite(fd, rng.randbytes(min(rng.randrange(1, 300_000), SIZE - off)), off)
                except OSError:
                    return  # the daemon died: ENOTCONN
                self.writes += 1
        finally:
            try:
                os.close(fd)
            except OSError:  # the daemon died: closing reports ENOTCONN too
                pass


SNAPSHOTS = [("s-full-4k-raw", ["--sync", "full", "--cluster-size", "4K", "--speed", "2M"]),
             ("s-top-1m-qcow2", ["--sync", "top", "--cluster-size", "1M",
                                 "--target-format", "qcow2", "--speed", "1M"]),
             ("s-none-64k", ["--sync", "none"]),
             ("s-full-2m", ["--sync", "full", "--cluster-size", "2M", "--speed", "1M"])]


def test_kill_9_mid_write_then_every_snapshot_comes_back_exact(env):
    """Guard: four snapshots of mixed modes, cluster sizes and formats, a
    writer running when the live daemon is killed; `umount` cleans up, a new
    `mount` brings all four back, each identical to its oracle, still after
    more writes; the full raw target is the oracle at the end and nothing is
    left behind."""
    source = env.image("disk.img", SIZE, seed=31)
    (live,) = env.dirs("live")
    assert snapfs("mount", source, live).returncode == 0
    disk = live / "disk.img"
    oracles = {}
    for i, (name, options) in enumerate(SNAPSHOTS):
        random_writes(disk, seed=100 + i, count=20)
        oracles[name] = disk.read_bytes()
        point, = env.dirs(name)
        result = snapfs("snapshot", live, point, "--target", env.root / f"{name}.img", *options)
        assert result.returncode == 0, result
    writer = Writer(disk, seed=7)
    writer.start()
    assert wait_until(lambda: writer.writes > 20)
    pid = status(live)["pid"]
    os.kill(pid, signal.SIGKILL)
    writer.join(30)
    assert not writer.is_alive()
    assert wait_until(lambda: not alive(pid))
    gone = snapfs("umount", live)
    assert gone.returncode == 1 and "died" in gone.stderr, gone
    for name in oracles:
        assert not is_mounted(env.root / name)

    again = snapfs("mount", source, live)
    assert again.returncode == 0 and again.stderr == "", again
    for name, oracle in oracles.items():
        assert (env.root / name / "disk.img").read_bytes() == oracle, name
    random_writes(disk, seed=999, count=40)
    for name, oracle in oracles.items():
        assert (env.root / name / "disk.img").read_bytes() == oracle, name
    for name, oracle in oracles.items():
        if "none" not in name:
            waited = snapfs("wait", env.root / name)
            assert waited.returncode == 0, (name, waited)
        assert snapfs("release", env.root / name).returncode == 0
    assert (env.root / "s-full-4k-raw.img").read_bytes() == oracles["s-full-4k-raw"]
    assert (env.root / "s-full-2m.img").read_bytes() == oracles["s-full-2m"]
    qemu_img = need("qemu-img")
    converted = env.root / "top.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(env.root / "s-top-1m-qcow2.img"),
                    str(converted)], check=True)
    assert converted.read_bytes() == oracles["s-top-1m-qcow2"]
    assert snapfs("umount", live).returncode == 0
    assert_nothing_left_beside(source, tracking=True)  # the completed FULLs


def test_full_target_among_several_snapshots(env):
    """Guard: one snapshot's target on a 2 MiB tmpfs (an 8 MiB disk), two
    others on a roomy file system. The full one's job fails with ENOSPC;
    writes to clusters it lacks fail with ENOSPC and leave SOURCE untouched;
    every snapshot keeps showing its point in time; release and umount stay
    clean."""
    full = env.small_tmpfs("full", "2m")
    original = random_bytes(SIZE, seed=32)
    source = env.root / "disk.img"
    source.write_bytes(original)
    live, a, b, c = env.dirs("live", "a", "b", "c")
    assert snapfs("mount", source, live).returncode == 0
    disk = live / "disk.img"
    assert snapfs("snapshot", live, a, "--target", env.root / "a.img", "--sync", "none",
                  "--cluster-size", "4K").returncode == 0
    assert snapfs("snapshot", live, b, "--target", full / "b.img").returncode == 0
    assert snapfs("snapshot", live, c, "--target", env.root / "c.img",
                  "--cluster-size", "1M", "--speed", "1M").returncode == 0
    assert wait_until(lambda: status(b)["state"] != "running", timeout=30)
    info = status(b)
    assert info["state"] == "failed" and "space" in (info["error"] or ""), info
    failures = 0
    rng = random.Random(5)
    fd = os.open(disk, os.O_WRONLY)
    try:
        for _ in range(50):
            off = rng.randrange(SIZE - 70_000)
            data = rng.randbytes(70_000)
            before = source.read_bytes()[off:off + len(data)]
            try:
                os.pwrite(fd, data, off)
            except OSError as e:
                assert e.errno == 28, e
                failures += 1
                assert source.read_bytes()[off:off + len(data)] == before, \
                    "a failed write reached SOURCE"
    finally:
        os.close(fd)
    assert failures > 0
    for point in (a, b, c):
        assert (point / "disk.img").read_bytes() == original, point
    for point in (a, b, c):
        assert snapfs("release", point).returncode == 0
    assert snapfs("umount", live).returncode == 0
    assert not is_mounted(live)


def test_wait_and_cancel_racing_with_release(env):
    """Guard: `wait` running while the snapshot is released ends with exit 1
    and one line; `cancel`/`status` of a released snapshot fail in one line;
    no traceback anywhere."""
    source = env.image("disk.img", SIZE, seed=33)
    live, snap = env.dirs("live", "snap")
    assert snapfs("mount", source, live, snap, "--target", env.root / "t.img",
                  "--speed", "256K").returncode == 0
    from conftest import SNAPFS
    waiter = subprocess.Popen([*SNAPFS, "wait", str(snap)], stderr=subprocess.PIPE, text=True)
    try:
        assert snapfs("status", snap).returncode == 0
        assert snapfs("release", snap).returncode == 0
        _, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 1 and len(err.splitlines()) == 1, err
        assert err.startswith("snapfs: ") and "Traceback" not in err
    finally:
        if waiter.poll() is None:
            waiter.kill()
    for command in ("cancel", "status", "wait", "release"):
        result = snapfs(command, snap)
        assert result.one_line_error, result
    assert snapfs("umount", live).returncode == 0
