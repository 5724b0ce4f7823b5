"""Shared test helpers: run the real `snapfs` command, and make sure every
mount a test makes is gone afterwards, whether the test passed or not."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapfs import mounts
from snapfs.cli import client

SNAPFS = [sys.executable, "-m", "snapfs"]


def run_snapfs(*args, check=True, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAPFS, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"snapfs {' '.join(map(str, args))} failed ({result.returncode}): "
                             f"{result.stderr}")
    return result


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_image(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def read_at(path, offset: int, length: int) -> bytes:
    """One pread of `length` bytes at `offset`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_at(path, offset: int, data: bytes) -> None:
    """One pwrite of all of `data` at `offset`, as a program writing the disk would."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def fill(directory) -> None:
    """Fill the file system of `directory` up with a file named filler."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def tmpfs(point: Path, size: str):
    """A tmpfs of `size` on `point` (made), for targets that run out of space;
    unmounted afterwards whatever happened."""
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                   check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def assert_nothing_left_beside(source, tracking: bool = False) -> None:
    """After a clean stop: nothing stays beside SOURCE, but (with
    `tracking`, after a completed backup) the change tracking."""
    state = os.fsencode(source) + b".snapfs-live"
    left = sorted(os.listdir(state)) if os.path.exists(state) else []
    assert left == ([b"changes"] if tracking else []), f"left behind: {left}"


def is_mounted(path) -> bool:
    return mounts.mount_type(str(path)) is not None


def force_unmount(path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def wait_until(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            if not alive(pid):
                return
            time.sleep(0.1)


alive = client.process_running


@dataclass
class Instance:
    """One `snapfs mount` made by a test."""

    source: Path
    live_dir: Path
    snapshot_dir: Path
    target: Path
    pids: list[int] = field(default_factory=list)

    @property
    def live(self) -> Path:
        return self.live_dir / self.source.name

    @property
    def snapshot(self) -> Path:
        return self.snapshot_dir / self.source.name

    def status(self) -> dict:
        """The snapshot's status (`snapfs status SNAPSHOT --json`)."""
        return json.loads(run_snapfs("status", self.snapshot_dir, "--json").stdout)

    def live_status(self) -> dict:
        """The live disk's status, its snapshots included."""
        return json.loads(run_snapfs("status", self.live_dir, "--json").stdout)

    def wait(self, **kwargs):
        return run_snapfs("wait", self.live_dir, **kwargs)

    def umount(self):
        run_snapfs("umount", self.live_dir)
        assert not is_mounted(self.live_dir) and not is_mounted(self.snapshot_dir)
        for pid in self.pids:
            assert not alive(pid), f"process {pid} still running after umount"

    def cleanup(self) -> None:
        """Whatever state the test left: nothing mounted, nothing running."""
        if is_mounted(self.live_dir):
            subprocess.run([*SNAPFS, "umount", str(self.live_dir)], capture_output=True,
                           timeout=120)
        for path in (self.live_dir, self.snapshot_dir):
            if is_mounted(path):
                force_unmount(path)
        for pid in self.pids:
            _kill(pid)


@pytest.fixture
def mount(tmp_path):
    """mount(source, sync=..., cluster_size=..., speed=..., extra=[...]) runs
    `snapfs mount` and returns an Instance; all are cleaned up at the end."""
    made: list[Instance] = []

    def do_mount(source: Path, sync="full", cluster_size=None, speed=None, extra=(),
                 target=None, name="m", root=None) -> Instance:
        base = (root or tmp_path) / name
        base.mkdir()
        inst = Instance(source, base / "live", base / "snap", target or base / "target.img")
        inst.live_dir.mkdir()
        inst.snapshot_dir.mkdir()
        made.append(inst)
        args = ["mount", source, inst.live_dir, inst.snapshot_dir, "--target", inst.target,
                "--sync", sync, *extra]
        if cluster_size:
            args += ["--cluster-size", cluster_size]
        if speed:
            args += ["--speed", speed]
        run_snapfs(*args)
        info = inst.live_status()
        inst.pids = [info["pid"], *(snap["pid"] for snap in info["snapshots"])]
        return inst

    yield do_mount
    for inst in made:
        inst.cleanup()
    for inst in made:
        assert not is_mounted(inst.live_dir), "a mount was left behind"
        assert not is_mounted(inst.snapshot_dir), "a mount was left behind"


@pytest.fixture
def public_tmp(tmp_path):
    """A directory that every user may enter (pytest's tmp_path lies in a
    root-only directory), removed afterwards; for tests that act as another
    user."""
    path = Path(tempfile.mkdtemp(prefix="snapfs-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    left = [m.point for m in mounts.mount_table() if mounts.inside(m.point, str(path))]
    for mp in reversed(left):
        force_unmount(mp)
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"mounts left behind: {left}"


#: runs a command as user nobody (65534), without supplementary groups
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def pwrite_errno(path, data: bytes, offset: int) -> int | None:
    """The errno a guest's pwrite to `path` fails with, or None."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
    return None


@pytest.fixture
def faulty(tmp_path):
    """A faultfs directory (tests/faults.py). Ask for it before `mount`, so
    that it is torn down after: the snapfs instance is gone before its disk."""
    from faults import faulty_dir
    with faulty_dir(tmp_path) as fs:
        yield fs


@pytest.fixture(autouse=True)
def no_leftover_mounts(tmp_path):
    """Fail a test that leaves a FUSE mount under its directory, and clean up."""
    yield
    left = [m.point for m in mounts.mount_table()
            if m.fstype.startswith("fuse") and mounts.inside(m.point, str(tmp_path))]
    for mp in reversed(left):
        force_unmount(mp)
    assert not left, f"mounts left behind: {left}"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (scripts/test installs it)")
    return path
