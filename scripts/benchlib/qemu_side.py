"""The QEMU anchor: qemu-storage-daemon doing snapfs' job, driven over QMP.

- live disk and snapshot (qemu_cbw): a copy-before-write filter over the raw
  source with a qcow2 target (backing: the source), exported writable over
  FUSE as the live disk, and a snapshot-access node over it exported read-only
  as the snapshot; with several targets, one filter per target, stacked;
- a snapshot of a running live disk (qemu_fleece): image fleecing, as QEMU
  7.2 takes one without a pause (it cannot insert a filter under a running
  export): a qcow2 target backed by the source, blockdev-backup sync none into
  it, the target exported read-only over FUSE;
- background copy (qemu_backup_daemon + qemu_backup): blockdev-backup (sync
  full / top) from a raw source node to a raw target node, timed until
  BLOCK_JOB_COMPLETED;
- change tracking (qemu_plain_disk + qemu_backup_with_bitmap): a qcow2 image
  exported writable over FUSE, with or without a persistent dirty bitmap
  added (in one transaction with a FULL blockdev-backup) before the writes.
  QEMU keeps dirty bitmaps in memory and stores persistent ones in the qcow2
  image when it closes it (a raw image can have none that persist), so a
  write costs it a bit set in memory: not the same durability as snapfs'
  change map, which is synced before the first write to a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from typing import Callable

from snapfs.mounts import lazy_unmount, mount_table

from benchlib.host import MeasureError, is_mounted, pss, remove, run, vm_hwm, wait_for


class Qmp:
    """A minimal QMP client over a unix socket."""

    def __init__(self, path: str, timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise MeasureError(f"no QMP monitor at {path}") from None
                time.sleep(0.01)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self._read(timeout)  # the greeting
        self.command("qmp_capabilities")

    def _read(self, timeout: float) -> dict:
        self.sock.settimeout(timeout)
        try:
            line = self.file.readline()
        except socket.timeout:
            raise MeasureError(f"QMP: no answer after {timeout:.0f} s") from None
        if not line:
            raise MeasureError("QMP: the monitor closed the connection")
        return json.loads(line)

    def command(self, name: str, timeout: float = 60, **arguments) -> object:
        """Its return value; events that arrive meanwhile are kept for wait_event."""
        message = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read(timeout)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise MeasureError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeasureError(f"QMP: no {name} event after {timeout:.0f} s")
            self.events.append(self._read(left))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()


class QemuDaemon:
    """A qemu-storage-daemon with a QMP monitor, in WORKDIR/qemu. Used as a
    context manager: it is up (its FUSE exports mounted) inside, and stopped
    after, with QMP quit, then SIGTERM, then SIGKILL, its FUSE exports
    unmounted if left behind."""

    def __init__(self, workdir: str, name: str, args: list[str], mountpoints: list[str],
                 note: Callable[[str], None]):
        self.name = name
        self.note = note
        self.dir = os.path.join(workdir, "qemu")
        self.socket = os.path.join(self.dir, f"{name}.qmp")
        self.log = os.path.join(self.dir, f"{name}.log")
        self.args = args
        self.mountpoints = mountpoints
        self.process: subprocess.Popen | None = None
        self.qmp: Qmp | None = None
        self.ready_seconds: float | None = None  # start until the exports are mounted
        # the exported files of a live-disk daemon (qemu_cbw)
        self.live: str | None = None
        self.snapshot: str | None = None
        self.snapshot_files: list[str] = []

    def __enter__(self) -> "QemuDaemon":
        os.makedirs(self.dir, exist_ok=True)
        remove(self.socket)
        for mp in self.mountpoints:
            if not os.path.exists(mp):
                open(mp, "w").close()
        try:
            with open(self.log, "w") as log_file:
                start = time.perf_counter()
                self.process = subprocess.Popen(
                    ["qemu-storage-daemon", *self.args,
                     "--chardev", f"socket,id=m,path={self.socket},server=on,wait=off",
                     "--monitor", "chardev=m"],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
            if self.mountpoints:
                wait_for(self._exports_up, 60, f"qemu-storage-daemon {self.name} exports")
            self.ready_seconds = time.perf_counter() - start
            self.qmp = Qmp(self.socket)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _exports_up(self) -> bool:
        if self.process.poll() is not None:
            with open(self.log) as f:
                why = f.read().strip().splitlines()[-1:] or [f"exit {self.process.returncode}"]
            raise MeasureError(f"qemu-storage-daemon {self.name} exited: {why[0]}")
        table = {m.point: m.fstype for m in mount_table()}
        return all(table.get(os.path.realpath(mp), "").startswith("fuse")
                   for mp in self.mountpoints)

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        clean = True
        if self.process is not None and self.process.poll() is None and self.qmp is not None:
            try:
                self.qmp.command("quit", timeout=30)
                self.process.wait(timeout=60)
            except (MeasureError, OSError, subprocess.TimeoutExpired):
                clean = False
        if self.qmp is not None:
            self.qmp.close()
        leftover = [mp for mp in self.mountpoints if is_mounted(mp)]
        for mp in leftover:
            lazy_unmount(mp)
        if self.process is not None and self.process.poll() is None:
            clean = False
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if leftover or not clean:
            self.note(f"qemu-storage-daemon {self.name} did not stop cleanly; "
                      "it was unmounted with fusermount3 -u -z and stopped")

    @property
    def startup_seconds(self) -> float | None:
        return self.ready_seconds

    def peak_rss(self) -> int:
        return vm_hwm(self.process.pid)

    def pss_now(self) -> int:
        return pss(self.process.pid)


def qemu_cbw(workdir: str, source: str, targets: list[str],
             note: Callable[[str], None]) -> QemuDaemon:
    """The anchor's live disk and snapshot: copy-before-write + snapshot-access.
    Creates the qcow2 targets now; the daemon starts when the context is entered.

    With several targets the filters are stacked, the first over the source and
    each next over the one before, the live disk on the top one: a first write
    copies the old cluster to every target, as snapfs does for each of its
    snapshots. `snapshot_files` lists one export per target (`snapshot` is the
    first). With no target, the live disk is the raw source node, exported
    writable (qemu_fleece takes a snapshot of it later).
    """
    qdir = os.path.join(workdir, "qemu")
    live = os.path.join(qdir, "live.img")
    args = ["--blockdev", f"file,node-name=srcf,filename={source}",
            "--blockdev", "raw,node-name=src,file=srcf"]
    snapshots, exports = [], []
    below = "src"
    for i, target in enumerate(targets):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", source, "-F", "raw", target])
        n = "" if i == 0 else str(i + 1)  # one filter: the node names of old
        snapshot = os.path.join(qdir, f"snap{n}.img")
        args += ["--blockdev", f"file,node-name=tgtf{n},filename={target}",
                 "--blockdev", f"qcow2,node-name=tgt{n},file=tgtf{n},backing=src",
                 "--blockdev", f"copy-before-write,node-name=cbw{n},file={below},target=tgt{n}",
                 "--blockdev", f"snapshot-access,node-name=acc{n},file=cbw{n}"]
        exports += ["--export", f"fuse,id=e{i + 2},node-name=acc{n},mountpoint={snapshot}"]
        snapshots.append(snapshot)
        below = f"cbw{n}"
    args += ["--export", f"fuse,id=e1,node-name={below},mountpoint={live},writable=on", *exports]
    daemon = QemuDaemon(workdir, "cbw", args, [live, *snapshots], note)
    daemon.live, daemon.snapshot_files = live, snapshots
    daemon.snapshot = snapshots[0] if snapshots else None
    return daemon


def qemu_fleece(daemon: QemuDaemon, source: str, target: str) -> float:
    """A snapshot of the running live disk of `qemu_cbw(..., [])`, taken as QEMU
    7.2 can while the disk stays exported (image fleecing, what libvirt does
    for a pull-mode backup): `qemu-img create` of a qcow2 target backed by the
    source, blockdev-add of it with the source node as its backing,
    blockdev-backup sync none from the source into it (the job puts a
    copy-before-write filter above the source), block-export-add of the target
    read-only over FUSE. Seconds from `qemu-img create` until the export is
    mounted; the export is WORKDIR/qemu/fleece.img (daemon.snapshot)."""
    mountpoint = os.path.join(daemon.dir, "fleece.img")
    daemon.mountpoints.append(mountpoint)  # cleanup unmounts it if left behind
    open(mountpoint, "w").close()
    remove(target)
    start = time.perf_counter()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", source, "-F", "raw", target])
    daemon.qmp.command("blockdev-add", driver="file", filename=target,
                       **{"node-name": "fleecef"})
    daemon.qmp.command("blockdev-add", driver="qcow2", file="fleecef", backing="src",
                       **{"node-name": "fleece"})
    daemon.qmp.command("blockdev-backup", device="src", target="fleece", sync="none",
                       **{"job-id": "fleece"})
    daemon.qmp.command("block-export-add", type="fuse", id="fleece", writable=False,
                       mountpoint=mountpoint, **{"node-name": "fleece"})
    wait_for(lambda: is_mounted(mountpoint), 60, "qemu-storage-daemon fleecing export")
    seconds = time.perf_counter() - start
    daemon.snapshot = mountpoint
    daemon.snapshot_files.append(mountpoint)
    return seconds


def qemu_backup_daemon(workdir: str, source: str, target: str,
                       note: Callable[[str], None]) -> QemuDaemon:
    """A plain qemu-storage-daemon with raw source and target nodes."""
    return QemuDaemon(workdir, "backup", [
        "--blockdev", f"file,node-name=srcf,filename={source},read-only=on",
        "--blockdev", "raw,node-name=src,file=srcf,read-only=on",
        "--blockdev", f"file,node-name=tgtf,filename={target}",
        "--blockdev", "raw,node-name=tgt,file=tgtf",
    ], [], note)


def qemu_backup(daemon: QemuDaemon, sync: str) -> float:
    """blockdev-backup until BLOCK_JOB_COMPLETED; seconds."""
    start = time.perf_counter()
    daemon.qmp.command("blockdev-backup", **{"job-id": "bench", "device": "src",
                                             "target": "tgt", "sync": sync})
    event = daemon.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=7200)
    seconds = time.perf_counter() - start
    if event["data"].get("error"):
        raise MeasureError(f"blockdev-backup failed: {event['data']['error']}")
    return seconds


def qemu_plain_disk(workdir: str, source: str, note: Callable[[str], None]) -> QemuDaemon:
    """A qcow2 image (node `src`) exported writable over FUSE as the live disk
    (WORKDIR/qemu/live.img), with no filter: change tracking, if any, is a
    dirty bitmap on `src` (qemu_backup_with_bitmap)."""
    live = os.path.join(workdir, "qemu", "live.img")
    daemon = QemuDaemon(workdir, "plain", [
        "--blockdev", f"file,node-name=srcf,filename={source}",
        "--blockdev", "qcow2,node-name=src,file=srcf",
        "--export", f"fuse,id=e1,node-name=src,mountpoint={live},writable=on",
    ], [live], note)
    daemon.live = live
    return daemon


def qemu_backup_with_bitmap(daemon: QemuDaemon, target: str, size: int) -> float:
    """What an incremental backup scheme starts with: one transaction adding a
    persistent dirty bitmap to `src` and starting a FULL blockdev-backup of it
    into a raw `target` (created here, `size` bytes); returns once the job
    completed (seconds). From then on every write to the disk sets bits."""
    remove(target)
    with open(target, "wb") as f:
        f.truncate(size)
    qmp = daemon.qmp
    qmp.command("blockdev-add", driver="file", filename=target, **{"node-name": "tgtf"})
    qmp.command("blockdev-add", driver="raw", file="tgtf", **{"node-name": "tgt"})
    start = time.perf_counter()
    qmp.command("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "src", "name": "bench", "persistent": True}},
        {"type": "blockdev-backup",
         "data": {"job-id": "full", "device": "src", "target": "tgt", "sync": "full"}},
    ])
    event = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=7200)
    seconds = time.perf_counter() - start
    if event["data"].get("error"):
        raise MeasureError(f"blockdev-backup failed: {event['data']['error']}")
    qmp.command("blockdev-del", **{"node-name": "tgt"})  # the backup is over, as a release
    qmp.command("blockdev-del", **{"node-name": "tgtf"})
    found = _bitmap(daemon)
    if found is None or not found.get("persistent"):
        raise MeasureError("qemu-storage-daemon: no persistent dirty bitmap 'bench' on src")
    return seconds


def qemu_bitmap_count(daemon: QemuDaemon) -> int | None:
    """Bytes the dirty bitmap 'bench' on `src` marks dirty, or None without one."""
    bitmap = _bitmap(daemon)
    return None if bitmap is None else int(bitmap["count"])


def _bitmap(daemon: QemuDaemon) -> dict | None:
    """The dirty bitmap 'bench' of node `src` as query-named-block-nodes shows it."""
    for node in daemon.qmp.command("query-named-block-nodes", flat=True):
        if node.get("node-name") == "src":
            for bitmap in node.get("dirty-bitmaps", []):
                if bitmap.get("name") == "bench":
                    return bitmap
    return None
