"""The copy map's bit operations against a plain set of cluster numbers, and
its sharing between a writer and a read-only mapping of the same file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.backup.copymap import CopyMap

CLUSTER = 4096


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clusters=st.integers(1, 200), data=st.data())
def test_bits_against_a_set(tmp_path, clusters, data):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "map"
    size = clusters * CLUSTER - data.draw(st.integers(0, CLUSTER - 1))
    writer = CopyMap.create(str(path), size, CLUSTER, {"sync": "full"})
    reader = CopyMap.open(str(path))
    model: set[int] = set()
    try:
        assert reader.clusters == clusters and reader.info["sync"] == "full"
        spans = st.tuples(st.integers(0, clusters), st.integers(0, clusters)).map(sorted)
        for _ in range(data.draw(st.integers(1, 12))):
            first, end = data.draw(spans)
            writer.mark(first, end)
            model.update(range(first, end))
            a, b = data.draw(spans)
            expected_mask = sum(1 << (c - a) for c in model if a <= c < b)
            assert reader.copied(a, b) == expected_mask
            assert reader.next_uncopied(a, b) == min(
                (c for c in range(a, b) if c not in model), default=b)
            assert reader.next_copied(a, b) == min((c for c in model if a <= c < b), default=b)
            assert reader.copied(0, clusters).bit_count() == len(model)
    finally:
        reader.close()
        writer.close()


def test_header_round_trip_and_final_state(tmp_path):
    path = tmp_path / "map"
    writer = CopyMap.create(str(path), 10 * CLUSTER, CLUSTER, {"sync": "top", "state": "running"})
    writer.mark(3, 7)
    writer.write_info(state="completed", bytes_done=4)
    writer.flush()
    writer.close()
    reader = CopyMap.open(str(path))
    try:
        assert reader.info["state"] == "completed" and reader.info["bytes_done"] == 4
        assert reader.info["size"] == 10 * CLUSTER and reader.cluster_size == CLUSTER
        assert reader.copied(0, 10) == 0b1111000
    finally:
        reader.close()
