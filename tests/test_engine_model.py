"""Property tests of the copy-before-write engine against a plain bytes model.

Hypothesis generates sequences of writes of random sizes and offsets,
background-copy steps (including a claim left open while writes to the same
clusters arrive), snapshot reads and live reads. After every step the snapshot
must read exactly as the image did at the start, the live view as the model,
and no cluster may ever be copied into the target twice.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.copymap import CopyMap
from snapfs.image.raw import RawImage
from snapfs.backup.reader import SnapshotReader

CLUSTER = 4096
SIZE = 15 * CLUSTER + 1234  # the last cluster is partial


class RecordingTarget:
    """Wraps the target image and fails on a cluster copied twice."""

    def __init__(self, image: RawImage):
        self.image = image
        self.written: set[int] = set()
        self.size = image.size
        self.path = image.path

    def _record(self, offset, length):
        assert offset % CLUSTER == 0
        for c in range(offset // CLUSTER, -(-(offset + length) // CLUSTER)):
            assert c not in self.written, f"cluster {c} copied twice"
            self.written.add(c)

    def write(self, offset, data):
        self._record(offset, len(data))
        self.image.write(offset, data)

    def write_zeroes(self, offset, length):
        self._record(offset, length)
        self.image.write_zeroes(offset, length)

    def read(self, offset, length):
        return self.image.read(offset, length)

    def flush(self):
        self.image.flush()


def make_original(seed: int, zero_clusters: list[int]) -> bytes:
    data = bytearray(random.Random(seed).randbytes(SIZE))
    for c in zero_clusters:
        data[c * CLUSTER:(c + 1) * CLUSTER] = bytes(len(data[c * CLUSTER:(c + 1) * CLUSTER]))
    return bytes(data)


offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 5 * CLUSTER)
operations = st.lists(st.one_of(
    st.tuples(st.just("write"), offsets, lengths, st.integers(0, 2**16), st.booleans()),
    st.tuples(st.just("job_step"), st.integers(1, 4)),
    st.tuples(st.just("job_claim"), st.integers(1, 4)),
    st.tuples(st.just("job_finish")),
    st.tuples(st.just("snap_read"), offsets, lengths),
    st.tuples(st.just("live_read"), offsets, lengths),
), max_size=40)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16),
       zero_clusters=st.lists(st.integers(0, SIZE // CLUSTER), max_size=5),
       ops=operations)
def test_engine_against_bytes_model(tmp_path, seed, zero_clusters, ops):
    original = make_original(seed, zero_clusters)
    run_dir = Path(tempfile.mkdtemp(dir=tmp_path))
    (run_dir / "src").write_bytes(original)
    source = RawImage.open(str(run_dir / "src"), writable=True)
    target = RecordingTarget(RawImage.create(str(run_dir / "tgt"), SIZE))
    copymap = CopyMap.create(str(run_dir / "map"), SIZE, CLUSTER, {})
    engine = CopyBeforeWrite(source, target, copymap)
    reader = SnapshotReader(RawImage.open(str(run_dir / "src")), target.image,
                            CopyMap.open(str(run_dir / "map")))
    try:
        trio.run(play, engine, reader, original, ops)
    finally:
        source.close()
        target.image.close()
        copymap.close()


async def play(engine: CopyBeforeWrite, reader: SnapshotReader, original: bytes, ops) -> None:
    model = bytearray(original)
    claim = None
    pending: list[tuple[int, bytes]] = []  # writes waiting for the open claim
    job_pos = 0

    async def write(offset, data):
        await engine.write(offset, data)
        model[offset:offset + len(data)] = data
        if (offset, data) in pending:
            pending.remove((offset, data))

    def next_run(max_clusters):
        nonlocal job_pos
        found = engine.next_claimable(job_pos, engine.clusters, max_clusters)
        if found is None:
            found = engine.next_claimable(0, engine.clusters, max_clusters)
        if found:
            job_pos = found[1]
        return found

    async with trio.open_nursery() as nursery:
        for op in ops:
            kind = op[0]
            if kind == "write":
                _, offset, length, data_seed, zero = op
                length = min(length, len(original) - offset)
                data = bytes(length) if zero else random.Random(data_seed).randbytes(length)
                first, end = engine.cluster_span(offset, length)
                if claim is not None and claim.first < end and first < claim.end:
                    pending.append((offset, data))
                    nursery.start_soon(write, offset, data)
                    await trio.testing.wait_all_tasks_blocked()
                    assert (offset, data) in pending, "a write passed a cluster being copied"
                else:
                    await write(offset, data)
            elif kind == "job_step" and claim is None:
                found = next_run(op[1])
                if found:
                    step = engine.claim(*found)
                    engine.copy(step.first, step.end)
                    engine.release(step, copied=True)
            elif kind == "job_claim" and claim is None:
                found = next_run(op[1])
                if found:
                    claim = engine.claim(*found)
            elif kind == "job_finish" and claim is not None:
                engine.copy(claim.first, claim.end)
                engine.release(claim, copied=True)
                claim = None
                await trio.testing.wait_all_tasks_blocked()
                assert not pending
            elif kind == "snap_read":
                _, offset, length = op
                assert reader.read(offset, length) == original[offset:offset + length]
            elif kind == "live_read" and not pending:
                _, offset, length = op
                length = min(length, len(original) - offset)
                assert engine.source.read(offset, length) == model[offset:offset + length]
        if claim is not None:
            engine.copy(claim.first, claim.end)
            engine.release(claim, copied=True)
        await trio.testing.wait_all_tasks_blocked()
    assert not pending

    # Every copied cluster in the target is the original's.
    target = engine.target.image.read(0, len(original))
    for c in range(engine.clusters):
        if engine.copymap.copied(c, c + 1):
            span = slice(c * CLUSTER, (c + 1) * CLUSTER)
            assert target[span] == original[span]
    # Finish the copy like FULL does: the target alone is the original.
    while (found := engine.next_claimable(0, engine.clusters, 4)) is not None:
        step = engine.claim(*found)
        engine.copy(step.first, step.end)
        engine.release(step, copied=True)
    assert engine.target.image.read(0, len(original)) == original
    assert reader.read(0, len(original)) == original
    assert engine.source.read(0, len(original)) == bytes(model)
