"""The live process: the daemon of one live disk.

It owns SOURCE (locked and open read/write), serves the live mount, runs
copy-before-write for every snapshot, and answers the commands on its control
socket. Each snapshot is served by a process of its own (pyfuse3 serves one
FUSE session per process), started and ended by `daemon.snapshot.Snapshot`.

Start: lock and open SOURCE; bring back the snapshots the state file lists
(the last daemon died with them active), take the snapshot `snapfs mount` asked
for, if any; listen on the control socket; mount the live disk; tell the
starter. Snapshots are therefore up before the first write reaches the disk.

Stop: the live process stops when its mount goes away (`snapfs umount`,
`fusermount3 -u LIVE`, or after `snapfs umount --lazy` when the last user
lets go) or on SIGTERM/SIGINT/SIGHUP. It ends every snapshot (unmounting it;
one still in use is detached and waited for; on a signal they are stopped at
once), flushes SOURCE, and removes its state directory: nothing stays behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time

import pyfuse3
import trio

from snapfs import filelock, mounts, protocol
from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.copymap import CopyMap
from snapfs.backup.changes import GRANULARITY, ChangeTracker, extents, source_record
from snapfs.daemon import systemd
from snapfs.daemon.control_server import serve_control
from snapfs.daemon.snapshot import Snapshot
from snapfs.daemon.spawner import Spawner
from snapfs.daemon.state import LiveState, boot_id, identity, identity_of
from snapfs.errors import UserError
from snapfs.fuse.live import LiveOperations
from snapfs.image import open_image
from snapfs.image.base import Image
from snapfs.protocol import LiveConfig, Readiness, SnapshotRequest, copymap_path, fsname

log = logging.getLogger("snapfs")

#: how many snapshots one live disk may have at once
MAX_SNAPSHOTS = 32
#: how long commands being answered may hold up the stop
HANDLER_GRACE = 10
#: the change tracking's directory in the state directory
CHANGES_DIR = "changes"
#: how often the quiet watcher looks (and the heartbeat at most)
QUIET_CHECK_SECONDS = 1.0


def mount_options(instance: str) -> set[str]:
    return {"default_permissions", "allow_other", f"fsname={fsname(instance)}",
            "subtype=snapfs-live"}


class LiveDaemon:
    def __init__(self, cfg: LiveConfig, readiness: Readiness):
        self.cfg = cfg
        self.readiness = readiness
        self.instance = secrets.token_hex(8)
        self.state = LiveState(cfg.source)
        self.started_at = time.time()
        self.snapshots: list[Snapshot] = []
        self.source: Image | None = None
        self.engine: CopyBeforeWrite | None = None
        self.tracker: ChangeTracker | None = None
        self._lock_fd = -1
        self._source_closed = False
        self._backing_paths: list[str] = []  # SOURCE's backing chain, top down
        self.stopping = False  # no new snapshots
        self.forced = False  # a signal: end snapshots at once
        self._nursery: trio.Nursery | None = None
        self._lifeline_read, self._lifeline_write = os.pipe()
        # forked now, before trio starts: see daemon/spawner.py
        self.spawner = Spawner(close_in_child=readiness.fds() + [self._lifeline_write])
        self._stop_requested = trio.Event()
        #: one change of the set of snapshots at a time (take, release, umount)
        self._changing = trio.Lock()

    # --- the process ----------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            self._lock_fd = filelock.lock(cfg.source, "source")
            stack.callback(os.close, self._lock_fd)
            self.source = open_image(cfg.source, cfg.format, writable=True)
            stack.callback(self._close_source)
            filelock.share_chain(self.source)
            layer = getattr(self.source, "backing", None)
            while layer is not None:
                self._backing_paths.append(layer.path)
                layer = getattr(layer, "backing", None)
            for fd in (self._lifeline_read, self._lifeline_write):
                stack.callback(os.close, fd)
            stack.callback(self.spawner.close)
            try:
                previous = self.state.load()
                self.state.make_dir()
            except (ValueError, OSError) as e:
                raise UserError(str(e)) from None
            self.tracker = await trio.to_thread.run_sync(
                ChangeTracker.open, os.path.join(self.state.dir, CHANGES_DIR), self.source.size,
                self._source_record)
            stack.callback(self.tracker.close)
            if self.tracker.invalid:
                log.warning("change tracking: %s", self.tracker.invalid)
            self.engine = CopyBeforeWrite(self.source, self.tracker)
            async with trio.open_nursery() as handlers:  # the commands being answered
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        await self._serve(nursery, handlers, previous)
                    finally:
                        with trio.CancelScope(shield=True):
                            await self._end_snapshots()
                        nursery.cancel_scope.cancel()
                # the answers still being sent get a moment, no more
                handlers.cancel_scope.deadline = trio.current_time() + HANDLER_GRACE
            self.source.flush()
            # (closing a qcow2 SOURCE gives its unused space back: record after)
            self._close_source()
            if self.tracker.boundaries:  # what SOURCE looks like at this clean stop
                self.tracker.record_quiet(clean=True)
        if not self.snapshots:  # nothing to bring back: only change tracking stays
            self.state.remove(keep=(CHANGES_DIR,) if self.tracker.boundaries else ())

    async def _serve(self, nursery: trio.Nursery, handlers: trio.Nursery,
                     previous: dict | None) -> None:
        cfg = self.cfg
        await nursery.start(serve_control, self.instance, self, handlers)
        warnings = await self._bring_back(previous)
        if cfg.snapshot is not None:
            await self.take(cfg.snapshot)
        try:
            pyfuse3.init(LiveOperations(cfg.name, self.engine, root_is_file=cfg.on_file),
                         cfg.live, mount_options(self.instance))
        except RuntimeError:
            raise UserError(f"{cfg.live}: cannot mount the live disk there") from None
        try:
            nursery.start_soon(self._stop_on_signal)
            nursery.start_soon(self._terminate_when_stop_requested)
            nursery.start_soon(self._watch_quiet)
            self.readiness.ready(warnings=warnings)
            live = cfg.file
            systemd.notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving {live}")
            log.info("serving %s (live)", live)
            await pyfuse3.main()
            log.info("the live mount is gone: stopping")
            systemd.notify("STOPPING=1")
        finally:
            self.stopping = True
            with trio.CancelScope(shield=True):
                await self._end_snapshots()
            pyfuse3.close(unmount=True)

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("stopping: signal %s", signal.Signals(signum).name)
                systemd.notify("STOPPING=1")
                self.forced = True
                self._stop_requested.set()

    async def _watch_quiet(self) -> None:
        """While writes go on, a heartbeat each second; once they stop, a
        record of SOURCE (see backup/changes.py)."""
        tracker = self.tracker
        while True:
            await trio.sleep(QUIET_CHECK_SECONDS)
            if not tracker.boundaries:
                continue
            if tracker.quiet_due:
                await trio.to_thread.run_sync(tracker.record_quiet)
            elif tracker.writing:
                tracker.write_heartbeat()

    def _source_record(self) -> dict:
        """SOURCE now, seen through the descriptor that holds its lock (it
        stays open until the very end, after the image is closed), with the
        files of its backing chain (a change to a base image changes the
        disk too)."""
        record = source_record(self._lock_fd, identity(self._lock_fd), boot_id())
        chain = []
        for path in self._backing_paths:  # by path: at the stop the image is closed already
            try:
                st = os.stat(path)
                chain.append([*identity_of(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
            except OSError as e:
                chain.append(str(e))
        record["identity"] = [*record["identity"], chain]
        return record

    def _close_source(self) -> None:
        if not self._source_closed:
            self._source_closed = True
            self.source.close()

    async def _terminate_when_stop_requested(self) -> None:
        await self._stop_requested.wait()
        pyfuse3.terminate()

    # --- snapshots ------------------------------------------------------

    def find(self, mountpoint: str) -> Snapshot:
        for snapshot in self.snapshots:
            if snapshot.request.snapshot == mountpoint:
                return snapshot
        raise UserError(f"{mountpoint}: not a snapshot of {self.cfg.live}")

    async def take(self, request: SnapshotRequest) -> Snapshot:
        """Take a snapshot now; returns once its mount serves it."""
        async with self._changing:
            return await self._take(request)

    async def _take(self, request: SnapshotRequest) -> Snapshot:
        if self.stopping:
            raise UserError(f"{self.cfg.live} is being unmounted")
        if len(self.snapshots) >= MAX_SNAPSHOTS:
            raise UserError(f"{self.cfg.live} has {MAX_SNAPSHOTS} snapshots already")
        for other in self.snapshots:
            if other.request.snapshot == request.snapshot:
                raise UserError(f"{request.snapshot}: already a snapshot of {self.cfg.live}")
        if mounts.find_mount(request.snapshot) is not None:
            raise UserError(f"SNAPSHOT {request.snapshot}: busy, something is mounted there")
        for path, what in ((request.snapshot, "SNAPSHOT"), (request.target, "target")):
            if mounts.inside(path, self.state.dir) or mounts.inside(self.state.dir, path):
                raise UserError(f"{what} {path}: in or around the live disk's state directory "
                                f"{self.state.dir}")
        beneath = await trio.to_thread.run_sync(mounts.snapfs_mount_beneath,
                                                os.path.dirname(request.target))
        if beneath:
            raise UserError(f"target {request.target}: on a file system in or on the snapfs "
                            f"mount {beneath}")
        snapshot = Snapshot(request, self.source, self.cfg.format, self.cfg.name, self.instance,
                            self.tracker)
        if request.sync == "incremental":
            snapshot.base = await trio.to_thread.run_sync(self._base_for, request)
        await trio.to_thread.run_sync(snapshot.create)
        if snapshot.is_checkpoint:
            await trio.to_thread.run_sync(self.tracker.make_spare)
        # The point in time: no checkpoint between the last write that
        # returned and here (writes run in this thread and never await after
        # their last look at the stores and at change tracking).
        snapshot.begin(self.engine)
        await self._start(snapshot)
        if snapshot.is_checkpoint:
            await trio.to_thread.run_sync(self.tracker.save)
        log.info("snapshot %s taken: target %s, sync %s", snapshot.file, request.target,
                 request.sync)
        return snapshot

    def _base_for(self, request: SnapshotRequest) -> dict:
        """The checkpoint an incremental builds on, checked: `request.base`
        (a backup's target) or the last one. UserError if there is none."""
        tracker = self.tracker
        if request.target_format != "qcow2":
            raise UserError("an incremental backup needs --target-format qcow2 (its backing "
                            "file is the backup it builds on)")
        if request.base is None:
            base = tracker.last_checkpoint()
            if base is None:
                why = f" ({tracker.invalid})" if tracker.invalid else ""
                raise UserError(f"no completed backup of {self.cfg.live} to build on{why}: "
                                "take a full backup first")
        else:
            base = next((b for b in tracker.boundaries if b["backup"]["target"] == request.base
                         and b["state"] == "checkpoint"), None)
            if base is None:
                raise UserError(f"base {request.base}: not a completed backup of this live disk "
                                "that change tracking still knows")
        chain = self._chain_of(base)
        target = os.path.realpath(request.target)
        if any(os.path.realpath(b["backup"]["target"]) == target for b in chain):
            raise UserError(f"target {request.target}: a backup in the chain it would build on")
        for link in chain:
            self._check_backup(link)
        backup = base["backup"]
        return {"id": base["id"], "target": backup["target"],
                "target_format": backup["target_format"]}

    def _chain_of(self, base: dict) -> list[dict]:
        """The checkpoint and those below it that change tracking still knows."""
        chain, seen = [], set()
        while base is not None and base["id"] not in seen:
            chain.append(base)
            seen.add(base["id"])
            below = base["backup"].get("base")
            base = self.tracker.find(below) if below else None
        return chain

    @staticmethod
    def _check_backup(checkpoint: dict) -> None:
        """A completed backup still as it was: the same file (identity), the
        same copy map (its id), and not written since it was sealed."""
        backup = checkpoint["backup"]
        try:
            found = identity_of(backup["target"])
            st = os.stat(backup["target"])
            copymap = CopyMap.open(copymap_path(backup["target"]))
        except (OSError, ValueError) as e:
            raise UserError(f"base {backup['target']}: {e}; take a full backup") from None
        try:
            sealed = backup.get("sealed")
            if (found != backup["target_id"] or copymap.info.get("id") != checkpoint["id"]
                    or copymap.info.get("state") != "completed"
                    or (sealed and sealed != [st.st_size, st.st_mtime_ns])):
                raise UserError(f"base {backup['target']}: not the completed backup that was "
                                "taken there (replaced or changed since); take a full backup")
        finally:
            copymap.close()

    async def _start(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)
        try:
            await self._nursery.start(snapshot.run, self.engine, self.spawner,
                                      self._lifeline_read, lambda: self._ended(snapshot))
        except BaseException:
            if snapshot in self.snapshots:
                self.snapshots.remove(snapshot)
            raise
        await self._save_state()

    async def _ended(self, snapshot: Snapshot) -> None:
        if snapshot in self.snapshots:
            self.snapshots.remove(snapshot)
            await self._save_state()

    async def release(self, mountpoint: str, lazy: bool = False) -> None:
        async with self._changing:
            await self._release(mountpoint, lazy)

    async def _release(self, mountpoint: str, lazy: bool) -> None:
        snapshot = self.find(mountpoint)
        if snapshot.failure is not None:  # never brought back: nothing runs
            self.snapshots.remove(snapshot)
            await self._save_state()
            return
        await snapshot.release(lazy)

    async def umount(self, lazy: bool) -> None:
        """Release every snapshot, then unmount the live disk; refused,
        changing nothing, while any of them is in use (unless `lazy`)."""
        async with self._changing:
            await self._umount(lazy)

    async def _umount(self, lazy: bool) -> None:
        live = self.cfg.live
        if not lazy:
            held = [(live, await trio.to_thread.run_sync(mounts.holders, live))]
            held += [(s.request.snapshot, await s.holders()) for s in self.snapshots
                     if s.failure is None and not s.releasing]
            for point, what in held:
                if what:
                    raise UserError(f"{point} is busy, in use by {', '.join(what)}; "
                                    "nothing unmounted")
        self.stopping = True
        try:
            for snapshot in list(self.snapshots):
                await self._release(snapshot.request.snapshot, lazy)
            if lazy:
                await trio.to_thread.run_sync(mounts.lazy_unmount, live)
                return
            why = await trio.to_thread.run_sync(mounts.unmount, live)
        except BaseException:
            self.stopping = False
            raise
        if why is not None:
            self.stopping = False
            held = await trio.to_thread.run_sync(mounts.holders, live)
            raise UserError(f"{live}: {why}" + (f", in use by {', '.join(held)}" if held else "")
                            + "; its snapshots were released")

    async def _end_snapshots(self) -> None:
        """At the stop: end every snapshot (see the module's docstring)."""
        self.stopping = True
        for snapshot in list(self.snapshots):
            if snapshot.failure is not None:
                continue
            if self.forced:
                await snapshot.kill()
            elif not snapshot.releasing:
                try:
                    await snapshot.release()
                except UserError as e:  # in use: detach, end when let go
                    log.warning("%s; detaching it, it ends when its last user lets go", e)
                    await snapshot.release(lazy=True)
            await snapshot.ended.wait()

    # --- after a crash --------------------------------------------------

    async def _bring_back(self, previous: dict | None) -> list[str]:
        """Bring back the snapshots the last daemon left active; returns one
        line for each that could not be."""
        if not previous:
            return []
        warnings = []
        for saved in previous.get("snapshots", []):
            request = SnapshotRequest.from_dict(saved["request"])
            snapshot = Snapshot(request, self.source, self.cfg.format, self.cfg.name,
                                self.instance, self.tracker)
            try:
                self._clear_dead_mount(request.snapshot, previous.get("instance"))
                await trio.to_thread.run_sync(snapshot.reopen, saved)
                snapshot.begin(self.engine)
                await self._start(snapshot)
                log.info("snapshot %s brought back", snapshot.file)
            except UserError as e:
                snapshot.discard()
                snapshot.failure = f"not brought back after the daemon died: {e}"
                snapshot.saved_entry = saved
                self.snapshots.append(snapshot)
                warnings.append(f"snapshot {request.snapshot} {snapshot.failure}")
                log.error("snapshot %s %s", request.snapshot, snapshot.failure)
        await self._settle_boundaries()
        await self._save_state()
        return warnings

    async def _settle_boundaries(self) -> None:
        """After bringing snapshots back: a boundary whose backup is not
        running any more gives its changes back; one whose job completed
        before the crash is a checkpoint."""
        running = {s.id: s for s in self.snapshots if s.failure is None}
        for boundary in list(self.tracker.boundaries):
            if boundary["state"] != "pending":
                continue
            snapshot = running.get(boundary["id"])
            if snapshot is None:
                self.tracker.abandon(boundary["id"])
            elif snapshot.job.state != "running":
                await snapshot.settle_checkpoint()
        await trio.to_thread.run_sync(self.tracker.save)

    @staticmethod
    def _clear_dead_mount(point: str, instance: str | None) -> None:
        """Detach what the dead instance left on a snapshot's mount point:
        only a snapshot mount of that instance, and only if no daemon answers
        for it (the state file may be stale, or planted)."""
        mount = mounts.find_mount(point)
        if mount is None:
            return
        if (instance and mount.source == fsname(instance)
                and mount.fstype == mounts.SNAPSHOT_FSTYPE and not protocol.listening(instance)):
            mounts.lazy_unmount(point)
        else:
            raise UserError(f"{point}: something else is mounted there")

    async def _save_state(self) -> None:
        """Record the active snapshots (in a worker thread: a file operation
        must never block the thread that serves the live mount)."""
        await trio.to_thread.run_sync(self._write_state)

    def _write_state(self) -> None:
        entries = []
        for snapshot in self.snapshots:
            if snapshot.failure is not None:
                entries.append(snapshot.saved_entry)
            elif snapshot.job is not None:
                entries.append(snapshot.saved())
        self.state.save({"instance": self.instance, "source": identity(self.source.fd),
                         "live": self.cfg.live, "pid": os.getpid(), "snapshots": entries})

    # --- what the control socket answers ---------------------------------

    def status(self) -> dict:
        cfg = self.cfg
        return {
            "source": cfg.source,
            "format": cfg.format,
            "size": self.source.size,
            "live": cfg.file,
            "live_dir": cfg.live,
            "pid": os.getpid(),
            "started": self.started_at,
            "state_dir": self.state.dir,
            "bytes_changed": self.tracker.bytes_changed(),
            "checkpoints": [{"target": b["backup"]["target"], "sync": b["backup"]["sync"],
                             "created": b["backup"]["created"]}
                            for b in self.tracker.boundaries if b["state"] == "checkpoint"],
            "change_tracking_reset": self.tracker.invalid,
            "snapshots": [s.status() for s in self.snapshots],
        }

    async def export(self, mountpoint: str, where: dict) -> str:
        """Serve a snapshot over NBD; its address once nbdkit listens."""
        snapshot = self.find(mountpoint)
        if snapshot.failure is not None or snapshot.releasing or snapshot.process is None:
            raise UserError(f"{mountpoint}: not being served (failed or being released)")
        if "socket" in where:
            for other in self.snapshots:
                if any(e.where == where for e in other.exports):
                    raise UserError(f"{where['socket']}: already exported there")
            if os.path.lexists(where["socket"]):
                raise UserError(f"{where['socket']}: exists already")
        export = await snapshot.export(where, self.state.dir)
        return export.describe()

    def changes(self, mountpoint: str) -> dict:
        """What an incremental snapshot copies: the extents changed since its
        base, as `qemu-img map --output=json` lists extents."""
        snapshot = self.find(mountpoint)
        if snapshot.changed is None:
            raise UserError(f"{mountpoint}: not an incremental backup (snapfs changes lists what "
                            "an incremental copies)")
        return {"base": snapshot.base["target"], "granularity": GRANULARITY,
                "extents": extents(snapshot.changed, self.tracker.clusters, GRANULARITY,
                                   self.source.size)}
