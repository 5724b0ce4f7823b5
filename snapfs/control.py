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

from snapfs.errors import UserError
from snapfs.mounts import LIVE_FSTYPE, mount_type

STATUS_XATTR = "user.snapfs.status"
COMMAND_XATTR = "user.snapfs.command"
COMMANDS = ("cancel", "umount")


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
