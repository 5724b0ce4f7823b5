"""Property tests of the copy-before-write engine against a plain bytes model.

Hypothesis generates sequences of writes of random sizes and offsets,
snapshots taken in between (up to four at once, each with its own cluster
size), background-copy steps of any snapshot's job (including a claim left
open while writes to the same clusters arrive), snapshot reads and live reads.
After every step each snapshot must read exactly as the image did when it was
taken, the live view as the model, and no cluster may ever be copied into a
target twice.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.copymap import CopyMap
from snapfs.backup.reader import SnapshotReader
from snapfs.backup.store import Claim, Store
from snapfs.image.raw import RawImage

CLUSTER = 4096
SIZE = 15 * CLUSTER + 1234  # the last cluster is partial
MAX_SNAPSHOTS = 4


class RecordingTarget:
    """Wraps a target image and fails on a cluster copied twice."""

    def __init__(self, image: RawImage, cluster: int):
        self.image = image
        self.cluster = cluster
        self.written: set[int] = set()
        self.size = image.size
        self.path = image.path

    def _record(self, offset, length):
        assert offset % self.cluster == 0
        for c in range(offset // self.cluster, -(-(offset + length) // self.cluster)):
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


@dataclass
class Taken:
    """A snapshot in the model: its store, its reader, what it must show."""

    store: Store
    reader: SnapshotReader
    image: bytes
    claim: Claim | None = None
    job_pos: int = 0


def make_original(seed: int, zero_clusters: list[int]) -> bytes:
    data = bytearray(random.Random(seed).randbytes(SIZE))
    for c in zero_clusters:
        data[c * CLUSTER:(c + 1) * CLUSTER] = bytes(len(data[c * CLUSTER:(c + 1) * CLUSTER]))
    return bytes(data)


offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 5 * CLUSTER)
which = st.integers(0, MAX_SNAPSHOTS - 1)
operations = st.lists(st.one_of(
    st.tuples(st.just("write"), offsets, lengths, st.integers(0, 2**16), st.booleans()),
    st.tuples(st.just("snapshot"), st.sampled_from([CLUSTER, 2 * CLUSTER, 4 * CLUSTER])),
    st.tuples(st.just("job_step"), which, st.integers(1, 4)),
    st.tuples(st.just("job_claim"), which, st.integers(1, 4)),
    st.tuples(st.just("job_finish"), which),
    st.tuples(st.just("snap_read"), which, offsets, lengths),
    st.tuples(st.just("live_read"), offsets, lengths),
), max_size=50)


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
    engine = CopyBeforeWrite(source)
    opened = [source]

    def take(model: bytes, cluster: int) -> Taken:
        n = len(opened)
        target = RecordingTarget(RawImage.create(str(run_dir / f"tgt{n}"), SIZE), cluster)
        copymap = CopyMap.create(str(run_dir / f"map{n}"), SIZE, cluster, {})
        reader = SnapshotReader(RawImage.open(str(run_dir / "src")), target.image,
                                CopyMap.open(str(run_dir / f"map{n}")))
        opened.extend([target.image, copymap, reader.source, reader.copymap])
        store = Store(target, copymap)
        engine.add(store)
        return Taken(store, reader, bytes(model))

    try:
        trio.run(play, engine, take, original, ops)
    finally:
        for thing in opened:
            thing.close()


async def play(engine: CopyBeforeWrite, take, original: bytes, ops) -> None:
    model = bytearray(original)
    snapshots = [take(model, CLUSTER)]
    pending: list[tuple[int, bytes]] = []  # writes waiting for an open claim

    async def write(offset, data):
        await engine.write(offset, data)
        model[offset:offset + len(data)] = data
        if (offset, data) in pending:
            pending.remove((offset, data))

    def next_run(snap: Taken, max_clusters):
        store = snap.store
        found = store.next_claimable(snap.job_pos, store.clusters, max_clusters)
        if found is None:
            found = store.next_claimable(0, store.clusters, max_clusters)
        if found:
            snap.job_pos = found[1]
        return found

    def copy_claimed(snap: Taken, claim: Claim):
        engine.copy(snap.store, claim.first, claim.end)
        snap.store.release(claim, copied=True)

    def blocked_by_a_claim(offset, length) -> bool:
        for snap in snapshots:
            if snap.claim is not None:
                first, end = snap.store.cluster_span(offset, length)
                if snap.claim.first < end and first < snap.claim.end:
                    return True
        return False

    async with trio.open_nursery() as nursery:
        for op in ops:
            kind = op[0]
            snap = snapshots[op[1] % len(snapshots)] if kind.startswith(("job", "snap_")) \
                else None
            if kind == "write":
                _, offset, length, data_seed, zero = op
                length = min(length, len(original) - offset)
                data = bytes(length) if zero else random.Random(data_seed).randbytes(length)
                if blocked_by_a_claim(offset, length):
                    pending.append((offset, data))
                    nursery.start_soon(write, offset, data)
                    await trio.testing.wait_all_tasks_blocked()
                    assert (offset, data) in pending, "a write passed a cluster being copied"
                else:
                    await write(offset, data)
            elif kind == "snapshot" and len(snapshots) < MAX_SNAPSHOTS and not pending:
                snapshots.append(take(model, op[1]))
            elif kind == "job_step" and snap.claim is None:
                found = next_run(snap, op[2])
                if found:
                    copy_claimed(snap, snap.store.claim(*found))
            elif kind == "job_claim" and snap.claim is None:
                found = next_run(snap, op[2])
                if found:
                    snap.claim = snap.store.claim(*found)
            elif kind == "job_finish" and snap.claim is not None:
                copy_claimed(snap, snap.claim)
                snap.claim = None
                await trio.testing.wait_all_tasks_blocked()
                if not any(s.claim for s in snapshots):
                    assert not pending
            elif kind == "snap_read":
                _, _, offset, length = op
                assert snap.reader.read(offset, length) == snap.image[offset:offset + length]
            elif kind == "live_read" and not pending:
                _, offset, length = op
                length = min(length, len(original) - offset)
                assert engine.source.read(offset, length) == model[offset:offset + length]
        for snap in snapshots:
            if snap.claim is not None:
                copy_claimed(snap, snap.claim)
                snap.claim = None
        await trio.testing.wait_all_tasks_blocked()
    assert not pending

    for snap in snapshots:
        store = snap.store
        # Every copied cluster in the target is the snapshot's.
        target = store.target.image.read(0, len(original))
        for c in range(store.clusters):
            if store.copymap.copied(c, c + 1):
                span = slice(*store.byte_span(c, c + 1))
                assert target[span] == snap.image[span]
        # Finish the copy like FULL does: the target alone is the snapshot.
        while (found := store.next_claimable(0, store.clusters, 4)) is not None:
            copy_claimed(snap, store.claim(*found))
        assert store.target.image.read(0, len(original)) == snap.image
        assert snap.reader.read(0, len(original)) == snap.image
    assert engine.source.read(0, len(original)) == bytes(model)
