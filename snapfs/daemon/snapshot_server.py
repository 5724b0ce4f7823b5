"""The snapshot process: serves one snapshot's mount, read-only, from the
source, the target and the copy map, which it reads without asking the live
process anything (docs/design.md explains why that is safe).

The live process starts it through its spawner (daemon/spawner.py) and hands
it its open files (SOURCE, TARGET, the copy map) as descriptors, which it
reopens read-only through /proc/self/fd: renaming or deleting any of them by
path changes nothing. It reports `ready` on a pipe
once its mount is up, and stops when its mount goes away (unmounted: its
snapshot is being released), on SIGTERM, or when the live process ends (the
lifeline pipe closes), detaching its mount.
"""

from __future__ import annotations

import logging
import os
import signal

import pyfuse3
import trio

from snapfs.backup.copymap import CopyMap
from snapfs.backup.reader import SnapshotReader
from snapfs.daemon.logs import run_logged
from snapfs.daemon.snapshot import times_from
from snapfs.errors import UserError
from snapfs.fuse.snapshot import SnapshotOperations
from snapfs.image import open_image
from snapfs.protocol import Readiness, fsname

log = logging.getLogger("snapfs")

#: the kernel's readahead on the snapshot file
SNAPSHOT_READAHEAD_KB = 4096


def mount_options(instance: str) -> set[str]:
    return {"default_permissions", "allow_other", f"fsname={fsname(instance)}",
            "subtype=snapfs-snapshot", "ro"}


def _inherited(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


#: the order of the descriptors the live process hands over
FDS = ("source", "target", "copymap", "ready", "lifeline")


async def serve(config: dict, fds: dict, readiness: Readiness) -> None:
    source = open_image(_inherited(fds["source"]), config["format"],
                        backing_dir=os.path.dirname(config["source_path"]))
    try:
        target = open_image(_inherited(fds["target"]), config["target_format"],
                            with_backing=False)
        try:
            copymap = CopyMap.open(_inherited(fds["copymap"]), follow=True)
            try:
                for name in ("source", "target", "copymap"):
                    os.close(fds[name])  # reopened above
                await _serve(config, fds["lifeline"], readiness,
                             SnapshotReader(source, target, copymap))
            finally:
                copymap.close()
        finally:
            target.close()
    finally:
        source.close()


async def _serve(config: dict, lifeline: int, readiness: Readiness,
                 reader: SnapshotReader) -> None:
    point = config["mountpoint"]
    ops = SnapshotOperations(config["name"], reader, times_from(config["times"]),
                             root_is_file=config["on_file"],
                             uncached=config.get("on_cbw_error") == "break-snapshot")
    try:
        pyfuse3.init(ops, point, mount_options(config["instance"]))
    except RuntimeError:
        raise UserError(f"cannot mount the snapshot on {point}") from None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal)
            nursery.start_soon(_terminate_when_live_process_ends, lifeline)
            nursery.start_soon(_raise_readahead, point)
            readiness.ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


async def _raise_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead SNAPSHOT_READAHEAD_KB on the snapshot file
    (FUSE's default is 128 KiB): a sequential read then reaches us in 1 MiB
    requests, several in flight, instead of 128 KiB ones. The kernel sets the
    default while it handles FUSE's INIT, so this waits until the mount
    answers (a stat from a worker thread, served by our own main loop). Needs
    root; without it the default stays."""
    try:
        device = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
        with open(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb",
                  "w") as f:
            f.write(str(SNAPSHOT_READAHEAD_KB))
    except OSError as e:
        log.info("snapshot readahead left at the default: %s", e)


async def _terminate_when_live_process_ends(lifeline: int) -> None:
    """The live process holds the lifeline pipe open while it lives. (Not
    PR_SET_PDEATHSIG: that fires when the *thread* that started us ends.)"""
    stream = trio.lowlevel.FdStream(lifeline)
    while await stream.receive_some():
        pass
    log.warning("the live process is gone: stopping")
    pyfuse3.terminate()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def run(config: dict) -> int:
    """Serve the snapshot `config` describes until its mount goes away; the
    exit code. `config["fds"]` holds the descriptors named in FDS."""
    fds = dict(zip(FDS, config["fds"]))
    readiness = Readiness(fds["ready"])
    return run_logged(lambda: serve(config, fds, readiness), readiness, "snapshot")
