"""One snapshot as the live process runs it: its store (target and copy map,
locked), its background job, and the process that serves its mount.

Life of a snapshot:

1. `create` (a new one) or `reopen` (one brought back after a crash) opens its
   files; `begin` then, with no checkpoint in between, plans the job and adds
   the store to copy-before-write: that instant is the point in time.
2. `run` starts the snapshot process, waits until its mount is up, then runs
   the job until the snapshot process ends. It ends when its mount goes away:
   `release` unmounts it (refused while busy, or detached with `lazy`), and so
   does `fusermount3 -u SNAPSHOT`; `kill` stops it at once.
3. Then `run` ends the snapshot: stops the job between two copies, takes the
   store out of copy-before-write (no reader is left), flushes the target and
   the copy map, records the job's end in the copy map's header, closes and
   unlocks everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import stat
import time
import types
from typing import Awaitable, Callable

import trio

from snapfs import filelock, mounts
from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.changes import GRANULARITY, ChangeTracker
from snapfs.backup.copymap import CopyMap
from snapfs.backup.job import BackupJob
from snapfs.backup.store import Store
from snapfs.backup.target import create_target
from snapfs.daemon.export import Export
from snapfs.daemon.spawner import SnapshotProcess, Spawner
from snapfs.daemon.state import boot_id, identity, identity_of
from snapfs.errors import UserError
from snapfs.image import open_image
from snapfs.image.base import Image
from snapfs.protocol import SnapshotRequest, copymap_path, parse_readiness

log = logging.getLogger("snapfs")

#: how long a snapshot process may take to report its mount up
START_TIMEOUT = 60
#: how long a snapshot process may take to stop after SIGTERM
STOP_TIMEOUT = 30


class Snapshot:
    def __init__(self, request: SnapshotRequest, source: Image, source_format: str,
                 name: str, instance: str, tracker: ChangeTracker | None = None):
        self.request = request
        self.tracker = tracker
        #: for an incremental: the checkpoint it builds on (id, target, format)
        self.base: dict | None = None
        #: for an incremental: what it copies (bit i: GRANULARITY bytes)
        self.changed: int | None = None
        self.source = source
        self.source_format = source_format
        self.target_format = request.target_format or source_format
        self.name = name
        self.instance = instance
        self.file = request.file(name)
        self.store: Store | None = None
        self.job: BackupJob | None = None
        self.process: SnapshotProcess | None = None
        self.created = time.time()
        self.times: os.stat_result | None = None  # SOURCE's status at the point in time
        #: why it could not be brought back after a crash (it then has no
        #: mount), and what the state file kept of it
        self.failure: str | None = None
        self.saved_entry: dict | None = None
        self.releasing = False
        self.exports: list[Export] = []  # nbdkit processes serving it over NBD
        self.ended = trio.Event()
        self._files = contextlib.ExitStack()
        self._made: list[str] = []  # files made by `create`, removed if the start fails
        self._started = False

    # --- files ----------------------------------------------------------

    def create(self) -> None:
        """Create TARGET and its copy map, locked (an existing TARGET only
        with --force and if no running instance holds it)."""
        req = self.request
        try:
            base = (self.base["target"], self.base["target_format"]) if self.base else None
            target = self._make(req.target, "target", lambda: create_target(
                req.target, self.source, self.source_format, self.target_format, req.sync,
                req.cluster_size, overwrite=req.force, base=base))
            copymap = self._make(copymap_path(req.target), "copy map", lambda: CopyMap.create(
                copymap_path(req.target), self.source.size, req.cluster_size,
                {"source": self.source.path, "target": req.target, "format": self.source_format,
                 "target_format": self.target_format, "sync": req.sync, "state": "running",
                 "id": secrets.token_hex(8), "boot_id": boot_id(), "created": self.created},
                overwrite=req.force))
            # The target holds the disk's data: never more open than SOURCE.
            source_mode = stat.S_IMODE(self.source.stat().st_mode) & 0o666
            for fd in (target.fd, copymap.fd):
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & source_mode)
        except BaseException:
            self.discard()
            raise
        self.store = Store(target, copymap, req.on_cbw_error, req.cbw_timeout)

    def _make(self, path: str, what: str, make: Callable):
        lock_fd = None
        if os.path.lexists(path):
            lock_fd = filelock.lock(path, what)
            self._files.callback(os.close, lock_fd)
        try:
            made = make()
        except OSError as e:
            raise UserError(f"cannot create {what} {e.filename or path}: "
                            f"{e.strerror or e}") from None
        self._made.append(path)
        self._files.callback(made.close)
        if lock_fd is None:
            self._files.callback(os.close, filelock.lock(path, what))
        return made

    def reopen(self, saved: dict) -> None:
        """Open the files of a snapshot that was active when the daemon died,
        if it can be proven to hold exactly its point-in-time image; else
        raise UserError saying why not."""
        req = self.request
        if saved.get("boot_id") != boot_id():
            raise UserError("the machine restarted since the daemon died: writes that "
                            "reached SOURCE may have lost the old data they replaced")
        if saved.get("source") != identity(self.source.fd):
            raise UserError("SOURCE is not the file the snapshot was taken of")
        files = []
        for path, what, key in ((req.target, "target", "target_id"),
                                (copymap_path(req.target), "copy map", "copymap_id")):
            try:
                found = identity_of(path)
            except OSError as e:
                raise UserError(f"{what} {path}: {e.strerror}") from None
            if found != saved.get(key):
                raise UserError(f"{what} {path} was replaced since the snapshot was taken")
            files.append(path)
        for path, what in zip(files, ("target", "copy map")):
            self._files.callback(os.close, filelock.lock(path, what))
        try:
            target = open_image(req.target, self.target_format, writable=True)
        except (OSError, ValueError) as e:
            raise UserError(f"target {req.target}: {e}") from None
        self._files.callback(target.close)
        try:
            copymap = CopyMap.open(copymap_path(req.target), writable=True)
        except (OSError, ValueError) as e:
            raise UserError(f"copy map: {e}") from None
        self._files.callback(copymap.close)
        info = copymap.info
        if info.get("id") != saved.get("copymap_key"):
            raise UserError(f"copy map {copymap.path} was replaced since the snapshot was taken")
        if (info.get("size") != self.source.size or info.get("cluster_size") != req.cluster_size
                or info.get("sync") != req.sync or target.size != self.source.size):
            raise UserError(f"copy map {copymap.path} does not describe this snapshot")
        self.store = Store(target, copymap, req.on_cbw_error, req.cbw_timeout)
        self.created = saved.get("created", self.created)
        self.times = times_from(saved["times"])
        self.base = saved.get("base")

    def discard(self) -> None:
        """After a start that failed: close and remove what `create` made."""
        self._files.close()
        for path in self._made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._made.clear()

    def saved(self) -> dict:
        """What the state file keeps of this snapshot, to bring it back."""
        store = self.store
        return {"request": self.request.to_dict(), "boot_id": boot_id(),
                "source": identity(self.source.fd),
                "target_id": identity(store.target.fd),
                "copymap_id": identity(store.copymap.fd),
                "copymap_key": store.copymap.info.get("id"),
                "created": self.created, "times": _stat_to(self.times), "base": self.base}

    # --- the point in time ----------------------------------------------

    @property
    def id(self) -> str:
        """The snapshot's random id (in its copy map's header): also the id of
        its boundary in change tracking."""
        return self.store.copymap.info["id"]

    @property
    def is_checkpoint(self) -> bool:
        """Whether the backup can become a base for incremental ones: its
        target, once complete, holds the whole image by itself or with its
        backing chain."""
        req = self.request
        return (req.sync in ("full", "incremental")
                or (req.sync == "top" and self.target_format == "qcow2"))

    def begin(self, engine: CopyBeforeWrite) -> None:
        """Make now the point in time (for a new snapshot), or go on from
        where the copy map stands (for one brought back). Must run in the trio
        thread with no checkpoint between the caller's last look at the
        source and here: from the return on, every write saves old data for
        this snapshot, and records its changes after this snapshot's
        boundary. For a new checkpoint, `tracker.make_spare` must have run."""
        req, tracker = self.request, self.tracker
        info = self.store.copymap.info
        brought_back = self.times is not None
        if req.sync == "incremental":
            until = self.id if brought_back else None
            if tracker is None or tracker.find(self.base["id"]) is None or (
                    brought_back and tracker.find(self.id) is None):
                raise UserError("change tracking no longer knows what changed since its base")
            self.changed = tracker.changed_since(self.base["id"], until)
        self.job = BackupJob(engine, self.store, req.sync, req.speed, changed=self.changed or 0,
                             changed_granularity=GRANULARITY)
        if self.store.broken is not None:  # broke before the crash: it stays broken
            self.job.ended("failed", info.get("error") or self.store.broken)
        elif info.get("state", "running") != "running":  # ended before the crash
            self.job.ended(info["state"], info.get("error"))
        if tracker is not None and self.is_checkpoint and not brought_back:
            tracker.add_boundary(self.id, {
                "target": req.target, "target_format": self.target_format, "sync": req.sync,
                "target_id": identity(self.store.target.fd), "created": self.created,
                "base": self.base["id"] if self.base else None})
        if not brought_back:
            self.times = self.source.stat()
        if self.store.broken is None:
            engine.add(self.store)

    # --- the process ----------------------------------------------------

    async def run(self, engine: CopyBeforeWrite, spawner: Spawner, lifeline: int,
                  on_end: Callable[[], Awaitable[None]], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve the snapshot until its mount goes away, then end it (see the
        module's docstring). Reports started once the mount is up; if it never
        comes up, undoes everything and raises UserError."""
        try:
            async with trio.open_nursery() as nursery:
                await self._start_process(spawner, lifeline)
                self._started = True
                nursery.start_soon(self._run_job)
                task_status.started()
                await self.process.wait()
                log.info("%s: its snapshot process ended", self.file)
                self.job.stop()
        finally:
            with trio.CancelScope(shield=True):
                await self._end(engine)
                await on_end()

    async def _start_process(self, spawner: Spawner, lifeline: int) -> None:
        store, req = self.store, self.request
        ready_read, ready_write = os.pipe()
        config = {
            "name": self.name, "mountpoint": req.snapshot, "instance": self.instance,
            "source_path": self.source.path, "format": self.source_format,
            "target_format": self.target_format, "times": _stat_to(self.times),
            "on_file": req.on_file, "on_cbw_error": req.on_cbw_error,
        }
        try:
            self.process = await spawner.spawn(
                config, [self.source.fd, store.target.fd, store.copymap.fd, ready_write, lifeline])
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        why = await _read_readiness(ready_read, START_TIMEOUT)
        if why is not None:
            await self.kill()
            raise UserError(f"snapshot {req.snapshot}: cannot mount it: {why}")

    async def _run_job(self) -> None:
        job, copymap = self.job, self.store.copymap
        await job.run()
        if job.state == "completed" and self.tracker is not None \
                and self.tracker.find(self.id) is not None:
            await self._make_durable()
        # Record how it ended: a snapshot brought back after a crash goes on
        # from here.
        copymap.write_info(state=job.state, error=job.error, bytes_done=job.bytes_done,
                           bytes_total=job.bytes_total)
        await self.settle_checkpoint()

    async def _make_durable(self) -> None:
        """Before a completed backup becomes a checkpoint: its target and copy
        map, then SOURCE, are made durable, so that after a power loss the
        checkpoint's target holds what it says and SOURCE holds at least the
        checkpoint's image plus what change tracking records. A failure makes
        the job fail (no checkpoint)."""
        store, source, job = self.store, self.source, self.job
        store.flushing += 1
        try:
            await trio.to_thread.run_sync(lambda: (store.flush(), source.flush()))
        except OSError as e:
            log.error("%s: flushing the completed backup failed: %s", self.request.target, e)
            job.state, job.error = "failed", f"flushing the target failed: {e.strerror or e}"
        finally:
            store.flushing -= 1

    async def settle_checkpoint(self) -> None:
        """Its job ended: a completed backup becomes a checkpoint; one that did
        not complete gives its changes back to the next backup."""
        tracker = self.tracker
        if tracker is None or tracker.find(self.id) is None:
            return
        if self.job.state == "completed":
            tracker.complete(self.id)
        else:
            tracker.abandon(self.id)
        await trio.to_thread.run_sync(tracker.save)

    async def release(self, lazy: bool = False) -> None:
        """Unmount the snapshot (refused while busy, unless `lazy`); it ends
        when its process has gone (with `lazy`, when its last user let go)."""
        point = self.request.snapshot
        if self.releasing:  # detached already: it ends when let go
            if not lazy:
                await self.ended.wait()
            return
        if self.process is None:  # never came up: nothing mounted
            self.releasing = True
            self.ended.set()
            return
        if lazy:
            self.releasing = True
            await trio.to_thread.run_sync(mounts.lazy_unmount, point)
            return
        held = await self.holders()
        if held:
            raise UserError(f"{point} is busy, in use by {', '.join(held)}; "
                            "the snapshot stays")
        await self.stop_exports()
        why = await trio.to_thread.run_sync(mounts.unmount, point)
        if why is not None:
            held = await trio.to_thread.run_sync(mounts.holders, point)
            raise UserError(f"{point}: {why}" + (f", in use by {', '.join(held)}" if held else "")
                            + "; the snapshot stays")
        self.releasing = True
        await self.ended.wait()

    async def holders(self) -> list[str]:
        """What keeps its mount busy, but for its own NBD exports (they end
        with it)."""
        ours = frozenset(e.pid for e in self.exports)
        return await trio.to_thread.run_sync(mounts.holders, self.request.snapshot, ours)

    async def export(self, where: dict, run_dir: str) -> Export:
        """Serve the snapshot over NBD (see daemon/export.py)."""
        export = Export(where)
        await export.start(self, run_dir)
        self.exports.append(export)
        return export

    async def stop_exports(self) -> None:
        for export in self.exports:
            await export.stop()
        self.exports.clear()

    async def kill(self) -> None:
        """Stop the snapshot process now (it detaches its mount)."""
        await self.stop_exports()
        process = self.process
        if process is None or process.done:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
        if not process.done:
            process.send_signal(signal.SIGKILL)
            await process.wait()

    async def _end(self, engine: CopyBeforeWrite) -> None:
        """After the snapshot process is gone: see the module's docstring."""
        if not self._started:
            if self.process is not None:
                await self.kill()
                await self.process.wait_group()
            if self.store is not None and self.store in engine.stores:
                engine.remove(self.store)
            self.discard()
            self._leave_no_mount()
            self.ended.set()
            return
        job, store = self.job, self.store
        await self.stop_exports()  # before copy-before-write for it stops
        if self.process is not None:
            await self.process.wait_group()  # no server of the snapshot is left
        job.stop()
        await job.finished.wait()
        if store in engine.stores:  # (a broken one is out already)
            engine.remove(store)
        while store.flushing:
            await trio.sleep(0.01)
        try:
            await trio.to_thread.run_sync(store.flush)
        except OSError as e:
            log.error("%s: flushing the target failed: %s", self.request.target, e)
        store.copymap.write_info(state=job.state, error=job.error, bytes_done=job.bytes_done,
                                 bytes_total=job.bytes_total)
        store.copymap.flush()
        self._files.close()
        await self._seal()
        self._leave_no_mount()
        log.info("%s released: background copy %s, %d clusters copied by writes",
                 self.file, job.state, store.clusters_copied_by_writes)
        self.ended.set()

    async def _seal(self) -> None:
        """A checkpoint's target is final now that nothing writes it: record
        its size and times, so that a later change to it is seen."""
        tracker = self.tracker
        boundary = tracker.find(self.id) if tracker is not None else None
        if boundary is None or boundary["state"] != "checkpoint":
            return
        try:
            st = os.stat(self.request.target)
        except OSError:
            return
        # (not ctime: moving the file and back changes it, and nothing else)
        boundary["backup"]["sealed"] = [st.st_size, st.st_mtime_ns]
        await trio.to_thread.run_sync(tracker.save)

    def _leave_no_mount(self) -> None:
        """A snapshot process killed hard leaves its mount dead: detach it."""
        mount = mounts.find_mount(self.request.snapshot)
        if mount is not None and mount.source.endswith(self.instance):
            log.warning("%s: the snapshot process left its mount behind: detaching it",
                        self.request.snapshot)
            mounts.lazy_unmount(self.request.snapshot)

    # --- what status shows ----------------------------------------------

    def status(self) -> dict:
        req, job, store = self.request, self.job, self.store
        if self.failure is not None:
            state, error = "failed", self.failure
        else:
            state, error = job.state if job else "starting", job.error if job else None
        return {
            "snapshot": self.file,
            "snapshot_dir": req.snapshot,
            "state": state,
            "error": error,
            "sync": req.sync,
            "bytes_total": job.bytes_total if job else 0,
            "bytes_done": job.bytes_done if job else 0,
            "bytes_copied": job.bytes_copied if job else 0,
            "bytes_cloned": job.bytes_cloned if job else 0,
            "rate": job.rate() if job else None,
            "seconds_left": job.seconds_left() if job else None,
            "clusters_copied_by_writes": store.clusters_copied_by_writes if store else 0,
            "target": req.target,
            "target_format": self.target_format,
            "cluster_size": req.cluster_size,
            "speed": req.speed,
            "pid": self.process.pid if self.process else None,
            "created": self.created,
            "releasing": self.releasing,
            "base": self.base["target"] if self.base else None,
            "exports": [e.describe() for e in self.exports],
            "checkpoint": self._checkpoint_state(),
            "on_cbw_error": req.on_cbw_error,
            "cbw_timeout": req.cbw_timeout,
            "broken": store.broken if store else None,
            "failed_writes": store.failed_writes if store else 0,
            "last_error": store.last_error if store else None,
        }

    def _checkpoint_state(self) -> str | None:
        """`pending` while it may become a base for incremental backups,
        `checkpoint` once it is one, None if it never will."""
        if self.tracker is None or self.store is None:
            return None
        boundary = self.tracker.find(self.id)
        return boundary["state"] if boundary else None


async def _read_readiness(fd: int, timeout: float) -> str | None:
    """None once the process on the other end of pipe `fd` said ready, else why not."""
    stream = trio.lowlevel.FdStream(fd)
    line = b""
    with trio.move_on_after(timeout):
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            line += chunk
    await stream.aclose()
    if not line:
        return "it exited or did not answer in time"
    return parse_readiness(line.decode(errors="replace"))[0]


def _stat_to(st) -> dict:
    """The times of a status, to keep in JSON."""
    return {"st_atime_ns": st.st_atime_ns, "st_mtime_ns": st.st_mtime_ns,
            "st_ctime_ns": st.st_ctime_ns}


def times_from(saved: dict) -> types.SimpleNamespace:
    """Times kept by `_stat_to`, as the FUSE layer reads them."""
    return types.SimpleNamespace(**saved)
