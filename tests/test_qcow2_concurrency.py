"""The qcow2 driver's lock is never held while the file is synced: a guest
fsync (flush) or a pool refill must not stall the other requests of the
live disk for the duration of the sync. And what the lock no longer covers
keeps the crash-ordering rules: clusters whose refcount raise is not yet
durable are never handed out.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading

import pytest

from snapfs.image.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB
WAIT = 10.0          # seconds: far longer than any of these operations takes


@pytest.fixture(autouse=True)
def _need_qemu():
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img not found: install qemu-utils; these tests use it as the oracle")


def assert_clean(path) -> None:
    result = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class BlockedSync:
    """os.fdatasync that, once armed, blocks its next call until released
    (then syncs); every other call syncs at once."""

    def __init__(self, monkeypatch):
        self.real = os.fdatasync
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        monkeypatch.setattr(os, "fdatasync", self)

    def arm(self) -> None:
        self.entered.clear()
        self.release.clear()
        self.armed = True

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.armed:
            self.armed = False
            self.entered.set()
            if not self.release.wait(WAIT * 3):
                raise AssertionError("the blocked sync was never released")
        self.real(fd)


class InThread:
    """Run a call in a thread; `done(timeout)` says whether it finished."""

    def __init__(self, fn, *args):
        self.error = None
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.result = fn(*args)
        except BaseException as e:    # noqa: BLE001 - reported by the test
            self.error = e

    def done(self, timeout: float) -> bool:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return not self.thread.is_alive()


def _image(tmp_path):
    """An image with its first 1 MiB allocated, and some of the pool left."""
    path = tmp_path / "x.qcow2"
    img = Qcow2Image.create(str(path), 64 * MiB, cluster_size=CS)
    img.write(0, b"\x01" * MiB)
    img.flush()
    return path, img


def test_flush_does_not_stall_other_requests(tmp_path, monkeypatch):
    """While flush's fdatasync runs, reads, in-place writes, an allocating
    write from the (durable) pool and zeroing complete; flush completes once
    the sync does."""
    path, img = _image(tmp_path)
    model = bytearray(64 * MiB)
    model[:MiB] = b"\x01" * MiB
    img.write_zeroes(0, CS)        # a dropped cluster: flush frees it (two syncs)
    model[:CS] = bytes(CS)
    sync = BlockedSync(monkeypatch)
    try:
        for _ in range(2):         # block flush's first sync, then its second
            sync.arm()
            flushing = InThread(img.flush)
            assert sync.entered.wait(WAIT), "flush did not sync"

            def others():
                assert img.read(CS, 4096) == model[CS:CS + 4096]
                img.write(2 * CS + 100, b"\x02" * 5000)            # in place
                model[2 * CS + 100:2 * CS + 5100] = b"\x02" * 5000
                img.write(40 * MiB + 7, b"\x03" * 3000)            # a new cluster
                model[40 * MiB + 7:40 * MiB + 3007] = b"\x03" * 3000
                img.write_zeroes(3 * CS, CS)
                model[3 * CS:4 * CS] = bytes(CS)
                assert img.read(0, 4 * CS) == model[:4 * CS]
                assert img.read(40 * MiB, CS) == model[40 * MiB:40 * MiB + CS]
                return list(img.data_extents(0, img.size))

            work = InThread(others)
            assert work.done(WAIT), "requests stalled while flush synced"
            assert not flushing.done(0.05), "flush returned before its sync"
            sync.release.set()
            assert flushing.done(WAIT)
    finally:
        sync.release.set()
        img.close()
    assert_clean(path)
    check = Qcow2Image.open(str(path))
    try:
        assert check.read(0, check.size) == model
    finally:
        check.close()


def test_pool_refill_sync_does_not_stall_reads_and_holds_back_allocation(tmp_path,
                                                                         monkeypatch):
    """The first allocating write refills the pool (raises refcounts, syncs).
    While that sync runs, reads and in-place writes of allocated clusters
    complete, but another allocating write waits: the new clusters' refcounts
    are not durable yet."""
    path = tmp_path / "x.qcow2"
    img = Qcow2Image.create(str(path), 64 * MiB, cluster_size=CS)
    img.write(0, b"\x01" * MiB)
    img.close()
    img = Qcow2Image.open(str(path), writable=True)      # an empty pool
    sync = BlockedSync(monkeypatch)
    try:
        sync.arm()
        refilling = InThread(img.write, 8 * MiB, b"\x04" * CS)
        assert sync.entered.wait(WAIT), "the allocating write did not sync"

        def others():
            assert img.read(0, MiB) == b"\x01" * MiB
            img.write(CS + 10, b"\x05" * 100)
            assert img.read(CS, 200) == b"\x01" * 10 + b"\x05" * 100 + b"\x01" * 90

        assert InThread(others).done(WAIT), "reads stalled while the pool refill synced"
        allocating = InThread(img.write, 16 * MiB, b"\x06" * CS)
        assert not allocating.done(0.3), \
            "an allocating write went ahead before the new refcounts were durable"
        assert not refilling.done(0.05)
        sync.release.set()
        assert refilling.done(WAIT) and allocating.done(WAIT)
        assert img.read(8 * MiB, CS) == b"\x04" * CS
        assert img.read(16 * MiB, CS) == b"\x06" * CS
    finally:
        sync.release.set()
        img.close()
    assert_clean(path)


def test_first_write_bitmap_drop_sync_does_not_stall_reads(tmp_path, monkeypatch):
    """The first write of an image with a persistent bitmap rewrites the
    header and syncs it; reads go on meanwhile, other writes wait for it."""
    path = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(4 * MiB)],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "bm0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", str(path)],
                   check=True, capture_output=True)
    img = Qcow2Image.open(str(path), writable=True)
    sync = BlockedSync(monkeypatch)
    try:
        sync.arm()
        first = InThread(img.write, 0, b"\x08" * 4096)
        assert sync.entered.wait(WAIT)
        reading = InThread(img.read, 4096, 4096)
        assert reading.done(WAIT), "a read stalled while the header was synced"
        assert reading.result == b"\x07" * 4096
        second = InThread(img.write, 8192, b"\x09" * 4096)
        assert not second.done(0.3), "a write went ahead of the header rewrite's sync"
        sync.release.set()
        assert first.done(WAIT) and second.done(WAIT)
    finally:
        sync.release.set()
        img.close()
    assert_clean(path)


def test_threads_writing_and_flushing(tmp_path):
    """Writers on distinct ranges (allocating, rewriting, zeroing), readers
    and a flushing thread at once, with 512-byte clusters so that pool
    refills add refcount blocks and move the refcount table meanwhile."""
    cs = 512
    size = 24 * MiB
    path = tmp_path / "t.qcow2"
    img = Qcow2Image.create(str(path), size, cluster_size=cs)
    model = bytearray(size)
    errors = []
    stop = threading.Event()
    slices = 4
    span = size // slices

    def writer(n):
        rng = random.Random(n)
        try:
            for _ in range(300):
                offset = n * span + rng.randrange(0, span - 40 * KiB)
                length = rng.randint(1, 40 * KiB)
                if rng.random() < 0.15:
                    img.write_zeroes(offset, length)
                    model[offset:offset + length] = bytes(length)
                else:
                    data = rng.randbytes(length)
                    img.write(offset, data)
                    model[offset:offset + length] = data
                probe = n * span + rng.randrange(0, span - 4096)
                assert img.read(probe, 4096) == model[probe:probe + 4096]
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)

    def flusher():
        try:
            while not stop.is_set():
                img.flush()
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(slices)]
    flushing = threading.Thread(target=flusher)
    flushing.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    flushing.join()
    try:
        assert not errors, errors
        assert img.read(0, size) == model
    finally:
        img.close()
    assert_clean(path)
    check = Qcow2Image.open(str(path))
    try:
        assert check.read(0, size) == model
    finally:
        check.close()
