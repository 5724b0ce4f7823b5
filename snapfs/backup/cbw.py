"""Copy-before-write: the write path of the live disk and its copy state.

`CopyBeforeWrite` owns the source, the target and the copy map of the live
process. Every write to the live disk goes through `write`, which first copies
the old data of each cluster the write touches into the target (unless the
target already holds it), records it in the copy map, and only then writes the
source. The background job copies through the same object, claiming the
clusters it is copying so that a write to them waits for the copy instead of
copying them a second time.

Concurrency model: everything here runs in the live process's trio thread,
except `copy`, which the background job runs in a worker thread on clusters it
has claimed. `write` does no I/O while it awaits, and from the moment it sees
no claim on its clusters to its return it does not await at all, so no claim
can start on its clusters in between.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass, field

import trio

from snapfs.backup.copymap import CopyMap
from snapfs.image.base import Image


@dataclass(eq=False)
class Claim:
    """Clusters [first, end) being copied by the background job."""

    first: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)


class CopyBeforeWrite:
    def __init__(self, source: Image, target: Image, copymap: CopyMap):
        self.source = source
        self.target = target
        self.copymap = copymap
        self.size = source.size
        self.cluster_size = copymap.cluster_size
        self.clusters = copymap.clusters
        self.clusters_copied_by_writes = 0
        self._claims: list[Claim] = []
        self._zero_cluster = bytes(self.cluster_size)
        self._buffers = threading.local()

    def cluster_span(self, offset: int, length: int) -> tuple[int, int]:
        """The clusters [first, end) that bytes [offset, offset+length) touch."""
        return offset // self.cluster_size, -(-(offset + length) // self.cluster_size)

    # --- the write path -------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        """Write `data` to the source at `offset` (within the image), after
        saving the old data of every cluster it touches."""
        if not data:
            return  # touches no cluster, wherever it starts
        first, end = self.cluster_span(offset, len(data))
        while (claim := self._claim_overlapping(first, end)) is not None:
            await claim.done.wait()
        # From here to the end there is no checkpoint: the clusters are ours.
        self.clusters_copied_by_writes += self._copy_uncopied(first, end)
        self.source.write(offset, data)

    def _copy_uncopied(self, first: int, end: int) -> int:
        copymap = self.copymap
        copied = 0
        start = copymap.next_uncopied(first, end)
        while start < end:
            stop = copymap.next_copied(start, end)
            self.copy(start, stop)
            copymap.mark(start, stop)
            copied += stop - start
            start = copymap.next_uncopied(stop, end)
        return copied

    # --- copying --------------------------------------------------------

    def copy(self, first: int, end: int) -> None:
        """Copy clusters [first, end) from the source to the target; all-zero
        clusters are stored with write_zeroes (holes in a raw target, zero
        clusters in a qcow2 one), never as data. Does not touch the copy map."""
        cs = self.cluster_size
        start = first * cs
        length = min(end * cs, self.size) - start
        view = self._buffer(length)
        self.source.readinto(start, view)
        pos = 0
        while pos < length:
            zero = self._is_zero(view, pos)
            stop = pos + cs
            while stop < length and self._is_zero(view, stop) == zero:
                stop += cs
            stop = min(stop, length)
            if zero:
                self.target.write_zeroes(start + pos, stop - pos)
            else:
                self.target.write(start + pos, view[pos:stop])
            pos = stop

    def _buffer(self, length: int) -> memoryview:
        """A buffer of `length` bytes for the calling thread, reused from copy
        to copy: fresh memory for every copy costs page faults."""
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < length:
            # page-aligned, so that drivers may read into it with O_DIRECT
            buffer = self._buffers.buffer = mmap.mmap(-1, max(length, 1 << 20))
        return memoryview(buffer)[:length]

    def _is_zero(self, view: memoryview, pos: int) -> bool:
        chunk = bytes(view[pos:pos + self.cluster_size])
        return chunk == self._zero_cluster[:len(chunk)]

    # --- claims of the background job ----------------------------------

    def next_claimable(self, start: int, end: int, max_clusters: int) -> tuple[int, int] | None:
        """The first run of uncopied, unclaimed clusters in [start, end), at
        most `max_clusters` long, or None."""
        copymap = self.copymap
        first = copymap.next_uncopied(start, end)
        while first < end:
            claim = self._claim_overlapping(first, first + 1)
            if claim is None:
                stop = copymap.next_copied(first, min(end, first + max_clusters))
                for other in self._claims:
                    if first < other.first < stop:
                        stop = other.first
                return first, stop
            first = copymap.next_uncopied(claim.end, end)
        return None

    def claim(self, first: int, end: int) -> Claim:
        assert self._claim_overlapping(first, end) is None
        claim = Claim(first, end)
        self._claims.append(claim)
        return claim

    def release(self, claim: Claim, copied: bool) -> None:
        """End a claim; if `copied`, its clusters are in the target now."""
        if copied:
            self.copymap.mark(claim.first, claim.end)
        self._claims.remove(claim)
        claim.done.set()

    def _claim_overlapping(self, first: int, end: int) -> Claim | None:
        for claim in self._claims:
            if claim.first < end and first < claim.end:
                return claim
        return None

    # --- durability -----------------------------------------------------

    def flush(self) -> None:
        """Make the target and the copy map durable, then the source: old data
        must be safe before the new data that replaced it."""
        self.target.flush()
        self.copymap.flush()
        self.source.flush()
