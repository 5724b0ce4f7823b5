"""The mount table and unmounting, as the kernel sees them.

Reads nothing but /proc/self/mountinfo, so a FUSE process may ask about its
own mount point before serving it (a stat there would deadlock it).
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import NamedTuple

LIVE_FSTYPE = "fuse.snapfs-live"
SNAPSHOT_FSTYPE = "fuse.snapfs-snapshot"
SNAPFS_FSTYPES = (LIVE_FSTYPE, SNAPSHOT_FSTYPE)

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    """A path field of mountinfo: octal escapes (\\040 for a space) undone,
    bytes that are not UTF-8 kept as surrogates (as os.fsdecode does)."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


class Mount(NamedTuple):
    point: str
    fstype: str
    device: str  # "major:minor"
    source: str  # the file system's name (FUSE's fsname option)
    id: int = 0  # the mount's id, as /proc/PID/fdinfo shows it (mnt_id)


def mount_table() -> list[Mount]:
    """Every mount, oldest first."""
    table = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            table.append(Mount(_unescape(fields[4]), fields[sep + 1].decode(),
                               fields[2].decode(), _unescape(fields[sep + 2]), int(fields[0])))
    return table


def find_mount(path: str) -> Mount | None:
    """The mount on `path` (an absolute path without symbolic links), if it is
    a mount point (the top one)."""
    found = None
    for mount in mount_table():
        if mount.point == path:
            found = mount
    return found


def mount_type(path: str) -> str | None:
    """The type of the file system mounted on `path`, if `path` is a mount point."""
    mount = find_mount(os.path.realpath(path))
    return mount.fstype if mount else None


def inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies below it (both absolute, real)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def snapfs_mount_containing(path: str) -> str | None:
    """The snapfs mount point that `path` lies in, if any."""
    path = os.path.realpath(path)
    for mount in mount_table():
        if mount.fstype in SNAPFS_FSTYPES and inside(path, mount.point):
            return mount.point
    return None


def loop_backing_files(path: str, depth: int = 8) -> list[str]:
    """The files under the file system that holds `path`, if it lives on a
    loop device (and so on, if that file's file system does too)."""
    found = []
    try:
        device = os.stat(path).st_dev
    except OSError:
        return found
    while depth > 0:
        base = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
        if os.path.exists(base + "/partition"):
            base += "/.."
        try:
            with open(base + "/loop/backing_file", "rb") as f:
                backing = os.fsdecode(f.read().rstrip(b"\n"))
        except OSError:
            return found
        found.append(backing)
        try:
            device = os.stat(os.path.dirname(backing) or "/").st_dev
        except OSError:
            return found
        depth -= 1
    return found


def snapfs_mount_beneath(path: str) -> str | None:
    """The snapfs mount that `path` lies in, directly or because its file
    system lives (through loop devices) on a file in it."""
    for candidate in [path, *loop_backing_files(path)]:
        point = snapfs_mount_containing(candidate)
        if point:
            return point
    return None


def _uses(pid: str, mount: Mount) -> bool:
    """Whether process `pid` uses a file on `mount`: an open file (its
    mnt_id), a mapping (its device), its working or root directory. Asks the
    file system nothing (a stat there could hang on a FUSE mount)."""
    base = f"/proc/{pid}"
    for name in ("cwd", "root"):
        try:
            if inside(os.readlink(f"{base}/{name}"), mount.point):
                return True
        except OSError:
            pass
    try:
        fds = os.listdir(f"{base}/fdinfo")
    except OSError:
        fds = []
    wanted = b"mnt_id:\t%d\n" % mount.id
    for fd in fds:
        try:
            with open(f"{base}/fdinfo/{fd}", "rb") as f:
                if wanted in f.read():
                    return True
        except OSError:
            pass
    major, minor = (int(n) for n in mount.device.split(":"))
    device = b"%02x:%02x" % (major, minor)
    try:
        with open(f"{base}/maps", "rb") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) >= 4 and fields[3] == device:
                    return True
    except OSError:
        pass
    return False


def _process_name(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return os.fsdecode(f.read().strip())
    except OSError:
        return "?"


def holders(point: str, ignore: frozenset[int] = frozenset()) -> list[str]:
    """What keeps the mount on `point` busy, for a message: processes using
    a file on it (but those in `ignore`), loop devices over a file on it (and
    where they are mounted), mounts below it. Empty if nothing was found."""
    found = []
    table = mount_table()
    mount = find_mount(point)
    for other in table:
        if other.point != point and inside(other.point, point):
            found.append(f"a mount on {other.point}")
    try:
        loops = sorted(os.listdir("/sys/block"))
    except OSError:
        loops = []
    for name in loops:
        try:
            with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
                backing = os.fsdecode(f.read().rstrip(b"\n"))
        except OSError:
            continue
        if inside(backing, point):
            mounted = [m.point for m in table if m.source == f"/dev/{name}"]
            found.append(f"loop device /dev/{name}"
                         + (f" (mounted on {', '.join(mounted)})" if mounted else ""))
    if mount is not None:
        me = os.getpid()
        for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
            if int(pid) != me and int(pid) not in ignore and _uses(pid, mount):
                found.append(f"process {pid} ({_process_name(pid)})")
    return found


def unmount(point: str) -> str | None:
    """Unmount the FUSE mount on `point` unless it is busy (`fusermount3 -u`);
    None if done, else why not."""
    result = subprocess.run(["fusermount3", "-u", point], capture_output=True)
    if result.returncode == 0:
        return None
    why = os.fsdecode(result.stderr).strip().splitlines()
    return why[-1].split(": ")[-1] if why else f"fusermount3 exited with {result.returncode}"


def lazy_unmount(path: str) -> None:
    """Detach whatever FUSE mount is left on `path` (`fusermount3 -u -z`)."""
    subprocess.run(["fusermount3", "-u", "-z", path], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
