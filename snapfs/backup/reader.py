"""Reading the point-in-time image: the target's clusters laid over the source.

Runs in the snapshot process, which shares the copy map with the live process
but takes no lock and sends it no message. The live process follows the
ordering rule (old data into the target, bit set, then the source written), so
a read of the source can only have seen new data if the cluster's bit was set
before that read ended. After reading from the source, `read` therefore looks
at the bits again and re-reads from the target every cluster whose bit was set
in the meantime. Bits are never cleared and the target's data for a set bit is
final, so that one re-check is enough. A broken snapshot's flag is looked at
last, the same way. docs/design.md has the full argument.
"""

from __future__ import annotations

import errno

from snapfs.backup.copymap import CopyMap
from snapfs.image.base import Image


def _runs(mask: int, count: int):
    """Yield (start, end, bit) runs of equal bits in the low `count` bits."""
    start = 0
    while start < count:
        bit = (mask >> start) & 1
        # the first position >= start whose bit differs
        rest = (mask >> start) if not bit else (~mask >> start)
        rest &= (1 << (count - start)) - 1
        end = count if rest == 0 else start + ((rest & -rest).bit_length() - 1)
        yield start, end, bit
        start = end


class SnapshotReader:
    def __init__(self, source: Image, target: Image, copymap: CopyMap):
        self.source = source
        self.target = target
        self.copymap = copymap
        self.size = source.size
        self.cluster_size = copymap.cluster_size

    def read(self, offset: int, length: int) -> bytes:
        """The point-in-time image's bytes [offset, offset+length); OSError
        EIO if the snapshot is broken (looked at after reading, so that a
        read that may have seen data written after the break fails)."""
        data = self._read(offset, length)
        if self.copymap.broken:
            raise OSError(errno.EIO, "the snapshot is broken: its old data could not be saved")
        return data

    def _read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        cs = self.cluster_size
        first, last = offset // cs, -(-end // cs)
        count = last - first
        everything = (1 << count) - 1
        before = self.copymap.copied(first, last)
        if before == everything:
            return self.target.read(offset, end - offset)
        if before == 0:
            data = self.source.read(offset, end - offset)
        else:
            data = bytearray(end - offset)
            self._fill(data, offset, end, first, before, count, from_target_only=False)
        after = self.copymap.copied(first, last)
        if after == before:
            return data
        # Clusters copied while we read the source: their source bytes may be new.
        data = bytearray(data)
        self._fill(data, offset, end, first, after & ~before, count, from_target_only=True)
        return data

    def _fill(self, data: bytearray, offset: int, end: int, first: int, mask: int,
              count: int, from_target_only: bool) -> None:
        """Read the clusters' parts of [offset, end) into `data`: set bits from
        the target, clear bits from the source (unless `from_target_only`)."""
        cs = self.cluster_size
        view = memoryview(data)
        for run_start, run_end, bit in _runs(mask, count):
            if not bit and from_target_only:
                continue
            start = max(offset, (first + run_start) * cs)
            stop = min(end, (first + run_end) * cs)
            image = self.target if bit else self.source
            image.readinto(start, view[start - offset:stop - offset])
