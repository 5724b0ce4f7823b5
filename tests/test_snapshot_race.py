"""Snapshot reads racing with writes to the same clusters.

The snapshot process reads the source without a lock; it relies on looking at
the copy map again after the read. These tests make the race happen: first
deterministically (a write completes in the middle of a snapshot read), then
with real threads (background job in a worker thread, writes in the trio
thread, snapshot readers in other threads), then through real FUSE mounts.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import pytest
import trio

from conftest import random_bytes, write_image
from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.copymap import CopyMap
from snapfs.backup.job import BackupJob
from snapfs.image.raw import RawImage
from snapfs.backup.reader import SnapshotReader
from snapfs.backup.store import Store

CLUSTER = 64 << 10
MiB = 1 << 20


def open_engine(tmp_path, original: bytes, cluster=CLUSTER):
    write_image(tmp_path / "src", original)
    source = RawImage.open(str(tmp_path / "src"), writable=True)
    target = RawImage.create(str(tmp_path / "tgt"), len(original))
    copymap = CopyMap.create(str(tmp_path / "map"), len(original), cluster, {})
    engine = CopyBeforeWrite(source)
    store = Store(target, copymap)
    engine.add(store)
    reader = SnapshotReader(RawImage.open(str(tmp_path / "src")),
                            RawImage.open(str(tmp_path / "tgt")),
                            CopyMap.open(str(tmp_path / "map")))
    return engine, store, reader


def write_now(engine: CopyBeforeWrite, offset: int, data: bytes) -> None:
    """Run engine.write to completion; with no claim open it never suspends."""
    coro = engine.write(offset, data)
    with pytest.raises(StopIteration):
        coro.send(None)


class WriteDuringRead:
    """A source whose next read is overtaken by a write to the same bytes: the
    write (copy-before-write and all) completes, then the read returns what
    the source holds now, as a read racing with the write may."""

    def __init__(self, image, engine, offset, data):
        self.image, self.engine, self.offset, self.data = image, engine, offset, data
        self.size, self.path = image.size, image.path
        self.fired = False

    def _fire(self):
        if not self.fired:
            self.fired = True
            write_now(self.engine, self.offset, self.data)

    def read(self, offset, length):
        self._fire()
        return self.image.read(offset, length)

    def readinto(self, offset, buffer):
        self._fire()
        self.image.readinto(offset, buffer)


@pytest.mark.parametrize("copied_first, read_offset, read_length, write_offset, write_length", [
    (None, 0, 4096, 0, 4096),                            # nothing copied yet
    (None, CLUSTER - 2048, 4096, CLUSTER - 2048, 4096),  # straddles two uncopied clusters
    (0, CLUSTER - 2048, 4096, CLUSTER, 4096),            # copied | uncopied, 4K read
    (0, CLUSTER - 16384, 32768, CLUSTER, 100),           # copied | uncopied, 32K read
    (1, CLUSTER - 16384, 32768, 0, CLUSTER),             # uncopied | copied
    (2, 0, 4 * CLUSTER, CLUSTER, 2 * CLUSTER),           # mixed, large read
])
def test_write_during_snapshot_read(tmp_path, copied_first, read_offset, read_length,
                                    write_offset, write_length):
    original = random_bytes(8 * CLUSTER, seed=1)
    engine, store, reader = open_engine(tmp_path, original)
    if copied_first is not None:
        write_now(engine, copied_first * CLUSTER, random_bytes(CLUSTER, seed=2))
    reader.source = WriteDuringRead(reader.source, engine, write_offset,
                                    random_bytes(write_length, seed=3))
    data = reader.read(read_offset, read_length)
    assert reader.source.fired
    assert bytes(data) == original[read_offset:read_offset + read_length]
    # and the source really did change under the read
    assert engine.source.read(write_offset, write_length) == random_bytes(write_length, seed=3)


def test_threads_write_copy_and_read_at_once(tmp_path):
    """The background job copies in a worker thread, writes run in the trio
    thread, snapshot readers in two more threads, all on the same 2 MiB."""
    original = random_bytes(2 * MiB, seed=4)
    engine, store, reader = open_engine(tmp_path, original, cluster=4096)
    stop = threading.Event()
    failures: list[str] = []
    reads = [0]

    def read_loop(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            offset = rng.randrange(len(original))
            length = rng.choice([1, 512, 4096, 32768, 100_000, MiB])
            data = reader.read(offset, length)
            if bytes(data) != original[offset:offset + length]:
                failures.append(f"snapshot read {offset}+{length} saw new data")
            reads[0] += 1

    async def write_loop(rng):
        deadline = trio.current_time() + 3
        while trio.current_time() < deadline:
            offset = rng.randrange(len(original))
            length = min(rng.choice([1, 4096, 10_000, 70_000]), len(original) - offset)
            await engine.write(offset, rng.randbytes(length))
            await trio.sleep(0)

    async def main():
        job = BackupJob(engine, store, "full", chunk_bytes=64 << 10, speed=1 * MiB)
        threads = [threading.Thread(target=read_loop, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(job.run)
                async with trio.open_nursery() as writers:
                    for i in range(3):
                        writers.start_soon(write_loop, random.Random(i))
                job.stop()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert job.state in ("cancelled", "completed") and job.bytes_done > 0

    trio.run(main)
    assert not failures, failures[:5]
    assert reads[0] > 100
    assert store.clusters_copied_by_writes > 0
    assert reader.read(0, len(original)) == original


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_concurrent_writers_and_snapshot_readers_through_fuse(tmp_path, mount, fmt):
    """Real mounts: writer threads on the live file, reader threads on the
    snapshot file (page cache dropped before each read, so that the reads reach
    snapfs), the background copy running meanwhile. With qcow2, the source is
    an overlay on a raw base, partly compressed, and the target is qcow2: the
    snapshot process reads both while the live process allocates in both."""
    original = random_bytes(16 * MiB, seed=5)
    source = write_image(tmp_path / "disk.img", original)
    extra = []
    if fmt == "qcow2":
        write_image(tmp_path / "base.raw", random_bytes(16 * MiB, seed=6))
        overlay = tmp_path / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=16k",
                        "-b", "base.raw", "-F", "raw", str(overlay)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -c -P 0x5a 0 1M",
                        "-c", "write -P 0x33 1M 512k", "-c", "write -z 1536k 256k",
                        str(overlay)], check=True, capture_output=True)
        source = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=16k",
                        "-B", "base.raw", "-F", "raw", str(overlay), str(source)], check=True)
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(source),
                        str(tmp_path / "pit.raw")], check=True)
        original = (tmp_path / "pit.raw").read_bytes()
        extra = ["--format", "qcow2", "--target-format", "qcow2"]
    inst = mount(source, sync="full", cluster_size="4K", speed="4M", extra=extra)
    hot = 2 * MiB  # everybody works on the first 2 MiB
    stop = threading.Event()
    failures: list[str] = []
    counts = {"reads": 0, "writes": 0}

    def writer(seed):
        rng = random.Random(seed)
        fd = os.open(inst.live, os.O_WRONLY)
        try:
            while not stop.is_set():
                offset = rng.randrange(hot)
                length = rng.choice([512, 4096, 20_000, 65536, 300_000])
                os.pwrite(fd, rng.randbytes(length), offset)
                counts["writes"] += 1
        finally:
            os.close(fd)

    def reader(seed):
        rng = random.Random(seed)
        fd = os.open(inst.snapshot, os.O_RDONLY)
        try:
            while not stop.is_set():
                offset = rng.randrange(hot)
                length = rng.choice([4096, 32768, 131072, MiB])
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                data = os.pread(fd, length, offset)
                if data != original[offset:offset + len(data)]:
                    failures.append(f"read {offset}+{length}")
                counts["reads"] += 1
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=reader, args=(10 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert counts["reads"] > 50 and counts["writes"] > 50, counts
    assert inst.snapshot.read_bytes() == original
    inst.umount()


def test_empty_write_touches_no_cluster(tmp_path):
    """A zero-length write at an unaligned offset used to copy a cluster.
    (The kernel does not pass such writes through FUSE; other callers might.)"""
    engine, store, reader = open_engine(tmp_path, random_bytes(MiB, seed=9))
    for offset in (0, 100, CLUSTER + 7, MiB - 1):
        write_now(engine, offset, b"")
    assert store.clusters_copied_by_writes == 0
    assert store.copymap.next_copied(0, store.clusters) == store.clusters
