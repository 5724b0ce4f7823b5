"""How the commands find and talk to a running snapfs instance.

A live mount is recognised by its file system type in the mount table
(`fuse.snapfs-live`). The daemon answers through extended attributes of the
live mount's root directory: reading `user.snapfs.status` returns the status
as JSON; writing `cancel` or `umount` to `user.snapfs.command` asks for that.
No socket, no pid file: the mount point is the address.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from typing import NamedTuple

from snapfs.errors import UserError

STATUS_XATTR = "user.snapfs.status"
COMMAND_XATTR = "user.snapfs.command"
COMMANDS = ("cancel", "umount")

LIVE_FSTYPE = "fuse.snapfs-live"
SNAPSHOT_FSTYPE = "fuse.snapfs-snapshot"


def _unescape(field: str) -> str:
    """Undo the octal escapes (\\040 for a space) of /proc/self/mountinfo."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


class Mount(NamedTuple):
    point: str
    fstype: str
    device: str  # "major:minor"


def mount_table() -> list[Mount]:
    """Every mount, oldest first."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            table.append(Mount(_unescape(fields[4]), fields[sep + 1], fields[2]))
    return table


def find_mount(path: str) -> Mount | None:
    """The mount on `path` (an absolute path without symbolic links), if it is
    a mount point (the top one). Looks at nothing but the mount table, so a
    FUSE process may ask about its own mount point before serving it."""
    found = None
    for mount in mount_table():
        if mount.point == path:
            found = mount
    return found


def mount_type(path: str) -> str | None:
    """The type of the file system mounted on `path`, if `path` is a mount point."""
    mount = find_mount(os.path.realpath(path))
    return mount.fstype if mount else None


def snapfs_mount_containing(path: str) -> str | None:
    """The snapfs mount point that `path` lies in, if any."""
    path = os.path.realpath(path)
    for mount in mount_table():
        if mount.fstype in (LIVE_FSTYPE, SNAPSHOT_FSTYPE):
            if path == mount.point or path.startswith(mount.point.rstrip("/") + "/"):
                return mount.point
    return None


def live_mount(path: str) -> str:
    """The real path of the snapfs live mount `path`, or a UserError."""
    if mount_type(path) != LIVE_FSTYPE:
        raise UserError(f"{path}: not a snapfs live mount")
    return os.path.realpath(path)


class DaemonGone(UserError):
    """The mount is there but no daemon serves it any more."""


def _call(live: str, fn, *args):
    try:
        return fn(live, *args)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise DaemonGone(f"{live}: the snapfs daemon of this mount is not running") from None
        raise UserError(f"{live}: {e.strerror}") from None


def status(live: str) -> dict:
    return json.loads(_call(live, os.getxattr, STATUS_XATTR))


def send(live: str, command: str) -> None:
    _call(live, os.setxattr, COMMAND_XATTR, command.encode())


def process_running(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def lazy_unmount(path: str) -> None:
    """Detach whatever FUSE mount is left on `path` (`fusermount3 -u -z`)."""
    subprocess.run(["fusermount3", "-u", "-z", path], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
