"""The machine underneath the benchmark: the commands it runs, the processes it
started, the mounts under its work directory, the page cache, files.

Shared by both systems and the workloads; nothing here knows snapfs or QEMU.
Every failure a measure can meet surfaces as MeasureError, which the run loop
(benchlib.harness) records before it goes on with the next measure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

from snapfs.mounts import find_mount, inside, mount_table

from benchlib.config import KiB, MiB

_T0 = time.monotonic()


class MeasureError(Exception):
    """A measure could not be taken (the other measures go on)."""


def log(message: str) -> None:
    """Progress on stderr, with the seconds since the bench started."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- commands -----------------------------------------------------------------

def run(cmd: list[str], *, timeout: float = 3600, check: bool = True,
        **kwargs) -> subprocess.CompletedProcess:
    """Run a command to its end; a timeout or (with check) a failure is a
    MeasureError carrying the last line it printed."""
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{' '.join(cmd[:3])}...: no answer after {timeout:.0f} s") from None
    if check and result.returncode != 0:
        why = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
        raise MeasureError(f"{' '.join(cmd[:4])}... exited with {result.returncode}: {why[0]}")
    return result


def timed(cmd: list[str], **kwargs) -> float:
    """Seconds `run(cmd)` took."""
    start = time.perf_counter()
    run(cmd, **kwargs)
    return time.perf_counter() - start


def wait_for(predicate, timeout: float, what: str, poll: float = 0.002):
    """The first true value of `predicate()`, polled; MeasureError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise MeasureError(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)


# --- processes we started -------------------------------------------------------

def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def sleeps_uninterruptibly(pid: int) -> bool:
    """Whether a thread of `pid` is in state D. Reading such a process's
    /proc/PID/cmdline can block for as long (its memory map may be locked),
    as `ps` does when a FUSE server hangs under a loop device."""
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "D":
                    return True
    except (OSError, IndexError):
        pass
    return False


def stop_pids(pids: list[int], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, to processes we started."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        left = [p for p in pids if alive(p)]
        if not left:
            return
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in left):
            time.sleep(0.05)
    for p in pids:  # reap our own children, if they are
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p, os.WNOHANG)


def vm_hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise MeasureError(f"no VmHWM for pid {pid}")


def pss(pid: int) -> int:
    """Proportional set size of a process now, in bytes: its private pages
    plus its share of the pages it shares (with forked processes, say)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * KiB
    raise MeasureError(f"no Pss for pid {pid}")


# --- mounts ---------------------------------------------------------------------

def is_mounted(path: str) -> bool:
    """Whether something is mounted on `path`."""
    return find_mount(os.path.realpath(path)) is not None


def mounts_under(directory: str) -> list[str]:
    """The mount points below `directory` (not on it), newest first: the order
    to unmount them in."""
    directory = os.path.realpath(directory)
    return [m.point for m in reversed(mount_table())
            if m.point != directory and inside(m.point, directory)]


# --- page cache -----------------------------------------------------------------

def sync_filesystem(path: str | None) -> None:
    """syncfs(2) of the file system that holds `path`; sync(2) of every file
    system if None."""
    if path is None:
        os.sync()
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), path)
    finally:
        os.close(fd)


class PageCache:
    """Cold measures start from an empty page cache; warm inputs are loaded."""

    #: False once dropping failed: the report then says cold figures are warm
    dropped_ok = True
    #: the file system written out before a drop: the work directory's (the
    #: harness sets it), not every one, so that a file system that hangs
    #: elsewhere on a shared machine (a FUSE server stuck under a loop device)
    #: does not hang the bench in sync(2)
    filesystem: str | None = None

    @classmethod
    def drop(cls) -> None:
        """`sync -f WORKDIR; echo 3 > /proc/sys/vm/drop_caches`."""
        sync_filesystem(cls.filesystem)
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            if cls.dropped_ok:
                log(f"WARNING: cannot drop the page cache ({e.strerror}): cold figures are warm")
            cls.dropped_ok = False

    @staticmethod
    def load(path: str) -> None:
        """Read a file so that it sits in the page cache."""
        with open(path, "rb", buffering=0) as f:
            while f.read(4 * MiB):
                pass


# --- files ----------------------------------------------------------------------

def remove(*paths: str) -> None:
    """Unlink the files that exist."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


@contextlib.contextmanager
def loop_xfs(image: str, point: str, size: int):
    """A fresh XFS with reflink=1 (extents shared between files) made on a
    sparse file `image` of `size` bytes and loop-mounted on `point`;
    unmounted and removed afterwards, whatever happened."""
    if shutil.which("mkfs.xfs") is None:
        raise MeasureError("mkfs.xfs missing (xfsprogs: scripts/bench installs it)")
    remove(image)
    with open(image, "wb") as f:
        f.truncate(size)
    try:
        run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", image])
        os.makedirs(point, exist_ok=True)
        run(["mount", "-o", "loop", image, point])
        try:
            yield point
        finally:
            if run(["umount", point], check=False).returncode != 0:
                run(["umount", "-l", point], check=False)
    finally:
        remove(image)
        with contextlib.suppress(OSError):
            os.rmdir(point)


def used_bytes(path: str) -> int:
    """The bytes in use on the file system that holds `path` (df)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
