"""The processes of one snapfs instance and how they are wired together.

pyfuse3 serves one FUSE session per process, so an instance is two processes:

- the live process (the daemon proper): owns the source (locked), the target
  and the copy map; serves the live mount; runs copy-before-write and the
  background job; answers the control commands; starts and stops
- the snapshot process, its child: serves the snapshot mount read-only from
  the source, the target and the copy map, which it maps read-only.

Each process tells whoever started it that its mount is up by writing
"ready" (or "error: <why>") as one line to a pipe. The snapshot mount comes up
first, then the live one: from the moment the live disk accepts writes, the
snapshot serves reads. If either mount goes away (umount command, a signal,
`fusermount3 -u` of either mount point), the live process stops the job,
stops the snapshot process, unmounts the live mount and flushes everything.

Run as `python -m snapfs.daemon CONFIG_JSON [--ready-fd N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time

import pyfuse3
import trio

from snapfs import control, filelock, mounts
from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.copymap import CopyMap
from snapfs.errors import UserError, innermost
from snapfs.instance import MountConfig, Readiness, parse_readiness, state_path
from snapfs.fuse.live import LiveOperations
from snapfs.fuse.snapshot import SnapshotOperations
from snapfs.image import open_image
from snapfs.backup.job import BackupJob
from snapfs.backup.reader import SnapshotReader
from snapfs.backup.target import create_target

log = logging.getLogger("snapfs")

_COMMON_OPTIONS = {"default_permissions", "allow_other", "fsname=snapfs"}
LIVE_OPTIONS = _COMMON_OPTIONS | {"subtype=snapfs-live"}
SNAPSHOT_OPTIONS = _COMMON_OPTIONS | {"subtype=snapfs-snapshot", "ro"}
#: the kernel's readahead on the snapshot file
SNAPSHOT_READAHEAD_KB = 4096
#: how long a process may take to report that its mount is up
START_TIMEOUT = 60


class LiveDaemon:
    def __init__(self, cfg: MountConfig, readiness: Readiness, child: "SnapshotChild"):
        self.cfg = cfg
        self.readiness = readiness
        self.child = child
        self.stop_requested = trio.Event()
        self.engine: CopyBeforeWrite | None = None
        self.job: BackupJob | None = None
        self.started_at = time.time()

    # --- what the live mount's control interface calls ------------------

    def status(self) -> dict:
        cfg, job, engine = self.cfg, self.job, self.engine
        return {
            "state": job.state,
            "sync": cfg.sync,
            "format": cfg.format,
            "target_format": cfg.target_format,
            "bytes_total": job.bytes_total,
            "bytes_done": job.bytes_done,
            "clusters_copied_by_writes": engine.clusters_copied_by_writes,
            "error": job.error,
            "cluster_size": cfg.cluster_size,
            "speed": cfg.speed,
            "size": engine.size,
            "source": cfg.source,
            "target": cfg.target,
            "live": os.path.join(cfg.live, cfg.name),
            "snapshot": os.path.join(cfg.snapshot, cfg.name),
            "pid": os.getpid(),
            "started": self.started_at,
        }

    def command(self, command: str) -> None:
        if command == "cancel":
            self.job.cancel()
        elif command == "umount":
            self.request_stop("umount requested")

    def request_stop(self, why: str) -> None:
        if not self.stop_requested.is_set():
            log.info("stopping: %s", why)
            self.stop_requested.set()

    # --- the process ----------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            stack.callback(os.close, filelock.lock(cfg.source, "source"))
            source = open_image(cfg.source, cfg.format, writable=True)
            stack.callback(source.close)
            created: list[str] = []
            try:
                target = self._create(stack, created, cfg.target, "target", lambda: create_target(
                    cfg.target, source, cfg.format, cfg.target_format, cfg.sync,
                    cfg.cluster_size, overwrite=cfg.force))
                copymap = self._create(stack, created, state_path(cfg.target), "copy map",
                                       lambda: CopyMap.create(
                    state_path(cfg.target), source.size, cfg.cluster_size,
                    {"source": cfg.source, "target": cfg.target, "format": cfg.format,
                     "target_format": cfg.target_format, "sync": cfg.sync,
                     "state": "running"},
                    overwrite=cfg.force))
                self.engine = CopyBeforeWrite(source, target, copymap)
                self.job = BackupJob(self.engine, cfg.sync, cfg.speed)
                await self._serve(on_ready=created.clear)
            finally:
                if created:  # never came up: leave nothing behind
                    for path in created:
                        os.unlink(path)
                elif self.job is not None:
                    self._finish()

    @staticmethod
    def _create(stack: contextlib.ExitStack, created: list[str], path: str, what: str, make):
        """Make one of the instance's files, locked (an existing one only if
        no running instance holds it); the stack closes it."""
        lock_fd = None
        if os.path.lexists(path):
            lock_fd = filelock.lock(path, what)
            stack.callback(os.close, lock_fd)
        try:
            made = make()
        except OSError as e:
            raise UserError(f"cannot create {what} {e.filename or path}: "
                            f"{e.strerror or e}") from None
        created.append(path)
        stack.callback(made.close)
        if lock_fd is None:
            stack.callback(os.close, filelock.lock(path, what))
        return made

    async def _serve(self, on_ready) -> None:
        cfg = self.cfg
        ops = LiveOperations(cfg.name, self.engine, self.status, self.command)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_snapshot_process)
            try:
                pyfuse3.init(ops, cfg.live, LIVE_OPTIONS)
            except RuntimeError:
                raise UserError(f"{cfg.live}: cannot mount the live disk there") from None
            try:
                nursery.start_soon(self.job.run)
                nursery.start_soon(self._stop_on_signal)
                nursery.start_soon(self._terminate_when_stop_requested)
                on_ready()
                self.readiness.ready()
                log.info("serving %s (live) and %s (snapshot), sync %s",
                         os.path.join(cfg.live, cfg.name),
                         os.path.join(cfg.snapshot, cfg.name), cfg.sync)
                await pyfuse3.main()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_background()
                pyfuse3.close(unmount=True)
            nursery.cancel_scope.cancel()

    async def _run_snapshot_process(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        child = self.child
        try:
            why = await child.start()
            if why is not None:
                raise UserError(f"{self.cfg.snapshot}: snapshot mount failed: {why}")
            task_status.started()
            code = await child.wait()
            self.request_stop(f"the snapshot process ended (exit status {code})")
        finally:
            with trio.CancelScope(shield=True):
                await child.stop()
            if mounts.mount_type(self.cfg.snapshot) == mounts.SNAPSHOT_FSTYPE:
                log.warning("the snapshot process left its mount behind: unmounting it")
                mounts.lazy_unmount(self.cfg.snapshot)

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                self.request_stop(f"signal {signal.Signals(signum).name}")

    async def _terminate_when_stop_requested(self) -> None:
        await self.stop_requested.wait()
        pyfuse3.terminate()

    async def _stop_background(self) -> None:
        """After the live mount stopped serving: end the job between two
        copies, then the snapshot process."""
        self.stop_requested.set()
        self.job.stop()
        await self.job.finished.wait()
        await self.child.stop()

    def _finish(self) -> None:
        """Make the target and the source durable and record the job's end."""
        job = self.job
        try:
            self.engine.flush()
        finally:
            self.engine.copymap.write_info(state=job.state, error=job.error,
                                           bytes_done=job.bytes_done,
                                           bytes_total=job.bytes_total)
            self.engine.copymap.flush()
        log.info("stopped: background copy %s, %d clusters copied by writes",
                 job.state, self.engine.clusters_copied_by_writes)


class SnapshotChild:
    """The snapshot process, seen from the live process.

    It is forked before trio starts, from a process that has imported
    everything already (a new interpreter would cost the start-up another
    0.15 s), and waits until `start` says go: by then the target and the copy
    map exist. The "go" pipe then stays open as a lifeline: when the live
    process ends, however it ends, the child sees the pipe close and stops."""

    def __init__(self, cfg: MountConfig, inherited: list[int]):
        go_read, self._go = os.pipe()
        self._ready, ready_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            for fd in (self._go, self._ready, *inherited):
                os.close(fd)
            code = 1
            try:
                if os.read(go_read, 1) == b"g":  # else the live process gave up
                    code = run_snapshot(cfg, Readiness(ready_write), lifeline=go_read)
            finally:
                os._exit(code)
        os.close(go_read)
        os.close(ready_write)
        self.returncode: int | None = None

    async def start(self) -> str | None:
        """Let the child mount; None once its mount is up, else why not."""
        os.write(self._go, b"g")
        stream = trio.lowlevel.FdStream(self._ready)
        line = b""
        with trio.move_on_after(START_TIMEOUT):
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(256)
                if not chunk:
                    break
                line += chunk
        await stream.aclose()
        return parse_readiness(line.decode(errors="replace")) if line else "timed out or exited"

    async def wait(self) -> int:
        if self.returncode is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            if self.returncode is None:  # another waiter may have reaped it
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    async def stop(self) -> None:
        """Stop the child (it unmounts its mount on SIGTERM) and reap it."""
        if self.returncode is None:
            os.kill(self.pid, signal.SIGTERM)
            with trio.move_on_after(30):
                await self.wait()
            if self.returncode is None:
                os.kill(self.pid, signal.SIGKILL)
                await self.wait()
        if self._go >= 0:
            os.close(self._go)
            self._go = -1

    def abandon(self) -> None:
        """If the child was never started: make it exit and reap it."""
        if self._go >= 0 and self.returncode is None:
            os.close(self._go)  # EOF instead of "go": the child exits at once
            self._go = -1
            os.waitpid(self.pid, 0)


# --- the snapshot process -------------------------------------------------

async def serve_snapshot(cfg: MountConfig, readiness: Readiness, lifeline: int) -> None:
    source = open_image(cfg.source, cfg.format, writable=False)
    target = open_image(cfg.target, cfg.target_format, writable=False)
    copymap = CopyMap.open(state_path(cfg.target))
    try:
        reader = SnapshotReader(source, target, copymap)
        ops = SnapshotOperations(cfg.name, reader)
        try:
            pyfuse3.init(ops, cfg.snapshot, SNAPSHOT_OPTIONS)
        except RuntimeError:
            raise UserError(f"cannot mount the snapshot on {cfg.snapshot}") from None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_on_signal)
                nursery.start_soon(_terminate_when_parent_ends, lifeline)
                nursery.start_soon(_raise_readahead, cfg.snapshot)
                readiness.ready()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
    finally:
        for thing in (copymap, target, source):
            thing.close()


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


async def _terminate_when_parent_ends(lifeline: int) -> None:
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


# --- entry points ---------------------------------------------------------

def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s snapfs[%(process)d] %(levelname)s: %(message)s")
    faulthandler.enable(file=sys.stderr)  # a hang or crash dumps every thread's stack


def run_live(cfg: MountConfig, readiness: Readiness) -> int:
    """Run an instance: fork its snapshot process, then serve the live mount
    until it goes away. Returns the exit code: 0 after a clean stop."""
    child = SnapshotChild(cfg, inherited=readiness.fds())
    try:
        return _run(LiveDaemon(cfg, readiness, child).run, readiness, "live")
    finally:
        child.abandon()


def run_snapshot(cfg: MountConfig, readiness: Readiness, lifeline: int) -> int:
    return _run(lambda: serve_snapshot(cfg, readiness, lifeline), readiness, "snapshot")


def _run(main, readiness: Readiness, role: str) -> int:
    try:
        trio.run(main)
    except BaseException as e:  # noqa: BLE001 - report anything, then fail
        user_error = innermost(e, UserError)
        if user_error is not None:
            readiness.failed(str(user_error))
        else:
            log.exception("%s process failed", role)
            readiness.failed(f"internal error: {e!r}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapfs.daemon")
    parser.add_argument("config")
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    setup_logging()
    return run_live(MountConfig.from_json(args.config), Readiness(args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
