"""The checks of `mount` and `snapshot`: every refusal is one line, made
before anything is created or mounted. Paths come back absolute, with the
directories' symbolic links resolved, so that the daemon never depends on
the command's working directory."""

from __future__ import annotations

import os
import platform
import stat
import sys

from snapfs import filelock, mounts
from snapfs.errors import UserError
from snapfs.image import open_image
from snapfs.protocol import SnapshotRequest, copymap_path, state_dir

QCOW2_MAGIC = b"QFI\xfb"


#: machines whose memory ordering the lock-free snapshot read relies on (total
#: store order: see "The snapshot's read path" in docs/design.md)
ORDERED_MACHINES = ("x86_64", "amd64", "i686", "i386")


def check_machine(machine: str | None = None) -> None:
    """Refuse to start where the snapshot's read path is not proven right."""
    machine = machine or platform.machine()
    if machine.lower() not in ORDERED_MACHINES:
        raise UserError(f"snapfs runs only on x86 machines: its snapshots read shared memory "
                        f"without locks, which relies on x86's memory ordering (this is "
                        f"{machine})")


def check_source(path: str, fmt: str | None) -> tuple[str, str, os.stat_result]:
    """(absolute path, format, status) of a SOURCE fit to be a live disk."""
    source = os.path.abspath(path)
    try:
        st = os.stat(source)
    except OSError as e:
        raise UserError(f"source {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"source {path}: not a regular file")
    try:
        os.close(os.open(source, os.O_RDWR))
    except OSError as e:
        raise UserError(f"source {path}: cannot open for reading and writing: "
                        f"{e.strerror}") from None
    if st.st_size == 0:
        raise UserError(f"source {path}: empty image")
    other = mounts.snapfs_mount_containing(source)
    if other:
        raise UserError(f"source {path}: inside the snapfs mount {other}")
    filelock.check_free(source, "source")
    if (fmt or "raw") == "raw":
        with open(source, "rb") as f:
            looks_qcow2 = f.read(4) == QCOW2_MAGIC
        if looks_qcow2 and fmt is None:
            raise UserError(f"source {path}: starts with the qcow2 magic; give "
                            "--format qcow2 for its guest view, or --format raw for its bytes")
        if looks_qcow2:
            print(f"snapfs: warning: source {path} starts with the qcow2 magic; "
                  "using its bytes as a raw disk, as --format raw asks", file=sys.stderr)
    fmt = fmt or "raw"
    open_image(source, fmt, writable=True).close()  # refuses what the driver cannot serve
    return source, fmt, st


def check_mount_point(path: str, what: str) -> str:
    real = os.path.realpath(path)
    fstype = mounts.mount_type(real)
    if fstype in mounts.SNAPFS_FSTYPES and _daemon_gone(real):
        raise UserError(f"{what} {path}: still mounted by a snapfs daemon that died; "
                        "snapfs umount LIVE detaches what it left")
    if fstype is not None:
        raise UserError(f"{what} {path}: busy, something is mounted there already")
    if not os.path.exists(real):
        raise UserError(f"{what} {path}: no such directory or file")
    if not (os.path.isdir(real) or os.path.isfile(real)):
        raise UserError(f"{what} {path}: neither a directory nor a regular file")
    other = mounts.snapfs_mount_containing(real)
    if other:
        raise UserError(f"{what} {path}: inside the snapfs mount {other}")
    return real


def _daemon_gone(point: str) -> bool:
    from snapfs.cli import client

    try:
        client.status(client.locate(point).instance)
    except client.DaemonGone:
        return True
    except UserError:
        pass
    return False


def check_not_covering(source: str, source_arg: str, point: str, what: str) -> None:
    """SOURCE, or the path it was given by (a symbolic link, say), inside a
    mount point: the mount would cover it."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(source)))
    for path in (os.path.realpath(source), os.path.join(parent, os.path.basename(source))):
        if mounts.inside(path, point):
            raise UserError(f"source {source_arg}: lies inside {what} {point}, "
                            "which the mount would cover")


def check_snapshot(args, source: str, source_st: os.stat_result, source_format: str,
                   live: str) -> SnapshotRequest:
    """A snapshot of the live disk of `source` mounted (or to be mounted) on
    `live`: SNAPSHOT and --target as the command line gives them."""
    snapshot = check_mount_point(args.snapshot, "SNAPSHOT")
    if snapshot == live:
        raise UserError(f"LIVE and SNAPSHOT are the same: {args.snapshot}")
    if snapshot == os.path.realpath(source):
        raise UserError(f"SNAPSHOT {args.snapshot}: is SOURCE (only the live disk may be "
                        "mounted over its own file)")
    if mounts.inside(live, snapshot) or mounts.inside(snapshot, live):
        raise UserError("LIVE and SNAPSHOT must not lie inside each other")
    check_not_covering(source, source, snapshot, "SNAPSHOT")

    target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(args.target))),
                          os.path.basename(args.target))
    target_dir = os.path.dirname(target)
    if not os.path.basename(args.target):
        raise UserError(f"target {args.target}: names a directory, not a file")
    if not os.path.isdir(target_dir):
        raise UserError(f"target {args.target}: directory {os.path.dirname(args.target) or '.'} "
                        "does not exist")
    for point in (live, snapshot):
        if mounts.inside(target, point):
            raise UserError(f"target {args.target}: inside the mount point {point}")
    state = state_dir(os.path.realpath(source))
    if mounts.inside(target, state):
        raise UserError(f"target {args.target}: inside the live disk's state directory {state}")
    if mounts.inside(snapshot, state) or mounts.inside(state, snapshot):
        raise UserError(f"SNAPSHOT {args.snapshot}: in or around the live disk's state "
                        f"directory {state}")
    other = mounts.snapfs_mount_containing(target_dir)
    if other:
        raise UserError(f"target {args.target}: inside the snapfs mount {other}")
    other = mounts.snapfs_mount_beneath(target_dir)
    if other:
        raise UserError(f"target {args.target}: its file system lives on a file in the snapfs "
                        f"mount {other} (a loop device): copies before writes would wait on "
                        "themselves")
    for path in (target, copymap_path(target)):
        if os.path.realpath(path) == os.path.realpath(source) or _same_file(path, source_st):
            raise UserError(f"target {args.target}: is the source")
        if os.path.lexists(path):
            if not args.force:
                raise UserError(f"target {path}: already exists (use --force to replace it)")
            if not os.path.isfile(path):
                raise UserError(f"target {path}: exists and is not a regular file")
            filelock.check_free(path, "target")
    target_format = args.target_format or source_format
    base = None
    if args.sync == "incremental":
        if target_format != "qcow2":
            raise UserError("an incremental backup needs --target-format qcow2 (its backing "
                            "file is the backup it builds on)")
        if args.base is not None:
            base = os.path.realpath(args.base)
            if not os.path.isfile(base):
                raise UserError(f"base {args.base}: no such backup")
    elif args.base is not None:
        raise UserError("--base goes with --sync incremental")
    return SnapshotRequest(snapshot=snapshot, target=target, sync=args.sync,
                           target_format=target_format, cluster_size=args.cluster_size,
                           speed=args.speed, force=args.force, base=base,
                           on_cbw_error=args.on_cbw_error, cbw_timeout=args.cbw_timeout,
                           on_file=not os.path.isdir(snapshot))


def _same_file(path: str, st: os.stat_result | None) -> bool:
    if st is None:
        return False
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
