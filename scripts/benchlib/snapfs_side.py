"""The system under test: snapfs, driven through its command line as a user
drives it (`snapfs mount`, `status --json`, `wait`, `umount`), so that its
start-up and its processes are measured as they are in use.

A SnapfsInstance is one live disk of a source image and the snapshots taken of
it. Today one command makes the live disk and its one snapshot
(`mount_with_snapshot`). When `snapfs mount SOURCE LIVE` (the live disk alone),
`snapfs snapshot LIVE SNAPSHOT --target T --sync S` and `snapfs release
SNAPSHOT` exist, they become `mount_live`, `take_snapshot` and `release` here,
each a few lines: `_new_snapshot` gives every snapshot its own mount directory
(snap, snap2, ...) and clears its target, `_learn_pids` picks up the processes
a command started, and `cleanup` already unmounts the live disk and all the
snapshots and stops every process.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from snapfs.mounts import lazy_unmount

from benchlib.host import (MeasureError, alive, descendants, is_mounted, log, remove, run,
                           stop_pids, timed, vm_hwm)


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
        self.snapshots: list[SnapfsSnapshot] = []
        self.pids: list[int] = []  # the daemon first, then its children
        self.mount_seconds: float | None = None  # of `snapfs mount`

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
        remove(target, target + ".snapfs", target + ".snapfs.log")
        snapshot = SnapfsSnapshot(directory, os.path.join(directory, self.name), target, sync)
        self.snapshots.append(snapshot)
        return snapshot

    def mount_with_snapshot(self, target: str, sync: str) -> SnapfsSnapshot:
        """`snapfs mount SOURCE LIVE SNAPSHOT --target TARGET --sync SYNC --force`,
        timed (mount_seconds); the live disk and its first snapshot."""
        snapshot = self._new_snapshot(target, sync)
        self.mount_seconds = timed(
            ["snapfs", "mount", self.source, self.live_dir, snapshot.dir,
             "--target", target, "--sync", sync, "--force"], timeout=600)
        self._learn_pids()
        return snapshot

    def _learn_pids(self) -> None:
        """The daemon's pid (from `snapfs status`) and its children's: what
        cleanup stops if `snapfs umount` does not. Call it again after every
        command that starts a process (a snapshot is served by a child)."""
        self.pids = descendants(self.status()["pid"])

    # --- asking the instance

    @property
    def snapshot(self) -> str:
        """The first snapshot's image (the one the measures read)."""
        return self.snapshots[0].path

    @property
    def startup_seconds(self) -> float | None:
        return self.mount_seconds

    def status(self) -> dict:
        return json.loads(run(["snapfs", "status", self.live_dir, "--json"], timeout=60).stdout)

    def wait(self) -> None:
        """Until the background copy has ended (`snapfs wait`)."""
        run(["snapfs", "wait", self.live_dir], timeout=7200)

    def peak_rss(self) -> int:
        """Sum of VmHWM of the daemon and its children (the snapshot process)."""
        pids = descendants(self.pids[0])
        return sum(vm_hwm(p) for p in pids)

    # --- stopping

    def cleanup(self) -> None:
        """`snapfs umount`; what it leaves mounted is unmounted lazily and what it
        leaves running is stopped, and the report says so."""
        clean = True
        if is_mounted(self.live_dir):
            try:
                run(["snapfs", "umount", self.live_dir], timeout=300)
            except MeasureError as e:
                log(f"snapfs umount failed ({e}); forcing")
                clean = False
        leftover = [d for d in (self.live_dir, *(s.dir for s in self.snapshots))
                    if is_mounted(d)]
        for d in leftover:
            lazy_unmount(d)
        pids = self.pids or self._find_pids()
        if any(alive(p) for p in pids):
            clean = False
        stop_pids(pids)
        if leftover or not clean:
            self.note(f"snapfs instance on {self.name} did not stop "
                      "cleanly; it was unmounted with fusermount3 -u -z and stopped")

    def _find_pids(self) -> list[int]:
        """Our daemons when `snapfs mount` failed before we learnt their pid: the
        processes running snapfs.daemon with this work directory in their arguments."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read().decode(errors="replace")
                except OSError:
                    continue
                if "snapfs.daemon" in cmdline and self.live_dir in cmdline:
                    pids.append(int(entry))
        return pids


def snapfs_python() -> str | None:
    """The interpreter of the `snapfs` command (its shebang)."""
    path = shutil.which("snapfs")
    if not path:
        return None
    with open(path, "rb") as f:
        first = f.readline().decode(errors="replace")
    return first[2:].strip().split()[0] if first.startswith("#!") else None
