"""The system under test: snapfs, driven through its command line as a user
drives it (`snapfs mount`, `snapshot`, `status --json`, `wait`, `umount`), so
that its start-up and its processes are measured as they are in use.

A SnapfsInstance is one live disk of a source image and the snapshots taken of
it: `mount_live` (`snapfs mount SOURCE LIVE`, the live disk alone) then
`take_snapshot` (`snapfs snapshot LIVE SNAPSHOT --target T --sync S`) as often
as wanted, or `mount_with_snapshot` (`snapfs mount SOURCE LIVE SNAPSHOT
--target T`, the live disk and one snapshot in one command). Each snapshot gets
its own mount directory (snap, snap2, ...). The live process (`python -m
snapfs.daemon`) serves the live disk; each snapshot is served by a process of
its own, a descendant of the live process: forked by a spawner the live
process forks before trio starts (so with the live process's command line), or,
in the versions before the spawner, a new interpreter (`python -m
snapfs.daemon.snapshot_server`). `status --json` gives every snapshot's pid.
`release` ends a snapshot (`snapfs release SNAPSHOT`), the live disk going on.
`cleanup` unmounts the live disk and every snapshot and stops every process,
however the measure ended.

Every `snapfs` command runs in WORKDIR/snapfs: the daemon starts as `python -m
snapfs.daemon`, which puts the current directory first on its module path, so
a run from a directory holding another `snapfs` package (a checkout with
uncommitted edits, say) would measure that code instead of the installed one.

Change tracking: once a backup that can be a base for incremental ones has
completed (a FULL, say), the live disk tracks the clusters changed since, and
that outlives the mount: after a clean `snapfs umount` the state directory
keeps its `changes/` (CHANGES_DIR). The bench's sources are fresh copies, so
an instance removes the state directory before it mounts and after it stops:
every instance starts with no backup ever taken (nothing tracked).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

from snapfs.mounts import lazy_unmount

from benchlib.host import (MeasureError, alive, descendants, is_mounted, log, remove, run,
                           sleeps_uninterruptibly, stop_pids, pss, timed, vm_hwm)

#: the modules the processes of a snapfs instance run (`python -m MODULE CONFIG`)
DAEMON_MODULES = ("snapfs.daemon", "snapfs.daemon.snapshot_server")
#: what a clean `snapfs umount` leaves in the state directory: change tracking
CHANGES_DIR = "changes"


@dataclass
class SnapfsSnapshot:
    dir: str  # its mount point
    path: str  # the snapshot image, in `dir`
    target: str  # the backup target file
    sync: str  # what the background copy copies: none, full, top


class SnapfsInstance:
    """One snapfs instance on `source`, mounted under WORKDIR/snapfs. Used as a
    context manager: leaving it unmounts everything and stops every process of
    the instance, however the measure ended."""

    def __init__(self, workdir: str, source: str, note: Callable[[str], None]):
        self.source = source
        self.note = note
        self.base = os.path.join(workdir, "snapfs")
        self.name = os.path.basename(source)
        self.live_dir = os.path.join(self.base, "live")
        self.live = os.path.join(self.live_dir, self.name)
        #: the live disk's state directory: the daemon's log, the active snapshots
        self.state_dir = source + ".snapfs-live"
        self.snapshots: list[SnapfsSnapshot] = []
        self.pids: list[int] = []  # the live process first, then its children
        self.mount_seconds: float | None = None  # of `snapfs mount`
        self.snapshot_seconds: list[float] = []  # of each `snapfs snapshot`

    def __enter__(self) -> "SnapfsInstance":
        os.makedirs(self.live_dir, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # --- making mounts

    def _new_snapshot(self, target: str, sync: str) -> SnapfsSnapshot:
        """The next snapshot's mount directory (snap, snap2, snap3, ...), made, and
        the leftovers of an earlier target removed. It is listed before the command
        that mounts it runs, so that cleanup covers it if the command fails."""
        n = len(self.snapshots) + 1
        directory = os.path.join(self.base, "snap" if n == 1 else f"snap{n}")
        os.makedirs(directory, exist_ok=True)
        remove(target, target + ".snapfs")
        snapshot = SnapfsSnapshot(directory, os.path.join(directory, self.name), target, sync)
        self.snapshots.append(snapshot)
        return snapshot

    def mount_live(self) -> None:
        """`snapfs mount SOURCE LIVE`, timed (mount_seconds): the live disk alone."""
        self._clear_state()
        self.mount_seconds = timed(["snapfs", "mount", self.source, self.live_dir], timeout=600,
                                   cwd=self.base)
        self._learn_pids()

    def mount_with_snapshot(self, target: str, sync: str) -> SnapfsSnapshot:
        """`snapfs mount SOURCE LIVE SNAPSHOT --target TARGET --sync SYNC --force`,
        timed (mount_seconds); the live disk and its first snapshot."""
        self._clear_state()
        snapshot = self._new_snapshot(target, sync)
        self.mount_seconds = timed(
            ["snapfs", "mount", self.source, self.live_dir, snapshot.dir,
             "--target", target, "--sync", sync, "--force"], timeout=600, cwd=self.base)
        self._learn_pids()
        return snapshot

    def take_snapshot(self, target: str, sync: str, wait: bool = False) -> SnapfsSnapshot:
        """`snapfs snapshot LIVE SNAPSHOT --target TARGET --sync SYNC --force`
        (with `wait`, --wait: until its background copy ends) on the mounted
        live disk, timed (appended to snapshot_seconds)."""
        snapshot = self._new_snapshot(target, sync)
        try:
            self.snapshot_seconds.append(timed(
                ["snapfs", "snapshot", self.live_dir, snapshot.dir,
                 "--target", target, "--sync", sync, "--force", *(["--wait"] if wait else [])],
                timeout=600, cwd=self.base))
        finally:  # its process is a child of the live process
            self.pids += [p for p in descendants(self.pids[0]) if p not in self.pids]
        return snapshot

    def _clear_state(self) -> None:
        """Before a mount: no state directory left by an earlier instance that
        did not stop cleanly, or `snapfs mount` would try to bring its
        snapshots back (and fail: the bench's sources are fresh copies); nor
        the change tracking a clean stop keeps (the source is a fresh copy,
        with no backup taken)."""
        if os.path.isdir(self.state_dir):
            if not self._only_change_tracking():
                self.note(f"{self.state_dir} was left by an earlier snapfs instance; removed")
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _only_change_tracking(self) -> bool:
        """Whether the state directory holds nothing but change tracking
        (what a clean stop keeps once a backup completed)."""
        try:
            return set(os.listdir(self.state_dir)) <= {CHANGES_DIR}
        except OSError:
            return False

    def _learn_pids(self) -> None:
        """The live process's pid (from `snapfs status`), its children's and the
        snapshot processes' (from the status, should one not be a child): what
        cleanup stops if `snapfs umount` does not. Called after every command
        that starts a process (each snapshot is served by one)."""
        info = self.status()
        pids = descendants(info["pid"])
        pids += [s["pid"] for s in info["snapshots"] if s.get("pid") and s["pid"] not in pids]
        self.pids = pids

    # --- asking the instance

    @property
    def snapshot(self) -> str:
        """The first snapshot's image (the one the measures read)."""
        return self.snapshots[0].path

    @property
    def snapshot_files(self) -> list[str]:
        """Every snapshot's image, in the order taken."""
        return [s.path for s in self.snapshots]

    @property
    def startup_seconds(self) -> float | None:
        return self.mount_seconds

    def status(self) -> dict:
        """`snapfs status LIVE --json`: the live disk, with a list of its snapshots."""
        return json.loads(run(["snapfs", "status", self.live_dir, "--json"], timeout=60,
                              cwd=self.base).stdout)

    def snapshot_status(self, index: int = 0) -> dict:
        """`snapfs status SNAPSHOT --json` of the index-th snapshot: its state,
        bytes_done, clusters_copied_by_writes, pid, ..."""
        return json.loads(run(["snapfs", "status", self.snapshots[index].dir, "--json"],
                              timeout=60, cwd=self.base).stdout)

    def wait(self, index: int = 0) -> None:
        """Until the index-th snapshot's background copy has ended (`snapfs wait`)."""
        run(["snapfs", "wait", self.snapshots[index].dir], timeout=7200, cwd=self.base)

    def release(self, index: int = 0) -> None:
        """`snapfs release SNAPSHOT` of the index-th snapshot: it ends, the live
        disk goes on (its process exits; cleanup still covers its mount)."""
        run(["snapfs", "release", self.snapshots[index].dir], timeout=300, cwd=self.base)

    def processes(self) -> list[int]:
        """The live process, its descendants and every snapshot's process, now."""
        pids = descendants(self.pids[0])
        with_status = [s["pid"] for s in self.status()["snapshots"] if s.get("pid")]
        return pids + [p for p in with_status if p not in pids]

    def peak_rss(self) -> int:
        """Sum of VmHWM of the live process and its descendants (the spawner,
        the snapshot processes). Forked processes share the pages they have
        not written since the fork: the sum counts those once per process, an
        upper bound."""
        return sum(vm_hwm(p) for p in self.processes())

    def pss_now(self) -> int:
        """Sum of the proportional set sizes of the same processes, now: the
        memory they use, each shared page counted once in all."""
        return sum(pss(p) for p in self.processes())

    # --- stopping

    def cleanup(self) -> None:
        """`snapfs umount`; what it leaves mounted is unmounted lazily and what it
        leaves running is stopped, and the report says so (with the end of the
        daemon's log, which a clean umount removes)."""
        clean, unmounted = True, False
        if is_mounted(self.live_dir):
            try:
                run(["snapfs", "umount", self.live_dir], timeout=300, cwd=self.base)
                unmounted = True
            except MeasureError as e:
                log(f"snapfs umount failed ({e}); forcing")
                clean = False
        leftover = [d for d in (self.live_dir, *(s.dir for s in self.snapshots))
                    if is_mounted(d)]
        for d in leftover:
            lazy_unmount(d)
        pids = self._our_pids()
        if unmounted:  # the live process has exited; its snapshot processes end with it
            deadline = time.monotonic() + 5
            while any(alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
        if any(alive(p) for p in pids):
            clean = False
        stop_pids(pids)
        if leftover or not clean:
            self._show_log()
            self.note(f"snapfs instance on {self.name} did not stop "
                      "cleanly; it was unmounted with fusermount3 -u -z and stopped")
        if os.path.isdir(self.state_dir) and not any(alive(p) for p in pids):
            if unmounted and clean and not leftover and not self._only_change_tracking():
                self.note(f"snapfs umount returned 0 but left {os.path.basename(self.state_dir)} "
                          "behind with more than its change tracking (a clean umount keeps "
                          "only that); removed")
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _show_log(self, lines: int = 20) -> None:
        """The end of the daemon's log (SOURCE.snapfs-live/log), on stderr."""
        path = os.path.join(self.state_dir, "log")
        try:
            with open(path, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return
        log(f"the end of {path}:\n" + "\n".join(f"    {line}" for line in tail))

    def _our_pids(self) -> list[int]:
        """Every process of the instance we know of: the ones learnt, the live
        process's descendants now, and those found by their command line (all
        of them when `snapfs mount` failed before we learnt a pid)."""
        pids = list(self.pids)
        if pids and alive(pids[0]):
            pids += [p for p in descendants(pids[0]) if p not in pids]
        return pids + [p for p in self._find_pids(quiet=bool(pids)) if p not in pids]

    def _find_pids(self, quiet: bool = False) -> list[int]:
        """Our processes when `snapfs mount` failed before we learnt their pid:
        `python -m snapfs.daemon` (the live process, its spawner and the
        snapshot processes forked from it) and `python -m
        snapfs.daemon.snapshot_server` (a snapshot's, before the spawner) whose
        configuration names a path in WORKDIR/snapfs (the live disk's or the
        snapshot's mount point).
        Processes in state D are left out (and named, unless `quiet`)."""
        pids, skipped = [], []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                if sleeps_uninterruptibly(int(entry)):
                    skipped.append(entry)
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        argv = f.read().decode(errors="replace").split("\0")
                except OSError:
                    continue
                if is_instance_process(argv, self.base):
                    pids.append(int(entry))
        if skipped and not quiet:
            log(f"looking for our snapfs processes: pids {', '.join(skipped)} sleep "
                "uninterruptibly, their command lines were not read")
        return pids


def is_instance_process(argv: list[str], base: str) -> bool:
    """Whether a command line is a snapfs daemon process (the live one or a
    snapshot's) with a path under `base` in its configuration."""
    try:
        module = argv[argv.index("-m") + 1]
    except (ValueError, IndexError):
        return False
    return module in DAEMON_MODULES and any(base + os.sep in arg for arg in argv)


def snapfs_python() -> str | None:
    """The interpreter of the `snapfs` command (its shebang)."""
    path = shutil.which("snapfs")
    if not path:
        return None
    with open(path, "rb") as f:
        first = f.readline().decode(errors="replace")
    return first[2:].strip().split()[0] if first.startswith("#!") else None
