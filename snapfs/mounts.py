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


def mount_table() -> list[Mount]:
    """Every mount, oldest first."""
    table = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            table.append(Mount(_unescape(fields[4]), fields[sep + 1].decode(),
                               fields[2].decode(), _unescape(fields[sep + 2])))
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


def lazy_unmount(path: str) -> None:
    """Detach whatever FUSE mount is left on `path` (`fusermount3 -u -z`)."""
    subprocess.run(["fusermount3", "-u", "-z", path], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
