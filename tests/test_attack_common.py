"""Shared helpers of the hostile tests (tests/test_attack_*.py); no tests here.

`Env` runs the real `snapfs` command with a timeout (a daemon that hangs must
not hang the test), and its cleanup leaves nothing mounted and nothing running
below the directories it was given, whatever state the test left: a clean
`snapfs umount` first, then SIGKILL of every snapfs process whose command line
names one of those directories (only processes this test started do), then
`fusermount3 -u -z` of what is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SNAPFS, alive, random_bytes, write_at, write_image  # noqa: F401 (write_at: for the attack tests)
from snapfs import mounts

MiB = 1 << 20
CLUSTER = 64 << 10


class Result:
    """A finished (or timed out: returncode None) snapfs command."""

    def __init__(self, args, returncode, stdout: str, stderr: str):
        self.args = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self):
        return (f"snapfs {' '.join(map(str, self.args))} -> {self.returncode}\n"
                f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}")

    @property
    def one_line_error(self) -> bool:
        """Exit 1 and exactly one line on stderr, `snapfs: ...`, no traceback."""
        lines = self.stderr.splitlines()
        return (self.returncode == 1 and len(lines) == 1 and lines[0].startswith("snapfs: ")
                and "Traceback" not in self.stderr and "internal error" not in self.stderr)


def snapfs(*args, timeout=60, prefix=(), cwd=None, env=None) -> Result:
    argv = [*prefix, *SNAPFS, *map(os.fsencode, map(str, args))]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired as e:
        return Result(args, None, os.fsdecode(e.stdout or b""), os.fsdecode(e.stderr or b""))
    return Result(args, done.returncode, done.stdout.decode(errors="surrogateescape"),
                  done.stderr.decode(errors="surrogateescape"))


def status(path) -> dict:
    result = snapfs("status", path, "--json")
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def snapfs_mounts_under(root) -> list[str]:
    root = os.path.realpath(root)
    return [m.point for m in mounts.mount_table()
            if m.fstype.startswith("fuse") and mounts.inside(m.point, root)]


def snapfs_processes_naming(root) -> list[int]:
    """snapfs processes whose command line names something below `root`."""
    needle = os.fsencode(os.path.realpath(root))
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"snapfs" in cmdline and needle in cmdline:
            found.append(int(pid))
    return found


class Env:
    """The directories a test works in; see the module's docstring."""

    def __init__(self, *roots: Path):
        self.roots = [Path(r) for r in roots]
        self.tmpfs: list[Path] = []

    @property
    def root(self) -> Path:
        return self.roots[0]

    def dirs(self, *names) -> list[Path]:
        made = []
        for name in names:
            path = self.root / name
            path.mkdir(parents=True, exist_ok=True)
            made.append(path)
        return made

    def image(self, name="disk.img", size=4 * MiB, seed=1, where=None) -> Path:
        return write_image((where or self.root) / name, random_bytes(size, seed))

    def small_tmpfs(self, name="full", size="2m") -> Path:
        point = self.root / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                       check=True)
        self.tmpfs.append(point)
        return point

    def cleanup(self) -> None:
        for root in self.roots:
            root = os.path.realpath(root)
            for m in reversed(mounts.mount_table()):
                if m.fstype == mounts.LIVE_FSTYPE and mounts.inside(m.point, root):
                    snapfs("umount", m.point, timeout=20)
        self.kill_all()
        for point in reversed(self.tmpfs):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)

    def kill_all(self) -> None:
        """SIGKILL every snapfs process naming our directories (a hung
        daemon), then detach what they leave mounted."""
        for root in self.roots:
            pids = snapfs_processes_naming(root)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while any(alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for point in reversed(snapfs_mounts_under(root)):
                subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)


@pytest.fixture
def env(tmp_path):
    made = Env(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def files_below(root) -> set[str]:
    """Every path below `root`, relative, not entering mounts."""
    found = set()
    root = str(root)
    points = {m.point for m in mounts.mount_table()}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if os.path.join(directory, d) not in points]
        for name in subdirs + files:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found
