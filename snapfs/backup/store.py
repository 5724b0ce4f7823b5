"""Where one snapshot's point-in-time data goes: its backup target and its
copy map, with the background copies in flight on them (claims).

A cluster's bit in the copy map is set only after the cluster's old data is in
the target, and never cleared while the snapshot lives (docs/design.md). Runs
in the live process; only its trio thread changes claims and bits, worker
threads only write the target's clusters that a claim covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from snapfs.backup.copymap import CopyMap
from snapfs.image.base import Image


@dataclass(eq=False)
class Claim:
    """Clusters [first, end) of one store being copied by its background job."""

    first: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)


class Store:
    def __init__(self, target: Image, copymap: CopyMap, on_error: str = "break-guest-write",
                 timeout: float | None = None):
        self.target = target
        self.copymap = copymap
        #: what a failed copy-before-write does: "break-guest-write" fails the
        #: write, "break-snapshot" breaks this store and lets the write through
        self.on_error = on_error
        #: seconds a write waits for its copy into this store before it counts as failed
        self.timeout = timeout
        #: why the snapshot broke (None: it did not); then nothing saves old data into it
        self.broken: str | None = "broken before the daemon restarted" if copymap.broken else None
        #: called (in the trio thread) when it breaks
        self.on_break: list = []
        #: writes that failed because their old data could not be saved here, and the last error
        self.failed_writes = 0
        self.last_error: str | None = None
        self.size = copymap.size
        self.cluster_size = copymap.cluster_size
        self.clusters = copymap.clusters
        self.clusters_copied_by_writes = 0
        self.claims: list[Claim] = []
        #: flushes in worker threads that include this store (it must not be
        #: closed until they are done)
        self.flushing = 0
        self._zero_cluster = bytes(self.cluster_size)

    def cluster_span(self, offset: int, length: int) -> tuple[int, int]:
        """The clusters [first, end) that bytes [offset, offset+length) touch."""
        cs = self.cluster_size
        return offset // cs, -(-(offset + length) // cs)

    def byte_span(self, first: int, end: int) -> tuple[int, int]:
        """The bytes [start, stop) of clusters [first, end), cut at the image's end."""
        return first * self.cluster_size, min(end * self.cluster_size, self.size)

    def uncopied_runs(self, first: int, end: int) -> list[tuple[int, int]]:
        """The runs of clusters in [first, end) whose bits are clear."""
        copymap = self.copymap
        runs = []
        start = copymap.next_uncopied(first, end)
        while start < end:
            stop = copymap.next_copied(start, end)
            runs.append((start, stop))
            start = copymap.next_uncopied(stop, end)
        return runs

    # --- saving old data ------------------------------------------------

    def put(self, start: int, data: memoryview) -> None:
        """Write old data (whole clusters from byte `start`, the last one may
        end at the image's end) to the target. All-zero clusters are stored with
        write_zeroes (holes in a raw target, zero clusters in a qcow2 one),
        never as data. Does not touch the copy map."""
        cs = self.cluster_size
        length = len(data)
        pos = 0
        while pos < length:
            zero = self._is_zero(data, pos)
            stop = pos + cs
            while stop < length and self._is_zero(data, stop) == zero:
                stop += cs
            stop = min(stop, length)
            if zero:
                self.target.write_zeroes(start + pos, stop - pos)
            else:
                self.target.write(start + pos, data[pos:stop])
            pos = stop

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
            claim = self.overlapping(first, first + 1)
            if claim is None:
                stop = copymap.next_copied(first, min(end, first + max_clusters))
                for other in self.claims:
                    if first < other.first < stop:
                        stop = other.first
                return first, stop
            first = copymap.next_uncopied(claim.end, end)
        return None

    def claim(self, first: int, end: int) -> Claim:
        assert self.overlapping(first, end) is None
        claim = Claim(first, end)
        self.claims.append(claim)
        return claim

    def release(self, claim: Claim, copied: bool) -> None:
        """End a claim; if `copied`, its clusters are in the target now."""
        if copied:
            self.copymap.mark(claim.first, claim.end)
        self.claims.remove(claim)
        claim.done.set()

    def overlapping(self, first: int, end: int) -> Claim | None:
        for claim in self.claims:
            if claim.first < end and first < claim.end:
                return claim
        return None

    # --- failures -------------------------------------------------------

    def break_(self, why: str) -> None:
        """The snapshot is broken for good: every read of it fails from now on.
        The caller takes it out of copy-before-write before any write whose
        old data it lacks goes through."""
        if self.broken is None:
            self.broken = why
            self.copymap.mark_broken()
            for callback in self.on_break:
                callback(why)

    # --- durability -----------------------------------------------------

    def flush(self) -> None:
        """Make the target, then the copy map, durable."""
        self.target.flush()
        self.copymap.flush()
