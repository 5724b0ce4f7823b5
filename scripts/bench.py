#!/usr/bin/env python3
"""Side-by-side benchmark: snapfs against qemu-storage-daemon (the QEMU anchor).

One run measures both systems on the same freshly generated images, taking
turns (the order flips with every repetition), repeats every measure
(--repeat, default 3) and reports medians. The page cache is dropped before
every cold measure. The result table, with ratios snapfs vs QEMU and the
targets, goes to stdout and, with a description of the machine, to
docs/benchmarks.md (--output).

The QEMU anchor:
- mounts: a copy-before-write filter over the raw source with a qcow2 target
  (backing: the source), exported writable over FUSE as the live disk, and a
  snapshot-access node over it exported read-only as the snapshot;
- background copy: blockdev-backup (sync full / top) from a raw source node to
  a raw target node, timed until BLOCK_JOB_COMPLETED.

Run it through scripts/bench (as root), which installs what it needs. Standard
library only. Every mount is unmounted and every daemon stopped, even when a
measure fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CLUSTER = 64 * KiB  # snapfs' default cluster size and qcow2's default cluster size
SYSTEMS = ("snapfs", "qemu")
GROUPS = ("write", "copy", "top", "memory")
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_T0 = time.monotonic()


class MeasureError(Exception):
    """A measure could not be taken (the other measures go on)."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind through every `finally` and clean up."""


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def size_text(n: int) -> str:
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?B)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


# --- processes, mounts, page cache ----------------------------------------

def run(cmd: list[str], *, timeout: float = 3600, check: bool = True,
        **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{' '.join(cmd[:3])}...: no answer after {timeout:.0f} s") from None
    if check and result.returncode != 0:
        why = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
        raise MeasureError(f"{' '.join(cmd[:4])}... exited with {result.returncode}: {why[0]}")
    return result


def timed(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    run(cmd, **kwargs)
    return time.perf_counter() - start


class PageCache:
    dropped_ok = True

    @classmethod
    def drop(cls) -> None:
        """`sync; echo 3 > /proc/sys/vm/drop_caches`."""
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            if cls.dropped_ok:
                log(f"WARNING: cannot drop the page cache ({e.strerror}): cold figures are warm")
            cls.dropped_ok = False

    @staticmethod
    def load(path: str) -> None:
        """Read a file so that it sits in the page cache."""
        with open(path, "rb", buffering=0) as f:
            while f.read(4 * MiB):
                pass


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) from /proc/self/mountinfo."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            table.append((_unescape(fields[4]), fields[sep + 1]))
    return table


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    return any(mp == path for mp, _ in mounts())


def mounts_under(directory: str) -> list[str]:
    directory = os.path.realpath(directory).rstrip("/") + "/"
    return [mp for mp, _ in reversed(mounts()) if mp.startswith(directory)]


def lazy_unmount(path: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", path], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def stop_pids(pids: list[int], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, to processes we started."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        left = [p for p in pids if alive(p)]
        if not left:
            return
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in left):
            time.sleep(0.05)
    for p in pids:  # reap our own children, if they are
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p, os.WNOHANG)


def vm_hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise MeasureError(f"no VmHWM for pid {pid}")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.002):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise MeasureError(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)


# --- snapfs -----------------------------------------------------------------

class Snapfs:
    """One snapfs instance: `snapfs mount SOURCE LIVE SNAP --target TARGET`."""

    def __init__(self, bench: "Bench", source: str, target: str, sync: str):
        self.bench = bench
        self.source, self.target, self.sync = source, target, sync
        base = os.path.join(bench.workdir, "snapfs")
        self.live_dir, self.snap_dir = os.path.join(base, "live"), os.path.join(base, "snap")
        name = os.path.basename(source)
        self.live = os.path.join(self.live_dir, name)
        self.snapshot = os.path.join(self.snap_dir, name)
        self.pids: list[int] = []
        self.mount_seconds: float | None = None

    def __enter__(self) -> "Snapfs":
        for d in (self.live_dir, self.snap_dir):
            os.makedirs(d, exist_ok=True)
        remove(self.target, self.target + ".snapfs", self.target + ".snapfs.log")
        try:
            self.mount_seconds = timed(
                ["snapfs", "mount", self.source, self.live_dir, self.snap_dir,
                 "--target", self.target, "--sync", self.sync, "--force"], timeout=600)
            info = self.status()
            self.pids = descendants(info["pid"])
        except BaseException:
            self.cleanup()
            raise
        return self

    def status(self) -> dict:
        return json.loads(run(["snapfs", "status", self.live_dir, "--json"], timeout=60).stdout)

    def wait(self) -> None:
        run(["snapfs", "wait", self.live_dir], timeout=7200)

    def peak_rss(self) -> int:
        """Sum of VmHWM of the daemon and its children (the snapshot process)."""
        pids = descendants(self.pids[0])
        return sum(vm_hwm(p) for p in pids)

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        clean = True
        if is_mounted(self.live_dir):
            try:
                run(["snapfs", "umount", self.live_dir], timeout=300)
            except MeasureError as e:
                log(f"snapfs umount failed ({e}); forcing")
                clean = False
        leftover = [d for d in (self.live_dir, self.snap_dir) if is_mounted(d)]
        for d in leftover:
            lazy_unmount(d)
        pids = self.pids or self._find_pids()
        if any(alive(p) for p in pids):
            clean = False
        stop_pids(pids)
        if leftover or not clean:
            self.bench.note(f"snapfs instance on {os.path.basename(self.source)} did not stop "
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


# --- QEMU -------------------------------------------------------------------

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
    """A qemu-storage-daemon with a QMP monitor; stopped with QMP quit, then
    SIGTERM, then SIGKILL, its FUSE exports unmounted if left behind."""

    def __init__(self, bench: "Bench", name: str, args: list[str], mountpoints: list[str]):
        self.bench = bench
        self.name = name
        self.dir = os.path.join(bench.workdir, "qemu")
        self.socket = os.path.join(self.dir, f"{name}.qmp")
        self.log = os.path.join(self.dir, f"{name}.log")
        self.args = args
        self.mountpoints = mountpoints
        self.process: subprocess.Popen | None = None
        self.qmp: Qmp | None = None
        self.ready_seconds: float | None = None

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
        table = {mp: fstype for mp, fstype in mounts()}
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
            self.bench.note(f"qemu-storage-daemon {self.name} did not stop cleanly; "
                            "it was unmounted with fusermount3 -u -z and stopped")

    def peak_rss(self) -> int:
        return vm_hwm(self.process.pid)


def qemu_cbw(bench: "Bench", source: str, target: str) -> QemuDaemon:
    """The anchor's live disk and snapshot: copy-before-write + snapshot-access."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", source, "-F", "raw", target])
    qdir = os.path.join(bench.workdir, "qemu")
    live, snap = os.path.join(qdir, "live.img"), os.path.join(qdir, "snap.img")
    daemon = QemuDaemon(bench, "cbw", [
        "--blockdev", f"file,node-name=srcf,filename={source}",
        "--blockdev", "raw,node-name=src,file=srcf",
        "--blockdev", f"file,node-name=tgtf,filename={target}",
        "--blockdev", "qcow2,node-name=tgt,file=tgtf,backing=src",
        "--blockdev", "copy-before-write,node-name=cbw,file=src,target=tgt",
        "--blockdev", "snapshot-access,node-name=acc,file=cbw",
        "--export", f"fuse,id=e1,node-name=cbw,mountpoint={live},writable=on",
        "--export", f"fuse,id=e2,node-name=acc,mountpoint={snap}",
    ], [live, snap])
    daemon.live, daemon.snapshot = live, snap
    return daemon


def qemu_backup_daemon(bench: "Bench", source: str, target: str) -> QemuDaemon:
    """A plain qemu-storage-daemon with raw source and target nodes."""
    return QemuDaemon(bench, "backup", [
        "--blockdev", f"file,node-name=srcf,filename={source},read-only=on",
        "--blockdev", "raw,node-name=src,file=srcf,read-only=on",
        "--blockdev", f"file,node-name=tgtf,filename={target}",
        "--blockdev", "raw,node-name=tgt,file=tgtf",
    ], [])


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


# --- helpers ------------------------------------------------------------------

def remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def fill_random(path: str, size: int, chunk: int = 4 * MiB) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def copy_file(source: str, dest: str) -> None:
    remove(dest)
    run(["cp", "--sparse=always", source, dest])


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fio(args: list[str], rw: str) -> float:
    """Runs fio (psync), returns the IOPS of `rw` ("read" or "write")."""
    out = run(["fio", "--name=bench", "--ioengine=psync", "--fallocate=none",
               "--allow_file_create=0", "--output-format=json", *args], timeout=3600).stdout
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    if job.get("error"):
        raise MeasureError(f"fio: error {job['error']}")
    return float(job[rw]["iops"])


def dd_write(source: str, dest: str, size: int) -> float:
    """dd bs=1M of `size` bytes with conv=notrunc,fdatasync; MB/s (input cached first)."""
    PageCache.load(source)
    seconds = timed(["dd", f"if={source}", f"of={dest}", "bs=1M", f"count={size // MiB}",
                     "conv=notrunc,fdatasync", "status=none"])
    return size / seconds / 1e6


def dd_read_cold(path: str, size: int) -> float:
    PageCache.drop()
    seconds = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
    return size / seconds / 1e6


def compare(path: str, reference: str, block_reads: bool) -> str | None:
    """None if the files are equal, else where they differ. With block_reads
    the file is read with dd bs=1M (the QEMU 7.2 snapshot-access bug)."""
    if block_reads:
        cmd = f"dd if={sh(path)} bs=1M status=none | cmp - {sh(reference)}"
    else:
        cmd = f"cmp {sh(path)} {sh(reference)}"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                            text=True, timeout=3600)
    if result.returncode == 0:
        return None
    text = result.stdout.strip() or result.stderr.strip()
    found = re.search(r"differ: (?:char|byte) (\d+)", text)
    if found:
        return f"first difference at byte {int(found.group(1)) - 1:,}"
    return text


def sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def replay_log(path: str, disk: str, clusters: list[int], seed: int) -> None:
    """An fio iolog: one 4 KiB write at a random 4 KiB block of each cluster."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write(f"fio version 2 iolog\n{disk} add\n{disk} open\n")
        for c in clusters:
            f.write(f"{disk} write {c * CLUSTER + rng.randrange(CLUSTER // (4 * KiB)) * 4 * KiB}"
                    f" {4 * KiB}\n")
        f.write(f"{disk} close\n")


# --- the benchmark ----------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.size = args.size
        self.half = args.size // 2
        self.workdir = os.path.realpath(args.workdir)
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.checks: list[tuple[str, str, str]] = []  # (what, system, result)
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.extra: dict[str, dict[str, list[float]]] = {}
        q = args.quick
        self.rand_read_ios = 1024 if q else 16384
        self.rand_over_ios = 1024 if q else 16384
        self.memory_disk = args.memory_disk
        self.memory_writes = 64 * MiB if q else GiB
        self.sparse_share = 0.10
        self.img = lambda name: os.path.join(self.workdir, "img", name)

    # bookkeeping
    def add(self, key: str, system: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(system, []).append(value)
        log(f"  {key:12} {system:7} {value:,.3f}")

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log(f"NOTE: {text}")

    def check(self, what: str, system: str, result: str) -> None:
        self.checks.append((what, system, result))
        log(f"  check {what} ({system}): {result}")

    def median(self, key: str, system: str) -> float | None:
        values = self.samples.get(key, {}).get(system)
        return statistics.median(values) if values else None

    # images
    def prepare(self) -> None:
        os.makedirs(self.img(""), exist_ok=True)
        log(f"generating images in {self.workdir} ({self.size // MiB} MiB)")
        fill_random(self.img("base.img"), self.size)
        fill_random(self.img("input.bin"), self.half)
        # sparse: 10% allocated, in 256 KiB extents scattered over the image
        extent = 256 * KiB
        slots = self.size // extent
        chosen = sorted(random.Random(42).sample(range(slots), max(1, round(slots * self.sparse_share))))
        path = self.img("sparse.img")
        remove(path)
        with open(path, "wb") as f:
            f.truncate(self.size)
            for s in chosen:
                f.seek(s * extent)
                f.write(os.urandom(extent))
        allocated = os.stat(path).st_blocks * 512
        self.sparse_allocated = allocated
        self.note(f"sparse image: {self.size // MiB} MiB virtual, {allocated / MiB:.1f} MiB "
                  f"allocated ({100 * allocated / self.size:.1f}%) in {len(chosen)} extents of "
                  f"{extent // KiB} KiB")
        os.sync()

    # --- measure groups; each is one session of one system
    def group_write(self, system: str, rep: int) -> None:
        """Writes to the live disk, then cold reads of the snapshot, then cmp."""
        disk = self.img("disk.img")
        copy_file(self.img("base.img"), disk)
        PageCache.drop()
        if system == "snapfs":
            instance = Snapfs(self, disk, self.img("snapfs-target.img"), "none")
        else:
            remove(self.img("qemu-target.qcow2"))
            instance = qemu_cbw(self, disk, self.img("qemu-target.qcow2"))
        with instance:
            live, snap = instance.live, instance.snapshot
            self.add("seq_first", system, dd_write(self.img("input.bin"), live, self.half))
            self.add("seq_over", system, dd_write(self.img("input.bin"), live, self.half))
            # one 4 KiB write in each of half of the clusters of the untouched half
            clusters = list(range(self.half // CLUSTER, self.size // CLUSTER))
            rng = random.Random(1000 + rep)
            chosen = rng.sample(clusters, len(clusters) // 2)
            iolog = os.path.join(self.workdir, "first-write.iolog")
            replay_log(iolog, live, chosen, seed=rep)
            self.add("rand_first", system, fio(
                [f"--read_iolog={iolog}", "--replay_no_stall=1", "--end_fsync=1"], "write"))
            self.add("rand_over", system, fio(
                [f"--filename={live}", "--rw=randwrite", "--bs=4k", "--offset=0",
                 f"--size={self.half}", f"--number_ios={self.rand_over_ios}",
                 f"--randseed={rep + 1}", "--end_fsync=1"], "write"))
            if system == "snapfs":
                info = instance.status()
                self.extra.setdefault("clusters_copied_by_writes", {}).setdefault(
                    system, []).append(info["clusters_copied_by_writes"])
            self.add("snap_seq", system, dd_read_cold(snap, self.size))
            PageCache.drop()
            self.add("snap_rand", system, fio(
                [f"--filename={snap}", "--readonly", "--rw=randread", "--bs=4k",
                 f"--size={self.size}", f"--number_ios={self.rand_read_ios}",
                 f"--randseed={rep + 1}"], "read"))
            diff = compare(snap, self.img("base.img"), block_reads=(system == "qemu"))
            if diff is None:
                self.check(f"snapshot == source before the writes (rep {rep + 1})", system, "equal")
            elif system == "qemu":
                self.check(f"snapshot == source before the writes (rep {rep + 1})", system,
                           f"DIFFERENT ({diff}); QEMU 7.2 snapshot-access bug, see notes")
                self.note("QEMU's snapshot differed from the source even read with dd bs=1M (the "
                          "kernel passes smaller requests to the FUSE export): QEMU 7.2's snapshot-access returns post-snapshot data for small reads "
                          "running from a copied area into an uncopied one (fixed in QEMU 8.0, "
                          "a4d5224c2cb6): reported, not counted as a failure")
            else:
                self.check(f"snapshot == source before the writes (rep {rep + 1})", system,
                           f"DIFFERENT ({diff})")
                raise MeasureError(f"snapfs snapshot differs from the source: {diff}")

    def group_copy(self, system: str, rep: int) -> None:
        """FULL background copy of the whole (random) image; the cold source dd and
        the cold cp references ride along with the snapfs turn."""
        base = self.img("base.img")
        if system == "snapfs":
            target = self.img("snapfs-full.img")
            self._snapfs_copy(base, target, "full", "full")
            # references: the plain file
            self.add("src_seq", "source", dd_read_cold(base, self.size))
            dest = self.img("cp.img")
            remove(dest)
            PageCache.drop()
            start = time.perf_counter()
            run(["cp", base, dest])
            self.add("cp", "source", time.perf_counter() - start)
            fsync_file(dest)
            self.add("cp_sync", "source", time.perf_counter() - start)
            remove(dest)
        else:
            self._qemu_copy(base, self.img("qemu-full.img"), "full", "full")

    def group_top(self, system: str, rep: int) -> None:
        sparse = self.img("sparse.img")
        if system == "snapfs":
            self._snapfs_copy(sparse, self.img("snapfs-top.img"), "top", "top")
        else:
            self._qemu_copy(sparse, self.img("qemu-top.img"), "top", "top")

    def _snapfs_copy(self, source: str, target: str, sync: str, key: str) -> None:
        # warm snapfs' own code (Python modules), so that the cold cache is the data's
        python = snapfs_python()
        PageCache.drop()
        if python:
            run([python, "-c", "import snapfs.cli, snapfs.daemon"])
        start = time.perf_counter()
        with Snapfs(self, source, target, sync) as instance:
            instance.wait()
            seconds = time.perf_counter() - start
            fsync_file(target)
            synced = time.perf_counter() - start
            mount_seconds = instance.mount_seconds
        self.add(key, "snapfs", seconds)
        self.add(f"{key}_sync", "snapfs", synced)
        self.add(f"{key}_mount", "snapfs", mount_seconds)
        self._check_target(target, source, key, "snapfs")
        remove(target, target + ".snapfs", target + ".snapfs.log")

    def _qemu_copy(self, source: str, target: str, sync: str, key: str) -> None:
        remove(target)
        with open(target, "wb") as f:
            f.truncate(os.path.getsize(source))
        with qemu_backup_daemon(self, source, target) as daemon:
            PageCache.drop()
            start = time.perf_counter()
            seconds = qemu_backup(daemon, sync)
            fsync_file(target)
            synced = time.perf_counter() - start
        self.add(key, "qemu", seconds)
        self.add(f"{key}_sync", "qemu", synced)
        self._check_target(target, source, key, "qemu")
        remove(target)

    def _check_target(self, target: str, source: str, key: str, system: str) -> None:
        allocated = os.stat(target).st_blocks * 512
        self.extra.setdefault(f"{key}_allocated", {}).setdefault(system, []).append(allocated)
        diff = compare(target, source, block_reads=False)
        what = f"{key.upper()} copy: target == source"
        if diff is None:
            if not any(c[0] == what and c[1] == system for c in self.checks):
                self.check(what, system, "equal")
        else:
            self.check(what, system, f"DIFFERENT ({diff})")
            raise MeasureError(f"{system} {key} copy: target differs from source: {diff}")

    def group_memory(self, system: str, rep: int) -> None:
        """Start-up on a sparse huge disk, then peak RSS after random writes to it."""
        disk = self.img("huge.img")
        remove(disk)
        with open(disk, "wb") as f:
            f.truncate(self.memory_disk)
        if system == "snapfs":
            instance = Snapfs(self, disk, self.img("snapfs-huge-target.img"), "none")
        else:
            remove(self.img("qemu-huge-target.qcow2"))
            instance = qemu_cbw(self, disk, self.img("qemu-huge-target.qcow2"))
        with instance:
            self.add("startup", system,
                     instance.mount_seconds if system == "snapfs" else instance.ready_seconds)
            fio([f"--filename={instance.live}", "--rw=randwrite", "--bs=64k",
                 f"--size={self.memory_disk}", f"--io_size={self.memory_writes}",
                 "--norandommap", f"--randseed={rep + 1}", "--end_fsync=1"], "write")
            self.add("memory", system, instance.peak_rss() / MiB)
        remove(disk, self.img("snapfs-huge-target.img"), self.img("snapfs-huge-target.img.snapfs"),
               self.img("snapfs-huge-target.img.snapfs.log"), self.img("qemu-huge-target.qcow2"))

    def run(self) -> None:
        self.prepare()
        groups = [g for g in GROUPS if g in self.args.groups]
        for rep in range(self.args.repeat):
            order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]
            for group in groups:
                for system in order:
                    log(f"rep {rep + 1}/{self.args.repeat}: {group} — {system}")
                    try:
                        getattr(self, f"group_{group}")(system, rep)
                    except MeasureError as e:
                        self.failures.append(f"rep {rep + 1}, {group}, {system}: {e}")
                        log(f"FAILED: {e}")
                    finally:
                        self.sweep()

    def sweep(self) -> None:
        """Anything still mounted under the work directory: unmount it."""
        for mp in mounts_under(self.workdir):
            self.note(f"{mp} was still mounted after a measure; unmounted (fusermount3 -u -z)")
            lazy_unmount(mp)


def snapfs_python() -> str | None:
    """The interpreter of the `snapfs` command (its shebang)."""
    path = shutil.which("snapfs")
    if not path:
        return None
    with open(path, "rb") as f:
        first = f.readline().decode(errors="replace")
    return first[2:].strip().split()[0] if first.startswith("#!") else None


# --- report -----------------------------------------------------------------

def speed_ratio(snapfs: float, qemu: float, higher_better: bool, better: str,
                worse: str) -> tuple[float, str]:
    """(advantage of snapfs, e.g. 2.0 for twice as good; its wording)."""
    r = snapfs / qemu if higher_better else qemu / snapfs
    return r, (f"{r:.2f}x {better}" if r >= 1 else f"{1 / r:.2f}x {worse}")


def build_rows(b: Bench) -> list[dict]:
    m = b.median
    rows = []

    def fmt(value, unit):
        if value is None:
            return "failed"
        if unit in ("MB/s", "IOPS"):
            return f"{value:,.0f} {unit}"
        if unit == "s":
            return f"{value:.2f} s"
        if unit == "MiB":
            return f"{value:.1f} MiB"
        return f"{value:.2f}"

    def row(label, key, unit, higher_better, target_text, target_ok, better="faster",
            worse="slower", values=None):
        s, q = values if values else (m(key, "snapfs"), m(key, "qemu"))
        if s is None or q is None or not q or not s:
            versus, met = "—", "no figure"
        else:
            r, versus = speed_ratio(s, q, higher_better, better, worse)
            met = ("—" if target_ok is None else
                   "met" if target_ok(s, q, r) else "**NOT met**")
        rows.append({"measure": label, "snapfs": fmt(s, unit), "qemu": fmt(q, unit),
                     "versus": versus, "target": target_text, "met": met})

    half = size_text(b.half)
    row(f"First-write sequential (dd 1M, {half}, fdatasync)", "seq_first", "MB/s", True,
        "≥ 2x QEMU", lambda s, q, r: r >= 2)
    row(f"Overwrite sequential (dd 1M, {half}, fdatasync)", "seq_over", "MB/s", True,
        "≥ 1.5x QEMU", lambda s, q, r: r >= 1.5)
    row("First-write 4 KiB random (fio psync)", "rand_first", "IOPS", True,
        "≥ 1.5x QEMU", lambda s, q, r: r >= 1.5)
    row("Overwrite 4 KiB random (fio psync)", "rand_over", "IOPS", True,
        "≥ 1x QEMU", lambda s, q, r: r >= 1)
    row("Snapshot sequential read, cold (dd 1M)", "snap_seq", "MB/s", True,
        "≥ 1.5x QEMU", lambda s, q, r: r >= 1.5)
    src = m("src_seq", "source")
    ratio = lambda key, sysname: (m(key, sysname) / src) if src and m(key, sysname) else None
    row(f"Snapshot sequential read ÷ cold dd of the source ({fmt(src, 'MB/s')})", None, "x",
        True, "snapfs ≥ 0.83 (within 1.2x of the source)", lambda s, q, r: s >= 1 / 1.2,
        values=(ratio("snap_seq", "snapfs"), ratio("snap_seq", "qemu")))
    row("Snapshot 4 KiB random read, cold (fio psync)", "snap_rand", "IOPS", True,
        "≥ 1x QEMU", lambda s, q, r: r >= 1)
    row(f"FULL background copy, {size_text(b.size)} (until done)", "full", "s", False,
        "≥ 3x faster than QEMU", lambda s, q, r: r >= 3)
    cp = m("cp", "source")
    by_cp = lambda sysname: (m("full", sysname) / cp) if cp and m("full", sysname) else None
    row(f"FULL copy time ÷ cold cp of the file ({fmt(cp, 's')})", None, "x", False,
        "snapfs ≤ 1 (no slower than cp)", lambda s, q, r: s <= 1,
        better="less", worse="more", values=(by_cp("snapfs"), by_cp("qemu")))
    row("FULL copy, until done + fsync of the target", "full_sync", "s", False,
        "(information)", None)
    share = getattr(b, "sparse_allocated", b.size * b.sparse_share) / b.size
    row(f"TOP copy, sparse image ({100 * share:.0f}% allocated)", "top", "s", False,
        "(information)", None)
    def by_full(sysname):
        top, full = m("top", sysname), m("full", sysname)
        if not top or not full:
            return None
        if sysname == "snapfs":  # without snapfs' start-up: QEMU's times exclude it too
            top -= m("top_mount", sysname) or 0
            full -= m("full_mount", sysname) or 0
        return top / full if full > 0 else None

    row(f"TOP time ÷ FULL time, start-up excluded (allocated share {share:.2f})", None, "x", False,
        f"snapfs ≤ {2 * share:.2f} (2x the allocated share)", lambda s, q, r: s <= 2 * share,
        better="less", worse="more", values=(by_full("snapfs"), by_full("qemu")))
    row(f"Peak memory, {size_text(b.memory_disk)} sparse disk, sync none, "
        f"{size_text(b.memory_writes)} of random 64 KiB writes", "memory", "MiB", False,
        "snapfs ≤ 100 MiB", lambda s, q, r: s <= 100, better="less", worse="more")
    row(f"Start-up on a {size_text(b.memory_disk)} sparse image", "startup", "s", False,
        "snapfs ≤ 2 s", lambda s, q, r: s <= 2)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| Measure | snapfs | QEMU | snapfs vs QEMU | Target | Met |\n"
            "|---|---:|---:|---|---|---|\n")
    return head + "".join(
        f"| {r['measure']} | {r['snapfs']} | {r['qemu']} | {r['versus']} | {r['target']} "
        f"| {r['met']} |\n" for r in rows)


LABELS = {
    "seq_first": ("first-write sequential", "MB/s"), "seq_over": ("overwrite sequential", "MB/s"),
    "rand_first": ("first-write 4 KiB random", "IOPS"), "rand_over": ("overwrite 4 KiB random", "IOPS"),
    "snap_seq": ("snapshot sequential read, cold", "MB/s"),
    "snap_rand": ("snapshot 4 KiB random read, cold", "IOPS"),
    "src_seq": ("source file sequential read, cold (dd)", "MB/s"),
    "full": ("FULL copy, until done", "s"), "full_sync": ("FULL copy, + fsync of target", "s"),
    "cp": ("cold cp of the file", "s"), "cp_sync": ("cold cp + fsync", "s"),
    "top": ("TOP copy, until done", "s"), "top_sync": ("TOP copy, + fsync of target", "s"),
    "full_mount": ("FULL copy: of which `snapfs mount`", "s"),
    "top_mount": ("TOP copy: of which `snapfs mount`", "s"),
    "memory": ("peak RSS (VmHWM)", "MiB"), "startup": ("start-up", "s"),
}


def samples_table(b: Bench) -> str:
    lines = ["| Measure | System | Unit | Median | Samples (in order) |", "|---|---|---|---:|---|"]
    for key, (label, unit) in LABELS.items():
        for system in (*SYSTEMS, "source"):
            values = b.samples.get(key, {}).get(system)
            if values:
                digits = 0 if unit in ("MB/s", "IOPS") else 2
                lines.append(f"| {label} | {system} | {unit} | "
                             f"{statistics.median(values):,.{digits}f} | "
                             + ", ".join(f"{v:,.{digits}f}" for v in values) + " |")
    extra = {"clusters_copied_by_writes": ("clusters copied before a write (snapfs status)", ""),
             "full_allocated": ("FULL target, allocated bytes", "MiB"),
             "top_allocated": ("TOP target, allocated bytes", "MiB")}
    for key, (label, unit) in extra.items():
        for system, values in b.extra.get(key, {}).items():
            if unit == "MiB":
                values = [v / MiB for v in values]
            digits = 2 if unit else 0
            lines.append(f"| {label} | {system} | {unit} | "
                         f"{statistics.median(values):,.{digits}f} | "
                         + ", ".join(f"{v:,.{digits}f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def machine() -> list[tuple[str, str]]:
    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return [("CPU", cpu), ("cores", str(os.cpu_count())), ("memory", mem),
            ("kernel", f"{platform.release()} ({platform.machine()})"),
            ("OS", first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]))]


def machine_disk(workdir: str) -> list[tuple[str, str]]:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    fs = out(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", workdir]) or "unknown"
    source = fs.split()[0] if fs != "unknown" else ""
    disk = ""
    if source.startswith("/dev/"):
        parent = out(["lsblk", "-no", "PKNAME", source]).splitlines()
        device = "/dev/" + parent[0] if parent and parent[0] else source
        fields = {name: out(["lsblk", "-dno", name, device]) for name in ("SIZE", "ROTA", "MODEL")}
        if fields["SIZE"]:
            disk = (f"{device}, {fields['SIZE']}, "
                    + ("rotational" if fields["ROTA"] == "1" else "not rotational")
                    + " (as the kernel sees it)"
                    + (f", model {fields['MODEL']}" if fields["MODEL"] else ""))
    return [("work directory", workdir), ("file system", fs), ("disk", disk or "unknown")]


def versions() -> list[tuple[str, str]]:
    def first_line(cmd):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (result.stdout or result.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    python = snapfs_python() or sys.executable
    git = first_line(["git", "-C", ROOT, "describe", "--always", "--dirty", "--abbrev=12"])
    return [
        ("snapfs", f"git {git}"),
        ("python (snapfs)", first_line([python, "-c", "import sys; print(sys.version.split()[0])"])),
        ("pyfuse3", first_line([python, "-c", "import pyfuse3; print(pyfuse3.__version__)"])),
        ("trio", first_line([python, "-c", "import trio; print(trio.__version__)"])),
        ("libfuse (fusermount3)", first_line(["fusermount3", "-V"])),
        ("qemu-storage-daemon", first_line(["qemu-storage-daemon", "--version"])),
        ("fio", first_line(["fio", "--version"])),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]


PREFACE = """\
# Benchmarks: snapfs against qemu-storage-daemon

This file is written by `scripts/bench` (the harness is `scripts/bench.py`). It
compares snapfs with the QEMU anchor, qemu-storage-daemon from the
distribution, doing the same job on the same images:

- **live disk and snapshot**: a `copy-before-write` filter over the raw source
  with a qcow2 target (backing: the source), exported writable over FUSE, and a
  `snapshot-access` node over it exported read-only over FUSE; snapfs runs
  `snapfs mount SOURCE LIVE SNAPSHOT --target TARGET --sync none`;
- **background copy**: `blockdev-backup` (sync `full` or `top`) between raw
  nodes, timed until `BLOCK_JOB_COMPLETED`; snapfs runs `snapfs mount --sync
  full|top` and is timed from the start of `snapfs mount` until `snapfs wait`
  returns (its start-up included).

Why the figures are what they are, where the time goes and what was tried:
[performance.md](performance.md).

## How to run it

As root, on the machine to describe: `scripts/bench` (it installs QEMU, fio and
the venv through `scripts/setup`; then about 4 minutes for the default 1 GiB
image and 3 repetitions on 2 cores). Options: `--size 1G`,
`--repeat 3`, `--workdir /var/tmp/snapfs-bench` (must not be tmpfs; keep it on
the disk you care about), `--output docs/benchmarks.md`, `--quick` (64 MiB, one
repetition: a smoke test, its figures mean nothing), `--groups
write,copy,top,memory` to run part of it.

## How to read it

- Every figure is the **median** of the repetitions; the systems take turns
  (the order flips with every repetition) on fresh copies of the same images.
  All samples are listed below: QEMU's figures in particular swing between
  runs.
- The page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before
  every cold read and before every background copy. Writes use `dd bs=1M
  conv=notrunc,fdatasync` (input already cached) and `fio --ioengine=psync`
  with `--end_fsync=1`: the figures include getting the data to disk.
- "snapfs vs QEMU" says how much better or worse snapfs does: for throughput
  and IOPS snapfs ÷ QEMU, for times and memory QEMU ÷ snapfs, worded as
  *faster*/*slower* or *less*/*more*. Rows marked "÷" are ratios to a
  reference (a plain `dd` or `cp` of the file, or the FULL copy) and are given
  for both systems.
- "First-write" means every write lands on clusters not yet copied, so each
  one first copies the old 64 KiB cluster to the target; "overwrite" means the
  clusters were copied already. The first-write random test writes one 4 KiB
  block in each of half of the clusters of the half of the image that the
  sequential test did not touch (an fio replay log, so no cluster is hit
  twice); the snapshot is then read with about 3/4 of its clusters copied.
- snapfs' background copy times include its start-up (`snapfs mount` until
  `snapfs wait` returns); QEMU's start at `blockdev-backup`, with the daemon
  already running. The TOP ÷ FULL row leaves snapfs' start-up out, so that it
  compares the copies alone. `snapfs wait` polls every 0.1 s: snapfs' copy
  times may run up to 0.1 s late.
- The machine may be shared: the load average before and after the run is
  under "Machine"; treat differences within the spread of the samples as
  noise.
- The "Target" column holds the goals set for snapfs; "Met" says whether the
  median reaches them.
"""


def write_report(b: Bench, rows: list[dict], path: str, elapsed: float,
                 description: list[tuple[str, str]]) -> None:
    parts = [PREFACE, "\n## Results\n\n"]
    parts.append(f"{size_text(b.size)} random image, {b.args.repeat} repetition(s)"
                 + (" (**--quick: smoke test, not a measurement**)" if b.args.quick else "")
                 + f", run took {elapsed / 60:.0f} min.\n\n")
    parts.append(markdown_table(rows))
    if b.failures:
        parts.append("\n**Failed measures:**\n\n" + "".join(f"- {f}\n" for f in b.failures))
    parts.append("\n## Correctness checks\n\n")
    if b.checks:
        parts.append("| Check | System | Result |\n|---|---|---|\n" + "".join(
            f"| {w} | {s} | {r} |\n" for w, s, r in b.checks))
    else:
        parts.append("(none ran)\n")
    parts.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in b.notes))
    if not PageCache.dropped_ok:
        parts.append("- The page cache could not be dropped: \"cold\" figures are warm.\n")
    parts.append("\n## All samples\n\n" + samples_table(b))
    parts.append("\n## Machine\n\n| | |\n|---|---|\n" + "".join(
        f"| {k} | {v} |\n" for k, v in description))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(parts))
    os.replace(tmp, path)


# --- main -------------------------------------------------------------------

def check_environment(args) -> None:
    missing = [t for t in ("snapfs", "qemu-storage-daemon", "qemu-img", "fio", "fusermount3",
                           "dd", "cmp", "cp") if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)} (run it through scripts/bench)")
    if os.geteuid() != 0:
        sys.exit("bench: run it as root (FUSE mounts, dropping the page cache)")
    os.makedirs(args.workdir, exist_ok=True)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", args.workdir], capture_output=True,
                            text=True).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        sys.exit(f"bench: {args.workdir} is on {fstype}; use a directory on a disk (--workdir)")
    if mounts_under(args.workdir):
        sys.exit(f"bench: something is mounted under {args.workdir} already")
    if os.stat(args.workdir).st_dev != os.stat(ROOT).st_dev:
        log(f"WARNING: {args.workdir} is not on the project's file system")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=None,
                        help="size of the random test image (default 1G; 64M with --quick)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions of every measure (default 3; 1 with --quick)")
    parser.add_argument("--workdir", default="/var/tmp/snapfs-bench",
                        help="scratch directory on a real disk (default /var/tmp/snapfs-bench)")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks.md"),
                        help="the report to write (default docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true",
                        help="small and once: a smoke test of the harness")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"measure groups to run (default {','.join(GROUPS)})")
    parser.add_argument("--memory-disk", type=parse_size, default=TiB,
                        help="virtual size of the sparse disk for memory and start-up (1T)")
    args = parser.parse_args(argv)
    args.size = args.size or (64 * MiB if args.quick else GiB)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if unknown := set(args.groups) - set(GROUPS):
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    if args.size % (2 * MiB) or args.size < 4 * MiB:
        parser.error("--size must be a multiple of 2 MiB, at least 4 MiB")
    args.workdir = os.path.abspath(args.workdir)
    check_environment(args)

    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    bench = Bench(args)
    description = machine() + machine_disk(bench.workdir) + versions()
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        bench.run()
    finally:
        bench.sweep()
        if mounts_under(bench.workdir):
            log(f"WARNING: still mounted under {bench.workdir}; leaving its files alone")
        else:
            log(f"removing the images and mount points in {bench.workdir}")
            for name in ("img", "snapfs", "qemu", "first-write.iolog"):
                path = os.path.join(bench.workdir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    remove(path)
            with contextlib.suppress(OSError):
                os.rmdir(bench.workdir)
    rows = build_rows(bench)
    table = markdown_table(rows)
    print(table)
    for f in bench.failures:
        print(f"FAILED: {f}")
    load = ", ".join(f"{x:.2f}" for x in load_before) + " before; " + ", ".join(
        f"{x:.2f}" for x in os.getloadavg()) + " after (1, 5, 15 min)"
    write_report(bench, rows, args.output, time.monotonic() - started,
                 description + [("load average", load)])
    log(f"report written to {args.output}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"bench: interrupted ({e or 'SIGINT'}); everything was unmounted and stopped",
              file=sys.stderr)
        sys.exit(130)
