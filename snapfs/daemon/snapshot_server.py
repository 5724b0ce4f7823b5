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

import contextlib
import ctypes
import logging
import os
import signal
import time

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
#: processes that serve one snapshot's requests (docs/performance.md, "Queue depth")
SNAPSHOT_SERVERS = 4
#: how long the servers may take to stop after SIGTERM
STOP_SECONDS = 10
PR_SET_PDEATHSIG = 1


def mount_options(instance: str) -> set[str]:
    return {"default_permissions", "allow_other", f"fsname={fsname(instance)}",
            "subtype=snapfs-snapshot", "ro"}


def _inherited(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


#: the order of the descriptors the live process hands over
FDS = ("source", "target", "copymap", "ready", "lifeline")


def _open_files(config: dict, fds: dict, files: contextlib.ExitStack) -> SnapshotReader:
    source = files.enter_context(contextlib.closing(open_image(
        _inherited(fds["source"]), config["format"],
        backing_dir=os.path.dirname(config["source_path"]))))
    target = files.enter_context(contextlib.closing(open_image(
        _inherited(fds["target"]), config["target_format"], with_backing=False)))
    copymap = files.enter_context(contextlib.closing(
        CopyMap.open(_inherited(fds["copymap"]), follow=True)))
    for name in ("source", "target", "copymap"):
        os.close(fds[name])  # reopened above
    return SnapshotReader(source, target, copymap)


async def _mount(config: dict, fds: dict, files: contextlib.ExitStack) -> None:
    """Open the files, mount, and serve until the kernel's INIT is handled
    (the mount answers a stat): only then may servers be forked."""
    reader = _open_files(config, fds, files)
    point = config["mountpoint"]
    ops = SnapshotOperations(config["name"], reader, times_from(config["times"]),
                             root_is_file=config["on_file"],
                             uncached=config.get("on_cbw_error") == "break-snapshot")
    try:
        pyfuse3.init(ops, point, mount_options(config["instance"]))
    except RuntimeError:
        raise UserError(f"cannot mount the snapshot on {point}") from None
    files.callback(pyfuse3.close, unmount=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        # a stat from a worker thread, served by our own loop once INIT is handled
        device = (await trio.to_thread.run_sync(os.stat, point)).st_dev
        nursery.cancel_scope.cancel()  # (not terminate: the servers go on with the session)
    _raise_readahead(device)


async def _supervise(servers: list[int], lifeline: int, readiness: Readiness) -> None:
    """The first process serves no request: it reports ready, then waits
    until a server ends (the mount went away), SIGTERM, or the end of the
    live process."""
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        for pid in servers:
            nursery.start_soon(_wait_process, pid, done)
        nursery.start_soon(_wait_signal, done)
        nursery.start_soon(_wait_lifeline, lifeline, done)
        readiness.ready()
        await done.wait()
        nursery.cancel_scope.cancel()


async def _wait_process(pid: int, done: trio.Event) -> None:
    fd = os.pidfd_open(pid)
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    done.set()


async def _wait_signal(done: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            done.set()
            return


async def _wait_lifeline(lifeline: int, done: trio.Event) -> None:
    """The live process holds the lifeline pipe open while it lives. (Not
    PR_SET_PDEATHSIG: that fires when the *thread* that started us ends.)"""
    stream = trio.lowlevel.FdStream(lifeline)
    while await stream.receive_some():
        pass
    log.warning("the live process is gone: stopping")
    done.set()


async def _serve_requests() -> None:
    """What each server runs: requests, until the mount goes away or SIGTERM.
    One pyfuse3 task, not a pool: no handler here awaits anything, so a
    second task would only take turns with the first at the FUSE device,
    a lock hand-off and a trio task switch per request (docs/performance.md,
    "Queue depth"). The other servers give the concurrency."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


def _raise_readahead(device: int) -> None:
    """Let the kernel read ahead SNAPSHOT_READAHEAD_KB on the snapshot file
    (FUSE's default is 128 KiB): a sequential read then reaches us in 1 MiB
    requests, several in flight, instead of 128 KiB ones. The kernel sets the
    default while it handles FUSE's INIT, so this runs after it. Needs root;
    without it the default stays."""
    try:
        with open(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb",
                  "w") as f:
            f.write(str(SNAPSHOT_READAHEAD_KB))
    except OSError as e:
        log.info("snapshot readahead left at the default: %s", e)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def run(config: dict) -> int:
    """Serve the snapshot `config` describes until its mount goes away; the
    exit code. `config["fds"]` holds the descriptors named in FDS.

    SNAPSHOT_SERVERS processes serve the mount, each reading requests from
    the same FUSE connection (the kernel hands each request to one of them):
    a snapshot is read-only and keeps no state per request, so any of them
    may answer any request. They are forked here, outside trio, once the
    kernel's INIT is handled (a process whose copy of the session has not
    seen INIT answers every request with EIO). This process then serves no
    request itself (a reader of the FUSE device may wait in read() while
    another took the request, and would miss the end of the live process):
    it supervises. The servers form its process group, die with it
    (PR_SET_PDEATHSIG), and it waits for them before it exits; the live
    process also makes sure the whole group is gone before it takes the
    snapshot out of copy-before-write."""
    fds = dict(zip(FDS, config["fds"]))
    readiness = Readiness(fds["ready"])
    os.setpgid(0, 0)
    with contextlib.ExitStack() as files:
        code = run_logged(lambda: _mount(config, fds, files), readiness, "snapshot")
        if code != 0:
            return code
        servers = []
        try:
            for _ in range(SNAPSHOT_SERVERS):
                pid = os.fork()
                if pid == 0:
                    _run_server()  # does not return
                servers.append(pid)
            return run_logged(lambda: _supervise(servers, fds["lifeline"], readiness),
                              readiness, "snapshot")
        finally:
            _stop_servers(servers)


def _run_server() -> None:
    """In a forked server: serve, then exit (never return to the caller)."""
    code = 1
    try:
        parent = os.getppid()
        _die_with_parent()
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)
        trio.run(_serve_requests)
        code = 0
    except BaseException:  # noqa: BLE001 - log anything, then exit
        log.exception("snapshot server %d failed", os.getpid())
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _stop_servers(pids: list[int]) -> None:
    """Stop the servers and wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
