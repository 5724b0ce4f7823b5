"""How the commands find a running instance and talk to it (the protocol is
in snapfs.protocol): from any path of its mounts to its live process."""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

from snapfs import mounts, protocol
from snapfs.errors import UserError


class DaemonGone(UserError):
    """The mount is there but no daemon serves it any more."""


class Located(NamedTuple):
    instance: str
    point: str  # the mount point, real path
    kind: str  # "live" or "snapshot"


def locate(path: str) -> Located:
    """The snapfs mount on `path`, or a UserError."""
    real = os.path.realpath(path)
    mount = mounts.find_mount(real)
    if mount is None or mount.fstype not in mounts.SNAPFS_FSTYPES:
        raise UserError(f"{path}: not a snapfs mount")
    instance = protocol.instance_of(mount.source)
    if instance is None:
        raise UserError(f"{path}: a snapfs mount of an older version; unmount it with "
                        f"fusermount3 -u {real}")
    kind = "live" if mount.fstype == mounts.LIVE_FSTYPE else "snapshot"
    return Located(instance, real, kind)


def locate_live(path: str) -> Located:
    found = locate(path) if mounts.mount_type(path) else None
    if found is None or found.kind != "live":
        raise UserError(f"{path}: not a snapfs live mount")
    return found


#: how long a daemon may take to answer a question (status); commands that
#: change something (snapshot, release, umount) wait as long as they take
STATUS_TIMEOUT = 30


class NoAnswer(UserError):
    """The daemon took too long to answer."""


def request(instance: str, command: str, timeout: float | None = None, **arguments):
    """Send one request to the live process of `instance`; its reply, or a
    UserError with the daemon's one line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(protocol.address(instance))
        except (ConnectionRefusedError, FileNotFoundError):
            raise DaemonGone("the snapfs daemon of this mount is not running") from None
        if not protocol.trusted(protocol.peer_uid(sock)):
            # Only the daemon's own address: the daemon cannot be running,
            # since someone else holds it.
            raise DaemonGone("the snapfs daemon of this mount is not running (another "
                             "user's process holds its address; not talking to it)")
        try:
            sock.sendall(protocol.encode({"command": command, **arguments}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have answered already: read on
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise NoAnswer(f"the snapfs daemon did not answer within {timeout:g} s") from None
            if not chunk:
                raise DaemonGone("the snapfs daemon stopped before it answered")
            data += chunk
    try:
        return protocol.result_of(protocol.decode(data))
    except protocol.Refused as e:
        raise UserError(str(e)) from None


def status(instance: str, timeout: float = STATUS_TIMEOUT) -> dict:
    return request(instance, "status", timeout=timeout)


def snapshot_status(path: str) -> tuple[Located, dict]:
    """The status of one snapshot, named by its mount point, or by the live
    mount when that has exactly one snapshot."""
    where = locate(path)
    info = status(where.instance)
    snapshots = info["snapshots"]
    if where.kind == "snapshot":
        for snap in snapshots:
            if snap["snapshot_dir"] == where.point:
                return where, snap
        raise UserError(f"{path}: not a snapshot of {info['live_dir']} any more")
    if len(snapshots) != 1:
        raise UserError(f"{path} has {len(snapshots) or 'no'} snapshots; name one by its "
                        "mount point")
    return where, snapshots[0]


def find_snapshot_anywhere(path: str) -> tuple[str, dict] | None:
    """A snapshot without a mount (one that could not be brought back after a
    crash): ask every live disk's daemon. (instance, its status) or None."""
    real = os.path.realpath(path)
    for mount in mounts.mount_table():
        if mount.fstype != mounts.LIVE_FSTYPE:
            continue
        instance = protocol.instance_of(mount.source)
        if instance is None:
            continue
        try:
            info = status(instance, timeout=5)
        except UserError:
            continue
        for snap in info["snapshots"]:
            if snap["snapshot_dir"] == real:
                return instance, snap
    return None


def unmount_leftovers(instance: str) -> list[str]:
    """After the daemon died: detach every mount it left; returns them."""
    left = [m.point for m in mounts.mount_table()
            if m.fstype in mounts.SNAPFS_FSTYPES and protocol.instance_of(m.source) == instance]
    for point in reversed(left):
        mounts.lazy_unmount(point)
    return left


def process_running(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
