"""Copy-before-write: the write path of the live disk.

`CopyBeforeWrite` owns the source and the stores of the snapshots that are
taken of it (each its own target and copy map, as device-mapper gives each
snapshot its own exception store). Every write to the live disk goes through
`write`, which first saves the old data of each cluster the write touches into
every store that does not hold it yet, records it in that store's copy map,
and only then writes the source. The old data is read from the source once per
write, whatever the number of stores that need it. The background jobs copy
through `copy`, claiming the clusters they are copying in their store, so that
a write to them waits for the copy instead of copying them a second time.
Before any of that, a write makes sure change tracking (backup/changes.py)
has durably recorded the clusters it changes.

Concurrency model: everything here runs in the live process's trio thread,
except `copy`, which a background job runs in a worker thread on clusters it
has claimed. `write` does no I/O while it awaits, and from the moment it sees
no claim on its bytes to its return it does not await at all: no claim can
start on its clusters in between, and no store can be added or removed.
"""

from __future__ import annotations

import mmap
import threading

import trio

from snapfs.backup.changes import ChangeTracker
from snapfs.backup.store import Claim, Store
from snapfs.image.base import Image


class CopyBeforeWrite:
    def __init__(self, source: Image, tracker: ChangeTracker | None = None):
        self.source = source
        self.size = source.size
        self.tracker = tracker
        self.stores: list[Store] = []
        self._buffers = threading.local()

    def add(self, store: Store) -> None:
        """From now on, writes save old data into `store` too."""
        self.stores.append(store)

    def remove(self, store: Store) -> None:
        """From now on, writes no longer save anything into `store`."""
        self.stores.remove(store)

    # --- the write path -------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        """Write `data` to the source at `offset` (within the image), after
        saving the old data of every cluster it touches."""
        if not data:
            return  # touches no cluster, wherever it starts
        end = offset + len(data)
        tracker = self.tracker
        while True:  # until a pass finds nothing to wait for
            if tracker is not None and not tracker.ready(offset, end):
                await tracker.track(offset, end)  # the change is durable first
                continue
            claim = self._claim_overlapping(offset, end)
            if claim is not None:
                await claim.done.wait()
                continue
            break
        # From here to the end there is no checkpoint: the clusters are ours,
        # and no boundary of change tracking can come in between.
        self._save_old_data(offset, end)
        self.source.write(offset, data)

    def _save_old_data(self, offset: int, end: int) -> None:
        needs = []
        low, high = end, offset
        for store in self.stores:
            runs = store.uncopied_runs(*store.cluster_span(offset, end - offset))
            if runs:
                needs.append((store, runs))
                low = min(low, store.byte_span(*runs[0])[0])
                high = max(high, store.byte_span(*runs[-1])[1])
        if not needs:
            return
        old = self._buffer(high - low)
        self.source.readinto(low, old)
        for store, runs in needs:
            for first, stop in runs:
                start, stop_byte = store.byte_span(first, stop)
                store.put(start, old[start - low:stop_byte - low])
                store.copymap.mark(first, stop)
                store.clusters_copied_by_writes += stop - first

    def _claim_overlapping(self, offset: int, end: int) -> Claim | None:
        for store in self.stores:
            claim = store.overlapping(*store.cluster_span(offset, end - offset))
            if claim is not None:
                return claim
        return None

    # --- the background copy --------------------------------------------

    def copy(self, store: Store, first: int, end: int) -> None:
        """Copy clusters [first, end) from the source to `store`'s target
        (the caller holds a claim on them). Does not touch the copy map."""
        start, stop = store.byte_span(first, end)
        view = self._buffer(stop - start)
        self.source.readinto(start, view)
        store.put(start, view)

    def _buffer(self, length: int) -> memoryview:
        """A buffer of `length` bytes for the calling thread, reused from copy
        to copy: fresh memory for every copy costs page faults."""
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < length:
            # page-aligned, so that drivers may read into it with O_DIRECT
            buffer = self._buffers.buffer = mmap.mmap(-1, max(length, 1 << 20))
        return memoryview(buffer)[:length]

    # --- durability -----------------------------------------------------

    async def flush(self) -> None:
        """Make every store durable, then the source: old data must be safe
        before the new data that replaced it. Runs in a worker thread; a
        store being flushed is not closed meanwhile (see `Store.flushing`)."""
        stores = list(self.stores)
        for store in stores:
            store.flushing += 1
        try:
            await trio.to_thread.run_sync(self._flush, stores)
        finally:
            for store in stores:
                store.flushing -= 1

    def _flush(self, stores: list[Store]) -> None:
        for store in stores:
            store.flush()
        self.source.flush()
