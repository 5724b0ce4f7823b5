"""Soak test of snapfs (run it through scripts/soak MINUTES).

One live disk over a sample raw image in a temporary directory, for MINUTES:

- fio writers (psync, random block sizes, --verify=crc32c with a verify
  backlog) on the first three quarters of the live disk, in rounds of a few
  seconds; a Python writer (unaligned random writes, now and then an
  fdatasync) on the last quarter, all the time;
- between two fio rounds the disk is quiesced (no fio runs, the Python
  writer waits on a lock), SOURCE itself is read and hashed per 64 KiB block
  (the snapshot's model: an oracle that does not go through snapfs), and
  1-3 snapshots are taken at once, with mixed sync modes (full, top, none,
  incremental once there is a checkpoint), cluster sizes, target formats and
  speeds, so that background jobs run while the writers write;
- reader threads read random block ranges of random active snapshots and
  compare each block with the model, during the background jobs; before a
  snapshot is released it is read whole and compared, and after release a
  completed target (raw, or qcow2 through qemu-img convert and its backing
  chain) is compared with the model too;
- half-way, kill -9 of the daemon and of every snapshot process while the
  Python writer and the readers run, `snapfs umount` (which must say it
  died), `snapfs mount SOURCE LIVE` again, and every snapshot read whole and
  compared with its model.

At the end everything is released, the live disk unmounted, and the figures
printed; exit status 0 only with no mismatch, no error, no leaked mount and
no leaked process. Whatever happens (an exception, Ctrl-C, SIGTERM), the
cleanup unmounts (fusermount3 -u -z) and kills what the soak started.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
BLOCK = 64 << 10  # the model's granularity: one hash per 64 KiB block
SNAPFS = [sys.executable, "-m", "snapfs"]
MAX_ACTIVE = 6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def block_hashes(data: bytes | memoryview, first_block: int = 0) -> dict[int, bytes]:
    view = memoryview(data)
    return {first_block + i: hashlib.blake2b(view[o:o + BLOCK], digest_size=16).digest()
            for i, o in enumerate(range(0, len(view), BLOCK))}


def hash_file(path, size: int) -> list[bytes]:
    """The hash of every 64 KiB block of the first `size` bytes of `path`."""
    out: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, 4 * MiB):
            data = os.pread(fd, min(4 * MiB, size - off), off)
            if len(data) != min(4 * MiB, size - off):
                raise OSError(f"short read of {path} at {off}: {len(data)} bytes")
            view = memoryview(data)
            out.extend(hashlib.blake2b(view[o:o + BLOCK], digest_size=16).digest()
                       for o in range(0, len(view), BLOCK))
    finally:
        os.close(fd)
    return out


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c: dict[str, int] = {}
        self.problems: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n

    def get(self, key: str) -> int:
        return self.c.get(key, 0)

    def problem(self, kind: str, msg: str) -> None:
        self.add(kind)
        with self.lock:
            self.problems.append(f"{kind}: {msg}")
        log(f"!!! {kind}: {msg}")


@dataclass
class Snap:
    name: str
    point: Path
    file: Path
    target: Path
    sync: str
    fmt: str
    cluster: str
    speed: str | None
    model: list[bytes]
    taken_at: float
    base: str | None = None
    readers: int = 0
    releasing: bool = False
    pid: int | None = None
    epoch: int = 0
    args: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, minutes: float, size_mib: int, seed: int, keep: bool,
                 inject: bool = False):
        self.inject = inject
        self.minutes = minutes
        self.size = size_mib * MiB
        self.rng = random.Random(seed)
        self.seed = seed
        self.keep = keep
        self.stats = Stats()
        self.root = Path(tempfile.mkdtemp(prefix="snapfs-soak-", dir=os.environ.get("SOAK_DIR")))
        self.source = self.root / "disk.img"
        self.live_dir = self.root / "live"
        self.live = self.live_dir / "disk.img"
        self.snaps: dict[str, Snap] = {}
        self.all_snaps: dict[str, Snap] = {}
        self.snap_lock = threading.Condition()
        self.quiesce = threading.Lock()  # held by the Python writer per write
        self.stop = threading.Event()
        self.crashing = threading.Event()
        self.epoch = 0  # bumped at each kill -9
        self.pids: set[int] = set()
        self.fio: subprocess.Popen | None = None
        self.threads: list[threading.Thread] = []
        self.fio_region = (self.size * 3 // 4) // (2 * MiB) * (2 * MiB)
        self.counter = 0

    # ---- commands -----------------------------------------------------------

    def snapfs(self, *args, timeout=180, expect=0, what=None) -> subprocess.CompletedProcess:
        argv = [*SNAPFS, *map(str, args)]
        self.stats.add("snapfs commands")
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stats.problem("hangs", f"snapfs {' '.join(map(str, args))} did not return "
                                        f"within {timeout} s")
            return subprocess.CompletedProcess(argv, None, "", "timeout")
        if expect is not None and r.returncode != expect:
            self.stats.problem("errors", f"snapfs {' '.join(map(str, args))} -> {r.returncode} "
                                         f"(expected {expect}): {r.stderr.strip()}")
        return r

    def status(self, path) -> dict | None:
        r = self.snapfs("status", path, "--json", timeout=60)
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)

    def record_pids(self) -> None:
        info = self.status(self.live_dir)
        if info:
            self.pids.add(info["pid"])
            for s in info["snapshots"]:
                if s.get("pid"):
                    self.pids.add(s["pid"])

    # ---- set-up -------------------------------------------------------------

    def make_image(self) -> None:
        """A sparse raw image: random data in about 60% of its 1 MiB extents."""
        rng = random.Random(self.seed)
        with open(self.source, "wb") as f:
            f.truncate(self.size)
            for off in range(0, self.size, MiB):
                if rng.random() < 0.6:
                    f.seek(off)
                    f.write(rng.randbytes(MiB))
        log(f"sample image {self.source}: {self.size // MiB} MiB, sparse")

    # ---- the writers --------------------------------------------------------

    def python_writer(self) -> None:
        rng = random.Random(self.seed + 1)
        lo, hi = self.fio_region, self.size
        fd, fd_epoch = None, 0
        while not self.stop.is_set():
            with self.quiesce:
                epoch = self.epoch
                try:
                    if fd is None:
                        fd_epoch = epoch
                        fd = os.open(self.live, os.O_WRONLY)
                    off = rng.randrange(lo, hi - 1)
                    length = min(rng.randrange(1, 256 << 10), hi - off)
                    data = rng.randbytes(length)
                    if os.pwrite(fd, data, off) != length:
                        self.stats.problem("errors", f"short write at {off}")
                    self.stats.add("python writes")
                    self.stats.add("bytes written", length)
                    if rng.random() < 0.02:
                        os.fdatasync(fd)
                        self.stats.add("fdatasyncs")
                except OSError as e:
                    if fd is not None:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                        fd = None
                    if self.crashing.is_set() or epoch != self.epoch or fd_epoch != epoch:
                        # the daemon died under this write, or this descriptor
                        # was opened before it died (ENOTCONN for good)
                        self.stats.add("expected errors (crash)")
                    else:
                        self.stats.problem("errors", f"python writer: {e!r}")
                    time.sleep(0.05)
            time.sleep(rng.random() * 0.01)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def start_fio(self) -> float:
        """One fio round on the first three quarters of the live disk, in the
        background; returns how many MiB each job writes."""
        per_job = self.fio_region // 2
        io_mib = self.rng.randrange(4, 33)
        bs_hi = self.rng.choice(["16k", "64k", "256k"])
        argv = ["fio", "--name=soak", f"--filename={self.live}", "--ioengine=psync",
                "--rw=randwrite", f"--bsrange=4k-{bs_hi}", "--numjobs=2",
                f"--size={per_job}", f"--offset_increment={per_job}", f"--io_size={io_mib}m",
                "--verify=crc32c", f"--verify_backlog={self.rng.choice([16, 64, 256])}",
                "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                f"--randseed={self.rng.randrange(1 << 30)}", "--invalidate=0",
                "--fallocate=none", "--group_reporting=0", "--output-format=json"]
        self.fio = subprocess.Popen(argv, cwd=self.root, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        self.pids.add(self.fio.pid)
        self.stats.add("fio rounds")
        return io_mib

    def finish_fio(self, timeout: float = 300) -> None:
        proc, self.fio = self.fio, None
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.stats.problem("hangs", f"fio round did not end within {timeout} s")
            return
        try:
            result = json.loads(out[out.index("{"):])
        except ValueError:
            result = None
        if proc.returncode != 0 or result is None:
            self.stats.problem("fio verify failures", f"fio exited {proc.returncode}: "
                               f"{err.strip()[-2000:]} {out.strip()[-2000:]}")
            return
        for job in result["jobs"]:
            if job.get("error"):
                self.stats.problem("fio verify failures", f"fio job error {job['error']}")
            self.stats.add("fio writes", job["write"]["total_ios"])
            self.stats.add("fio verify reads", job["read"]["total_ios"])
            self.stats.add("bytes written", job["write"]["io_bytes"])
            self.stats.add("bytes read", job["read"]["io_bytes"])
            self.stats.add("bytes verified by fio", job["read"]["io_bytes"])

    # ---- checking snapshots -------------------------------------------------

    def compare(self, snap: Snap, data: bytes, offset: int, what: str) -> bool:
        first = offset // BLOCK
        bad = [b for b, h in block_hashes(data, first).items() if h != snap.model[b]]
        self.stats.add("bytes verified", len(data))
        if bad:
            self.stats.problem("mismatches", f"{what}: snapshot {snap.name} ({snap.sync}, "
                               f"{snap.fmt}, cluster {snap.cluster}) differs from its model in "
                               f"{len(bad)} of the 64 KiB blocks read, first at offset "
                               f"{bad[0] * BLOCK}")
            self.save_evidence(snap, data, offset, bad[0])
            return False
        return True

    def save_evidence(self, snap: Snap, data: bytes, offset: int, block: int) -> None:
        """The first few wrong blocks, as read, beside the temporary directory."""
        if self.stats.get("mismatches") > 5:
            return
        ev = self.root.parent / f"snapfs-soak-evidence-{os.getpid()}"
        ev.mkdir(exist_ok=True)
        o = block * BLOCK - offset
        (ev / f"{snap.name}-block{block}.bin").write_bytes(data[o:o + BLOCK])
        log(f"    evidence in {ev}")

    def acquire(self, snap: Snap) -> bool:
        with self.snap_lock:
            if snap.releasing or snap.name not in self.snaps:
                return False
            snap.readers += 1
            return True

    def let_go(self, snap: Snap) -> None:
        with self.snap_lock:
            snap.readers -= 1
            self.snap_lock.notify_all()

    def reader(self, seed: int) -> None:
        rng = random.Random(seed)
        nblocks = self.size // BLOCK
        while not self.stop.is_set():
            with self.snap_lock:
                choices = [s for s in self.snaps.values() if not s.releasing]
            if not choices:
                time.sleep(0.1)
                continue
            snap = rng.choice(choices)
            if not self.acquire(snap):
                continue
            epoch = self.epoch
            try:
                first = rng.randrange(nblocks)
                count = min(rng.randrange(1, 17), nblocks - first)
                try:
                    with open(snap.file, "rb", buffering=0) as f:
                        data = os.pread(f.fileno(), count * BLOCK, first * BLOCK)
                except OSError as e:
                    if self.crashing.is_set() or epoch != self.epoch:
                        self.stats.add("expected errors (crash)")
                    else:
                        self.stats.problem("errors", f"reading {snap.name}: {e!r}")
                    time.sleep(0.05)
                    continue
                self.stats.add("snapshot reads")
                self.stats.add("bytes read", len(data))
                if len(data) != count * BLOCK:
                    self.stats.problem("mismatches", f"short read of {snap.name} at "
                                       f"{first * BLOCK}: {len(data)} of {count * BLOCK}")
                    continue
                self.compare(snap, data, first * BLOCK, "random read")
            finally:
                self.let_go(snap)
            time.sleep(rng.random() * 0.02)

    def check_whole(self, snap: Snap, why: str) -> None:
        """Read the whole snapshot through its mount and compare it with its model."""
        t = time.monotonic()
        try:
            with open(snap.file, "rb", buffering=0) as f:
                for off in range(0, self.size, MiB):
                    data = os.pread(f.fileno(), MiB, off)
                    self.stats.add("bytes read", len(data))
                    if len(data) != min(MiB, self.size - off):
                        self.stats.problem("mismatches", f"short read of {snap.name} at {off}")
                        return
                    if not self.compare(snap, data, off, f"whole read ({why})"):
                        return
        except OSError as e:
            self.stats.problem("errors", f"whole read of {snap.name} ({why}): {e!r}")
            return
        self.stats.add("whole snapshot checks")
        log(f"  {snap.name} ({snap.sync}) whole read OK ({why}, {time.monotonic() - t:.1f} s)")

    def check_target(self, snap: Snap) -> None:
        """A completed job's target, after release: the point-in-time image."""
        path = snap.target
        converted = None
        if snap.fmt == "qcow2":
            converted = self.root / "converted.raw"
            r = subprocess.run(["qemu-img", "convert", "-O", "raw", str(snap.target),
                                str(converted)], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                self.stats.problem("errors", f"qemu-img convert {snap.target}: {r.stderr}")
                return
            path = converted
        try:
            hashes = hash_file(path, self.size)
            self.stats.add("bytes read", self.size)
            self.stats.add("bytes verified", self.size)
            bad = [i for i, (a, b) in enumerate(zip(hashes, snap.model)) if a != b]
            if os.path.getsize(path) != self.size:
                self.stats.problem("mismatches", f"target {path} has size "
                                   f"{os.path.getsize(path)}")
            elif bad:
                self.stats.problem("mismatches", f"completed target of {snap.name} "
                                   f"({snap.sync}, {snap.fmt}) differs from the model in "
                                   f"{len(bad)} blocks, first at offset {bad[0] * BLOCK}")
            else:
                self.stats.add("targets checked")
                log(f"  {snap.name} target OK ({snap.sync}, {snap.fmt})")
        finally:
            if converted is not None:
                converted.unlink(missing_ok=True)

    # ---- snapshots ----------------------------------------------------------

    def take_snapshots(self, at_least: int = 0) -> None:
        """Quiesce, hash SOURCE (the model), take 1-3 snapshots at once (or
        enough for `at_least` active ones)."""
        room = MAX_ACTIVE - len(self.snaps)
        if room <= 0:
            return
        n = min(room, max(self.rng.randrange(1, 4), at_least - len(self.snaps)))
        info = self.status(self.live_dir)
        has_checkpoint = bool(info and info.get("checkpoints"))
        with self.quiesce:
            t = time.monotonic()
            model = hash_file(self.source, self.size)  # SOURCE itself, not through snapfs
            if self.inject:  # the oracle's own test: one byte changed after the model was made
                self.inject = False
                off = self.rng.randrange(self.size)
                fd = os.open(self.live, os.O_RDWR)
                try:
                    os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0x5A]), off)
                finally:
                    os.close(fd)
                log(f"injected: one byte at {off} changed between the model and the snapshot")
            self.stats.add("bytes read", self.size)
            if self.rng.random() < 0.3:  # the live disk reads as SOURCE does
                live = hash_file(self.live, self.size)
                self.stats.add("bytes read", self.size)
                self.stats.add("bytes verified", self.size)
                bad = [i for i, (a, b) in enumerate(zip(live, model)) if a != b]
                if bad:
                    self.stats.problem("mismatches", f"live disk differs from SOURCE in "
                                       f"{len(bad)} blocks, first at {bad[0] * BLOCK}")
                else:
                    self.stats.add("live disk checks")
            taken = []
            for _ in range(n):
                self.counter += 1
                name = f"s{self.counter:03d}"
                modes = ["full", "top", "none"] + (["incremental"] * 2 if has_checkpoint else [])
                sync = self.rng.choice(modes)
                fmt = ("qcow2" if sync == "incremental" else
                       "raw" if sync == "none" else self.rng.choice(["raw", "qcow2"]))
                cluster = self.rng.choice(["4K", "64K", "64K", "1M"])
                speed = self.rng.choice([None, "8M", "16M", "32M"]) if sync != "none" else None
                point = self.root / "snaps" / name
                point.mkdir(parents=True)
                target = self.root / "targets" / f"{name}.{fmt}"
                target.parent.mkdir(exist_ok=True)
                args = ["snapshot", self.live_dir, point, "--target", target, "--sync", sync,
                        "--target-format", fmt, "--cluster-size", cluster]
                if speed:
                    args += ["--speed", speed]
                r = self.snapfs(*args)
                if r.returncode != 0:
                    continue
                snap = Snap(name, point, point / "disk.img", target, sync, fmt, cluster, speed,
                            model, time.time(), args=[str(a) for a in args])
                taken.append(snap)
            dt = time.monotonic() - t
        for snap in taken:
            st = self.status(snap.point)
            if st:
                snap.pid = st.get("pid")
                snap.base = st.get("base")
                if snap.pid:
                    self.pids.add(snap.pid)
            with self.snap_lock:
                self.snaps[snap.name] = snap
                self.all_snaps[snap.name] = snap
            self.stats.add("snapshots taken")
            self.stats.add(f"snapshots taken, {snap.sync}")
        if taken:
            log(f"took {', '.join(f'{s.name} ({s.sync} {s.fmt} {s.cluster} speed {s.speed})' for s in taken)}"
                f" in a {dt:.1f} s pause")

    def release(self, snap: Snap, why: str) -> None:
        with self.snap_lock:
            snap.releasing = True
            while snap.readers:
                self.snap_lock.wait()
        st = self.status(snap.point)
        state = st["state"] if st else None
        self.check_whole(snap, f"before release, job {state}")
        r = self.snapfs("release", snap.point)
        with self.snap_lock:
            del self.snaps[snap.name]
        if r.returncode != 0:
            return
        self.stats.add("snapshots released")
        log(f"released {snap.name} ({snap.sync}, job {state}; {why})")
        if state == "completed":
            self.stats.add("jobs completed")
            self.check_target(snap)
        self.prune_targets()

    def chain(self, target: str | None) -> set[str]:
        out = set()
        by_target = {str(s.target): s for s in self.all_snaps.values()}
        while target and target not in out:
            out.add(target)
            s = by_target.get(target)
            target = s.base if s else None
        return out

    def prune_targets(self) -> None:
        """Delete released targets that no incremental can build on any more:
        keep the chains of active snapshots and of the last checkpoint."""
        info = self.status(self.live_dir)
        if not info:
            return
        keep = set()
        for s in self.snaps.values():
            keep |= self.chain(str(s.target))
        cps = sorted(info.get("checkpoints") or [], key=lambda c: c.get("created") or 0)
        for c in cps[-1:]:
            keep |= self.chain(c["target"])
        for s in self.all_snaps.values():
            if s.name not in self.snaps and str(s.target) not in keep and s.target.exists():
                s.target.unlink()
                Path(str(s.target) + ".snapfs").unlink(missing_ok=True)

    def maybe_release(self) -> None:
        for snap in list(self.snaps.values()):
            st = self.status(snap.point)
            if st is None:
                continue
            state = st["state"]
            age = time.time() - snap.taken_at
            if state == "failed":
                self.stats.problem("errors", f"{snap.name}: job failed: {st.get('error')}")
                self.release(snap, "failed")
            elif state in ("completed", "cancelled") and self.rng.random() < 0.5:
                self.release(snap, "job ended")
            elif age > 20 and self.rng.random() < 0.15:
                self.release(snap, "at random, job still running" if state == "running"
                             else "at random")
            elif age > 90:
                self.release(snap, "old")

    # ---- the crash ----------------------------------------------------------

    def crash_and_resume(self) -> None:
        info = self.status(self.live_dir)
        if not info:
            return
        victims = [info["pid"]] + [s["pid"] for s in info["snapshots"] if s.get("pid")]
        log(f"kill -9 of the daemon {info['pid']} and its snapshot processes {victims[1:]} "
            f"({len(self.snaps)} snapshots active; Python writer and readers running)")
        self.crashing.set()
        self.epoch += 1
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in victims):
            if time.monotonic() > deadline:
                self.stats.problem("hangs", "killed processes still there after 30 s")
                break
            time.sleep(0.05)
        self.stats.add("kill -9")
        time.sleep(self.rng.random())  # readers and the writer meet the dead mounts
        with self.quiesce:
            r = self.snapfs("umount", self.live_dir, expect=1)
            if r.returncode == 1 and "died" not in r.stderr:
                self.stats.problem("errors", f"umount after kill -9 said: {r.stderr.strip()}")
            r = self.snapfs("mount", self.source, self.live_dir)
            if r.returncode == 0 and r.stderr.strip():
                self.stats.problem("errors", f"mount after kill -9 warned: {r.stderr.strip()}")
            self.epoch += 1
            self.crashing.clear()
        self.stats.add("resumes")
        self.record_pids()
        info = self.status(self.live_dir) or {"snapshots": []}
        back = {s["snapshot_dir"] for s in info["snapshots"] if s["state"] != "failed"}
        for snap in list(self.snaps.values()):
            if str(snap.point) not in back:
                self.stats.problem("errors", f"{snap.name} not brought back after kill -9")
                with self.snap_lock:
                    del self.snaps[snap.name]
                continue
            self.stats.add("snapshots brought back")
            self.check_whole(snap, "just after kill -9 and resume")
        log(f"resumed: {len(back)} snapshots back")

    # ---- the run ------------------------------------------------------------

    def run(self) -> None:
        self.make_image()
        self.live_dir.mkdir()
        r = self.snapfs("mount", self.source, self.live_dir)
        if r.returncode != 0:
            raise RuntimeError("mount failed")
        self.record_pids()
        start = time.monotonic()
        deadline = start + self.minutes * 60
        crash_at = start + self.minutes * 60 / 2
        crashed = False
        self.threads = [threading.Thread(target=self.python_writer, daemon=True)]
        self.threads += [threading.Thread(target=self.reader, args=(self.seed + 10 + i,),
                                          daemon=True) for i in range(2)]
        for t in self.threads:
            t.start()
        self.take_snapshots()
        while time.monotonic() < deadline:
            self.start_fio()
            while self.fio.poll() is None:
                self.maybe_release()
                time.sleep(0.5)
            self.finish_fio()
            if not crashed and time.monotonic() >= crash_at:
                if len(self.snaps) < 3:  # a crash with several snapshots to bring back
                    self.take_snapshots(at_least=3)
                    time.sleep(2)
                self.crash_and_resume()
                crashed = True
            if self.rng.random() < 0.6:
                self.take_snapshots()
            log(f"{int(time.monotonic() - start)} s: {len(self.snaps)} active, "
                f"{self.stats.get('snapshots taken')} taken, "
                f"{self.stats.get('bytes written') // MiB} MiB written, "
                f"{self.stats.get('bytes verified') // MiB} MiB verified, "
                f"mismatches {self.stats.get('mismatches')}, errors {self.stats.get('errors')}")
        if not crashed:  # a run too short to reach the middle still crashes once
            if len(self.snaps) < 3:
                self.take_snapshots(at_least=3)
            self.crash_and_resume()
        self.stop.set()
        for t in self.threads:
            t.join(60)
        log("end: releasing every snapshot")
        for snap in list(self.snaps.values()):
            st = self.status(snap.point)
            if st and st["state"] == "running" and snap.sync != "none" and \
                    self.rng.random() < 0.5:
                self.snapfs("wait", "--quiet", snap.point, timeout=600)
            self.release(snap, "end of the run")
        r = self.snapfs("umount", self.live_dir)
        self.unmounted = r.returncode == 0

    # ---- cleanup and leaks --------------------------------------------------

    def our_mounts(self) -> list[str]:
        out = []
        root = str(self.root)
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].encode().decode("unicode_escape")
                if point == root or point.startswith(root + "/"):
                    out.append(point)
        return out

    def our_processes(self) -> list[int]:
        found = set()
        for p in self.pids:
            if os.path.exists(f"/proc/{p}") and not _zombie(p):
                found.add(p)
        me = os.getpid()
        needle = os.fsencode(str(self.root))
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read() and not _zombie(int(entry)):
                        found.add(int(entry))
            except OSError:
                pass
        return sorted(found)

    def cleanup(self) -> tuple[int, int, int, int]:
        """Stop everything; returns the mounts and processes found before this
        cleanup had to do anything by force, then those still there after it."""
        self.stop.set()
        if self.fio is not None and self.fio.poll() is None:
            self.fio.kill()
            self.fio.wait()
        leaked_mounts = self.our_mounts()
        leaked_procs = self.our_processes()
        if leaked_mounts:
            subprocess.run([*SNAPFS, "umount", str(self.live_dir)], capture_output=True,
                           timeout=120)
        for point in sorted(self.our_mounts(), key=len, reverse=True):
            subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
        for p in self.our_processes():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for t in self.threads:
            t.join(10)
        time.sleep(0.5)
        left_mounts, left_procs = self.our_mounts(), self.our_processes()
        if not self.keep and not left_mounts:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.keep:
            log(f"kept {self.root}")
        return len(leaked_mounts), len(leaked_procs), len(left_mounts), len(left_procs)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def main() -> int:
    p = argparse.ArgumentParser(description="soak test of snapfs")
    p.add_argument("minutes", type=float)
    p.add_argument("--size", type=int, default=256, help="image size in MiB (default 256)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--inject-mismatch", action="store_true",
                   help="test the oracle: change one byte of the live disk between the first "
                        "snapshot's model and the snapshot (the soak must then fail)")
    a = p.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background (SIG_IGN)
    soak = Soak(a.minutes, a.size, seed, a.keep, a.inject_mismatch)
    commit = os.environ.get("SOAK_COMMIT") or subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True).stdout.strip()
    import snapfs
    log(f"snapfs from {Path(snapfs.__file__).parent}")
    log(f"soak: {a.minutes} min, {a.size} MiB image, seed {seed}, commit {commit or '?'}, "
        f"in {soak.root}")
    t0 = time.monotonic()
    interrupted = False
    soak.unmounted = False
    try:
        soak.run()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    except Exception:
        soak.stats.problem("errors", "the soak itself failed:\n" + traceback.format_exc())
    finally:
        before_mounts, before_procs, leaked_mounts, leaked_procs = soak.cleanup()
        if interrupted:  # nothing to blame snapfs for: what the run had up was cut short
            log(f"cleaned up {before_mounts} mounts and {before_procs} processes by force")
        else:  # the run unmounted everything itself: anything left has leaked
            leaked_mounts = max(leaked_mounts, before_mounts)
            leaked_procs = max(leaked_procs, before_procs)
    s = soak.stats
    ops = (s.get("fio writes") + s.get("fio verify reads") + s.get("python writes")
           + s.get("snapshot reads") + s.get("snapfs commands"))
    figures = [
        ("minutes", f"{(time.monotonic() - t0) / 60:.1f}"),
        ("seed", seed),
        ("image", f"{a.size} MiB"),
        ("operations", ops),
        ("  fio writes", s.get("fio writes")),
        ("  fio verify reads", s.get("fio verify reads")),
        ("  python writes", s.get("python writes")),
        ("  fdatasyncs", s.get("fdatasyncs")),
        ("  snapshot reads", s.get("snapshot reads")),
        ("  snapfs commands", s.get("snapfs commands")),
        ("fio rounds", s.get("fio rounds")),
        ("bytes written", s.get("bytes written")),
        ("bytes read", s.get("bytes read")),
        ("bytes verified", s.get("bytes verified") + s.get("bytes verified by fio")),
        ("  against snapshot models", s.get("bytes verified")),
        ("  by fio", s.get("bytes verified by fio")),
        ("snapshots taken", s.get("snapshots taken")),
        *((f"  {m}", s.get(f"snapshots taken, {m}")) for m in
          ("full", "top", "none", "incremental")),
        ("snapshots released", s.get("snapshots released")),
        ("jobs completed", s.get("jobs completed")),
        ("completed targets checked", s.get("targets checked")),
        ("whole snapshot checks", s.get("whole snapshot checks")),
        ("live disk checks", s.get("live disk checks")),
        ("kill -9 and resumes", s.get("resumes")),
        ("snapshots brought back", s.get("snapshots brought back")),
        ("expected errors (crash)", s.get("expected errors (crash)")),
        ("fio verify failures", s.get("fio verify failures")),
        ("errors", s.get("errors")),
        ("hangs", s.get("hangs")),
        ("mismatches", s.get("mismatches")),
        ("leaked mounts", leaked_mounts),
        ("leaked processes", leaked_procs),
    ]
    print("\nsoak figures:")
    for k, v in figures:
        print(f"{k}: {v}")
    if s.problems:
        print("\nproblems:")
        for line in s.problems:
            print(f"- {line}")
    bad = (s.get("mismatches") or s.get("errors") or s.get("hangs")
           or s.get("fio verify failures") or leaked_mounts or leaked_procs or interrupted
           or not soak.unmounted)
    print("\nsoak: " + ("FAILED" if bad else "passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
