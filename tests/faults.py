"""Fault injection for tests.

- `faulty_dir(tmp_path)`: a directory on faultfs (tests/faultfs.py), a FUSE
  pass-through to a plain directory that fails or delays operations on
  command: a disk that returns EIO, fills up, or hangs.
- `FailingImage`: a wrapper around an `Image` (snapfs/image/base.py) whose
  chosen method fails on its k-th call, for unit tests without any mount.

    with faulty_dir(tmp_path) as fs:
        (fs.path / "target.img").write_bytes(...)
        fs.fail("write", errno.ENOSPC, name="target.img", after=2)
        fs.delay("fsync", 0.5)
        fs.hang("read", name="disk.img")      # until clear()
        fs.clear()
        fs.stats()["write"]["failed"]
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultfs  # noqa: E402  (tests/faultfs.py: OPS, control_address)

from snapfs.image.base import Image  # noqa: E402

FAULTFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultfs.py")
START_TIMEOUT = 10.0


def _errno(value: int | str) -> int:
    return getattr(errnos, value) if isinstance(value, str) else int(value)


class FaultyDir:
    """A running faultfs: `path` is the mount point, `backing` the plain
    directory behind it (read it to see what really reached the disk)."""

    def __init__(self, path: Path, backing: Path, process: subprocess.Popen):
        self.path = path
        self.backing = backing
        self.process = process
        self._address = faultfs.control_address(path)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def command(self, **request) -> dict:
        """Send one command; returns once faultfs applied it."""
        with self._lock:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(10)
                self._sock.connect(self._address)
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("faultfs closed its control socket")
                reply += data
        answer = json.loads(reply)
        if not answer.get("ok"):
            raise ValueError(f"faultfs refused {request}: {answer.get('error')}")
        return answer

    def fail(self, op: str | Iterable[str], errno: int | str = errnos.EIO, *,
             name: str | None = None, after: int = 0, count: int | None = None,
             offset: int | None = None) -> None:
        """From now on fail `op` (a name of faultfs.OPS, a list of them, or
        "*") with `errno` (a number or "EIO", "ENOSPC", ...): on files whose
        name matches the glob `name` (a path relative to the root if it holds
        a "/"), after letting the next `after` matching calls through, at most
        `count` times, and (read, write) only for calls that reach `offset`
        or beyond. A failed call does nothing on the backing file."""
        self.command(cmd="fail", op=_ops(op), errno=_errno(errno), name=name, after=after,
                     count=count, offset=offset)

    def delay(self, op: str | Iterable[str], seconds: float | None, *,
              name: str | None = None, after: int = 0, count: int | None = None,
              offset: int | None = None) -> None:
        """From now on delay matching calls by `seconds` (None: until `clear`),
        each in its own task: other requests go on meanwhile."""
        self.command(cmd="delay", op=_ops(op), seconds=seconds, name=name, after=after,
                     count=count, offset=offset)

    def hang(self, op: str | Iterable[str], **filters) -> None:
        """Matching calls wait until `clear` (a hung disk)."""
        self.delay(op, None, **filters)

    def clear(self) -> None:
        """Drop every rule; calls being delayed go on at once."""
        self.command(cmd="clear")

    def stats(self) -> dict:
        """Per op: {"calls", "failed", "delayed"} since start."""
        return self.command(cmd="stats")["stats"]

    def rules(self) -> list[dict]:
        """The rules in force, each with its `hits` so far."""
        return self.command(cmd="stats")["rules"]

    def close_control(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _ops(op: str | Iterable[str]) -> str | list[str]:
    return op if isinstance(op, str) else list(op)


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == target:
                return True
    return False


def _wait_ready(process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(f"faultfs not ready within {timeout} s")
            data = os.read(process.stdout.fileno(), 256)
            if not data:
                break
            line += data
    if line.strip() != b"ready":
        process.wait(5)
        raise RuntimeError(f"exit status {process.returncode}")


@contextlib.contextmanager
def faulty_dir(tmp_path, name: str = "faulty") -> Iterator[FaultyDir]:
    """A faultfs on tmp_path/name over tmp_path/(name + "-backing"), both made
    here. Always unmounted and stopped on the way out, whatever happened:
    rules cleared (hung calls released), `fusermount3 -u -z`, then SIGTERM,
    then SIGKILL."""
    point = Path(tmp_path) / name
    backing = Path(tmp_path) / f"{name}-backing"
    point.mkdir()
    backing.mkdir()
    stderr = open(Path(tmp_path) / f"{name}.log", "wb")
    process = subprocess.Popen([sys.executable, FAULTFS, str(backing), str(point)],
                               stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
    fs = FaultyDir(point, backing, process)
    try:
        try:
            _wait_ready(process, START_TIMEOUT)
        except (RuntimeError, TimeoutError) as e:
            stderr.flush()
            raise RuntimeError(f"faultfs failed to start ({e}): "
                               f"{(Path(tmp_path) / f'{name}.log').read_text()}") from None
        yield fs
    finally:
        try:
            if process.poll() is None:
                fs.clear()
        except (OSError, ValueError):
            pass
        fs.close_control()
        subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True)
        _stop(process)
        if _is_mounted(point):  # the process is gone, its mount must go too
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        process.stdout.close()
        stderr.close()


def _stop(process: subprocess.Popen) -> None:
    """After the lazy unmount faultfs ends by itself, unless something still
    holds a file on it: then it is stopped (the holders get ENOTCONN)."""
    for step, wait in ((lambda: None, 1), (process.terminate, 5), (process.kill, 5)):
        step()
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- unit level -------------------------------------------------------------

class FailingImage(Image):
    """An `Image` that passes everything to `inner` except that the `nth`
    call (1 = the first) of `method` (read, readinto, write, write_zeroes,
    data_extents, zero_extents, flush, stat) and, if `count` > 1, the
    following calls up to `count` of them (None: every call from the nth on)
    raise OSError(`errno`) without reaching `inner`. Thread-safe, like the
    images it wraps. `calls[method]` counts the calls, `failures` the ones
    failed."""

    METHODS = ("read", "readinto", "write", "write_zeroes", "data_extents", "zero_extents",
               "flush", "stat")

    def __init__(self, inner: Image, method: str, *, nth: int = 1,
                 errno: int | str = errnos.EIO, count: int | None = 1):
        if method not in self.METHODS:
            raise ValueError(f"{method}: not one of {self.METHODS}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        self.inner = inner
        self.method = method
        self.nth = nth
        self.errno = _errno(errno)
        self.count = count
        self.calls = dict.fromkeys(self.METHODS, 0)
        self.failures = 0
        self._lock = threading.Lock()
        self.size = inner.size
        self.path = inner.path
        self.fd = inner.fd

    def __getattr__(self, name):  # whatever else a driver offers
        return getattr(self.__dict__["inner"], name)

    def _call(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1
            number = self.calls[method]
            if method != self.method or number < self.nth:
                return
            if self.count is not None and number >= self.nth + self.count:
                return
            self.failures += 1
        raise OSError(self.errno, f"{os.strerror(self.errno)} (FailingImage: {method} "
                                  f"call {number})")

    def read(self, offset, length):
        self._call("read")
        return self.inner.read(offset, length)

    def readinto(self, offset, buffer):
        self._call("readinto")
        return self.inner.readinto(offset, buffer)

    def write(self, offset, data):
        self._call("write")
        return self.inner.write(offset, data)

    def write_zeroes(self, offset, length):
        self._call("write_zeroes")
        return self.inner.write_zeroes(offset, length)

    def data_extents(self, offset, length):
        self._call("data_extents")
        return self.inner.data_extents(offset, length)

    def zero_extents(self, offset, length):
        self._call("zero_extents")
        return self.inner.zero_extents(offset, length)

    def stat(self):
        self._call("stat")
        return self.inner.stat()

    def flush(self):
        self._call("flush")
        return self.inner.flush()

    def close(self):
        return self.inner.close()
