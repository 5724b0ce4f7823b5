"""Copy-before-write when old data cannot be saved, at the unit level: the
policies (break-guest-write, break-snapshot) and the timeout, against a
bytes model.

Targets fail on command (ENOSPC, EIO, on write or on flush) or stall; the
source fails reads on command. After every step: the live image equals the
model (a refused write changed nothing), every snapshot that is not broken
reads exactly the image at its point in time, a broken one fails every read,
and the writes refused are exactly those a break-guest-write store could not
save old data for.
"""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.copymap import CopyMap
from snapfs.backup.job import BackupJob
from snapfs.backup.reader import SnapshotReader
from snapfs.backup.store import Store
from snapfs.image.raw import RawImage

CLUSTER = 4096
SIZE = 16 * CLUSTER


class Faulty:
    """An image whose writes, zero writes, reads or flushes fail (or stall)
    while told to."""

    def __init__(self, image: RawImage):
        self.image = image
        self.size, self.path, self.fd = image.size, image.path, image.fd
        self.fail_write: int | None = None  # errno
        self.fail_read: int | None = None
        self.fail_flush: int | None = None
        self.slow = 0.0  # seconds each write takes

    def _write_fault(self):
        if self.slow:
            threading.Event().wait(self.slow)
        if self.fail_write is not None:
            raise OSError(self.fail_write, os.strerror(self.fail_write))

    def write(self, offset, data):
        self._write_fault()
        self.image.write(offset, data)

    def write_zeroes(self, offset, length):
        self._write_fault()
        self.image.write_zeroes(offset, length)

    def read(self, offset, length):
        if self.fail_read is not None:
            raise OSError(self.fail_read, "injected read error")
        return self.image.read(offset, length)

    def readinto(self, offset, buffer):
        if self.fail_read is not None:
            raise OSError(self.fail_read, "injected read error")
        self.image.readinto(offset, buffer)

    def stat(self):
        return self.image.stat()

    def flush(self):
        if self.fail_flush is not None:
            raise OSError(self.fail_flush, "injected flush error")
        self.image.flush()

    def data_extents(self, offset, length):
        return self.image.data_extents(offset, length)


class Setup:
    def __init__(self, tmp, seed: int):
        data = random.Random(seed).randbytes(SIZE)
        (tmp / "source").write_bytes(data)
        self.model = bytearray(data)
        self.source = Faulty(RawImage.open(str(tmp / "source"), writable=True))
        self.engine = CopyBeforeWrite(self.source)
        self.tmp = tmp
        self.snapshots: list[tuple[Store, SnapshotReader, bytes, Faulty]] = []

    def snapshot(self, policy: str, timeout: float | None = None) -> tuple[Store, Faulty]:
        n = len(self.snapshots)
        path = self.tmp / f"target{n}"
        target = Faulty(RawImage.create(str(path), SIZE))
        copymap = CopyMap.create(str(path) + ".snapfs", SIZE, CLUSTER, {})
        store = Store(target, copymap, policy, timeout)
        self.engine.add(store)
        reader_copymap = CopyMap.open(str(path) + ".snapfs")
        reader = SnapshotReader(self.source, RawImage.open(str(path)), reader_copymap)
        self.snapshots.append((store, reader, bytes(self.model), target))
        return store, target

    async def write(self, offset: int, data: bytes) -> int | None:
        """The errno the write failed with, or None (then the model has it)."""
        try:
            await self.engine.write(offset, data)
        except OSError as e:
            return e.errno
        self.model[offset:offset + len(data)] = data
        return None

    def check(self) -> None:
        self.source.fail_read = None
        assert self.source.read(0, SIZE) == self.model, "the live disk differs from the model"
        for store, reader, image, _ in self.snapshots:
            if store.broken is not None:
                with pytest.raises(OSError) as raised:
                    reader.read(0, SIZE)
                assert raised.value.errno == errno.EIO
                assert store not in self.engine.stores
            else:
                assert reader.read(0, SIZE) == image, "a snapshot differs from its moment"


def test_break_guest_write_fails_the_write_and_keeps_the_snapshot(tmp_path):
    s = Setup(tmp_path, 1)
    store, target = s.snapshot("break-guest-write")

    async def play():
        target.fail_write = errno.ENOSPC
        assert await s.write(CLUSTER, b"x" * 100) == errno.ENOSPC
        target.fail_write = errno.EIO
        assert await s.write(3 * CLUSTER, b"y" * CLUSTER) == errno.EIO
        assert store.failed_writes == 2 and "Input/output" in store.last_error
        s.check()
        target.fail_write = None
        assert await s.write(CLUSTER, b"z" * 100) is None  # the target came back
        s.check()

    trio.run(play)
    assert store.broken is None


def test_break_snapshot_lets_the_write_through_and_breaks_only_that_snapshot(tmp_path):
    s = Setup(tmp_path, 2)
    kept, _ = s.snapshot("break-snapshot")
    broken, target = s.snapshot("break-snapshot")

    async def play():
        target.fail_write = errno.ENOSPC
        assert await s.write(2 * CLUSTER, b"x" * 5000) is None
        assert broken.broken is not None and "No space" in broken.broken
        assert kept.broken is None
        s.check()
        target.fail_write = None  # it stays broken
        assert await s.write(9 * CLUSTER, b"q" * 10) is None
        s.check()

    trio.run(play)


def test_source_read_error(tmp_path):
    """Old data that cannot be read: each store's policy applies."""
    s = Setup(tmp_path, 3)
    strict, _ = s.snapshot("break-guest-write")
    lenient, _ = s.snapshot("break-snapshot")

    async def play():
        s.source.fail_read = errno.EIO
        assert await s.write(0, b"a") == errno.EIO  # strict refuses
        assert lenient.broken is not None and strict.broken is None
        s.check()

    trio.run(play)


def test_flush_error_by_policy(tmp_path):
    s = Setup(tmp_path, 4)
    strict, strict_target = s.snapshot("break-guest-write")
    lenient, lenient_target = s.snapshot("break-snapshot")

    async def play():
        lenient_target.fail_flush = errno.EIO
        await s.engine.flush()  # the lenient one breaks, the flush succeeds
        assert lenient.broken is not None
        strict_target.fail_flush = errno.EIO
        with pytest.raises(OSError) as raised:
            await s.engine.flush()
        assert raised.value.errno == errno.EIO and strict.broken is None
        s.check()

    trio.run(play)


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_timeout(tmp_path, policy):
    """A target slower than the timeout: the write fails (EIO) or the
    snapshot breaks, after about the timeout, not after the slow copy."""
    s = Setup(tmp_path, 5)
    store, target = s.snapshot(policy, timeout=0.2)

    async def play():
        target.slow = 2.0
        started = trio.current_time()
        result = await s.write(4 * CLUSTER, b"t" * 10)
        took = trio.current_time() - started
        assert took < 1.5, f"the write waited {took:.2f} s, past its timeout"
        if policy == "break-guest-write":
            assert result == errno.EIO and store.broken is None
            # a second write to the same cluster waits for the copy in flight,
            # within its own timeout, and fails too
            assert await s.write(4 * CLUSTER + 5, b"u") == errno.EIO
        else:
            assert result is None and "more than 0.2" in store.broken
        target.slow = 0
        await trio.sleep(2.5)  # the abandoned copy ends meanwhile
        if policy == "break-guest-write":
            # the copy that timed out finished later and counts: the cluster
            # holds old data, and the next write goes through
            assert await s.write(4 * CLUSTER, b"v") is None
        s.check()

    trio.run(play)


def test_a_broken_snapshot_ends_its_job_failed(tmp_path):
    s = Setup(tmp_path, 6)
    store, target = s.snapshot("break-snapshot")
    job = BackupJob(s.engine, store, "none")

    async def play():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.run)
            await trio.sleep(0.01)
            target.fail_write = errno.EIO
            assert await s.write(0, b"1") is None
            with trio.fail_after(5):
                await job.finished.wait()
        assert job.state == "failed" and "could not be saved" in job.error

    trio.run(play)


operations = st.lists(st.one_of(
    st.tuples(st.just("snapshot"), st.sampled_from(["break-guest-write", "break-snapshot"])),
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 3 * CLUSTER)),
    st.tuples(st.just("target-fails"), st.integers(0, 3),
              st.sampled_from([errno.ENOSPC, errno.EIO, None])),
    st.tuples(st.just("source-fails"), st.sampled_from([errno.EIO, None])),
    st.tuples(st.just("flush")),
), max_size=25)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations, seed=st.integers(0, 1000))
def test_policies_against_a_model(tmp_path_factory, ops, seed):
    s = Setup(tmp_path_factory.mktemp("policies"), seed)
    rng = random.Random(seed)

    async def play():
        for op in ops:
            if op[0] == "snapshot" and len(s.snapshots) < 4:
                s.snapshot(op[1])
            elif op[0] == "write":
                offset = op[1]
                data = rng.randbytes(min(op[2], SIZE - offset))
                strict_lacking = [
                    st_ for st_, *_ in s.snapshots if st_.broken is None
                    and st_.on_error == "break-guest-write"
                    and st_.uncopied_runs(*st_.cluster_span(offset, len(data)))]
                failing = s.source.fail_read is not None or any(
                    t.fail_write is not None for st_, _, _, t in s.snapshots
                    if st_ in strict_lacking)
                result = await s.write(offset, data)
                if strict_lacking and failing:
                    assert result in (errno.EIO, errno.ENOSPC)
                else:
                    assert result is None, "a write failed that no strict snapshot refused"
            elif op[0] == "target-fails" and op[1] < len(s.snapshots):
                s.snapshots[op[1]][3].fail_write = op[2]
            elif op[0] == "source-fails":
                s.source.fail_read = op[1]
            elif op[0] == "flush":
                try:
                    await s.engine.flush()
                except OSError:
                    pass
            fail_read = s.source.fail_read
            s.check()
            s.source.fail_read = fail_read

    trio.run(play)
