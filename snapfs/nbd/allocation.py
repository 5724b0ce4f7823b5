"""Which parts of a point-in-time image hold data, for NBD's base:allocation.

The kernel never asks a FUSE file system where its holes are, so a reader of
the snapshot file sees data everywhere. This looks behind it: a cluster whose
bit is set in the copy map is what the target holds there (a hole or a zero
cluster there reads as zeroes); any other cluster is what SOURCE holds, in
any layer of its backing chain. As with the snapshot's reads
(docs/design.md), the copy map is looked at again after SOURCE: a cluster
copied meanwhile may have new data in SOURCE, so it is answered from the
target. Reporting data where there are zeroes is always allowed; the other
way round never happens.
"""

from __future__ import annotations

from snapfs.backup.copymap import CopyMap
from snapfs.image.base import Image


def _allocated(image: Image, start: int, end: int, whole_chain: bool) -> list[tuple[int, int]]:
    """Byte ranges in [start, end) that may hold data: what the top layer
    holds, but for its zero clusters, and (with `whole_chain`) what the layers
    below hold where no layer above them holds anything."""
    data: list[tuple[int, int]] = []
    open_ranges = [(start, end)]  # not yet decided by a layer above
    layer = image
    while layer is not None and open_ranges:
        undecided = []
        for s, e in open_ranges:
            stop = min(e, layer.size)  # past a shorter layer: zeroes
            if s >= stop:
                continue
            held = _merge(list(layer.data_extents(s, stop - s)))
            zeros = _merge(list(layer.zero_extents(s, stop - s)))
            for hs, he in held:
                data += _minus([(hs, he)], zeros)
            undecided += _minus([(s, stop)], held)
        open_ranges = undecided if whole_chain else []
        layer = getattr(layer, "backing", None)
    return _merge(data)


def _minus(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `ranges` outside the sorted, disjoint `cut`."""
    for start, end in cut:
        ranges = _subtract(ranges, start, end)
    return ranges


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def extents(source: Image, target: Image, copymap: CopyMap, offset: int,
            length: int) -> list[tuple[int, int, bool]]:
    """(start, length, holds data) covering [offset, offset+length) exactly."""
    end = min(offset + length, source.size)
    if offset >= end:
        return []
    cs = copymap.cluster_size
    c0, c1 = offset // cs, -(-end // cs)
    before = copymap.copied(c0, c1)
    data = []
    for first, stop, copied in _runs(before, c0, c1):
        start, finish = max(offset, first * cs), min(end, stop * cs)
        data += _allocated(target if copied else source, start, finish, not copied)
    after = copymap.copied(c0, c1)
    if after != before:  # copied while we looked at SOURCE: the target says
        for first, stop, bit in _runs(after & ~before, c0, c1):
            if bit:
                start, finish = max(offset, first * cs), min(end, stop * cs)
                data = _subtract(data, start, finish)
                data += _allocated(target, start, finish, False)
    return _cover(_merge(data), offset, end)


def _runs(mask: int, c0: int, c1: int):
    """(first, end, bit) runs of equal bits; bit i of `mask` is cluster c0+i."""
    first = c0
    while first < c1:
        bit = (mask >> (first - c0)) & 1
        stop = first + 1
        while stop < c1 and (mask >> (stop - c0)) & 1 == bit:
            stop += 1
        yield first, stop, bool(bit)
        first = stop


def _subtract(ranges, start: int, end: int) -> list[tuple[int, int]]:
    kept = []
    for s, e in ranges:
        if s < start:
            kept.append((s, min(e, start)))
        if e > end:
            kept.append((max(s, end), e))
    return kept


def _cover(data: list[tuple[int, int]], offset: int, end: int) -> list[tuple[int, int, bool]]:
    out, pos = [], offset
    for s, e in data:
        s, e = max(s, offset), min(e, end)
        if s >= e:
            continue
        if s > pos:
            out.append((pos, s - pos, False))
        out.append((s, e - s, True))
        pos = e
    if pos < end:
        out.append((pos, end - pos, False))
    return out
