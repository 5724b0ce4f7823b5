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

import errno
import functools
import logging
import mmap
import threading

import trio

from snapfs.backup.changes import ChangeTracker
from snapfs.backup.store import Claim, Store
from snapfs.errors import describe
from snapfs.image.base import Image

log = logging.getLogger("snapfs")


#: worker threads copy-before-write may keep busy at once with --cbw-timeout
#: (threads stuck on a hung target count until it answers; past this, a copy
#: waits for a free one within its deadline, rather than take every thread
#: that change tracking and the jobs need too)
CBW_THREADS = 32


class _Read:
    """The old data read once for several stores' threads."""

    def __init__(self):
        self.done = threading.Event()
        self.error: OSError | None = None


class _Handoff:
    """Who releases a store's claims: the thread that copies, or, if it is
    given up before a thread took it, the trio task that gave it up."""

    def __init__(self):
        self._lock = threading.Lock()
        self._state = "waiting"

    def take(self) -> bool:
        with self._lock:
            if self._state == "waiting":
                self._state = "taken"
        return self._state == "taken"

    def give_up(self) -> bool:
        with self._lock:
            if self._state == "waiting":
                self._state = "given up"
        return self._state == "given up"


class CopyBeforeWrite:
    def __init__(self, source: Image, tracker: ChangeTracker | None = None):
        self.source = source
        self.size = source.size
        self.tracker = tracker
        self.stores: list[Store] = []
        self._buffers = threading.local()
        self._threads = trio.CapacityLimiter(CBW_THREADS)

    def add(self, store: Store) -> None:
        """From now on, writes save old data into `store` too."""
        self.stores.append(store)

    def remove(self, store: Store) -> None:
        """From now on, writes no longer save anything into `store`."""
        self.stores.remove(store)

    # --- the write path -------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        """Write `data` to the source at `offset` (within the image), after
        saving the old data of every cluster it touches. If old data cannot
        be saved into a store, its policy decides: "break-guest-write" fails
        this write (OSError ENOSPC or EIO, the source unchanged), and
        "break-snapshot" breaks that snapshot and lets the write through."""
        if not data:
            return  # touches no cluster, wherever it starts
        end = offset + len(data)
        tracker = self.tracker
        started = None  # when the write began to wait for a store with a timeout
        while True:  # until a pass finds nothing to wait for
            if tracker is not None and not tracker.ready(offset, end):
                await tracker.track(offset, end)  # the change is durable first
                continue
            found = self._claim_overlapping(offset, end)
            if found is not None:
                if started is None and found[0].timeout is not None:
                    started = trio.current_time()
                await self._wait_for_claim(*found, started)
                continue
            needs = self._needs(offset, end)
            if not needs:
                break
            if all(store.timeout is None for store, _ in needs):
                # No checkpoint from the look above to the end: the clusters
                # are ours, and no boundary of change tracking can come in between.
                self._save_old_data(needs)
                break
            if started is None:
                started = trio.current_time()
            await self._save_old_data_in_thread(needs, started)
            # and look again: while we waited, anything may have happened
        self.source.write(offset, data)

    def _needs(self, offset: int, end: int) -> list[tuple[Store, list[tuple[int, int]]]]:
        """For each store that lacks old data of [offset, end): its runs of
        clusters to save."""
        needs = []
        for store in self.stores:
            runs = store.uncopied_runs(*store.cluster_span(offset, end - offset))
            if runs:
                needs.append((store, runs))
        return needs

    def _save_old_data(self, needs) -> None:
        """Read the old data once and put it into every store that needs it,
        marking it there; failures go to the stores' policies."""
        failures = []
        try:
            low, old = self._read_old_data(needs)
        except OSError as e:
            failures = [(store, e) for store, _ in needs]
        else:
            for store, runs in needs:
                try:
                    self._put_runs(store, runs, low, old, mark=True)
                except OSError as e:
                    failures.append((store, e))
        self._failed(failures)

    def _read_old_data(self, needs) -> tuple[int, memoryview]:
        low, high = _bytes_needed(needs)
        old = self._buffer(high - low)
        self.source.readinto(low, old)
        return low, old

    def _put_runs(self, store: Store, runs, low: int, old: memoryview, mark: bool) -> None:
        for first, stop in runs:
            start, stop_byte = store.byte_span(first, stop)
            store.put(start, old[start - low:stop_byte - low])
            if mark:
                store.copymap.mark(first, stop)
                store.clusters_copied_by_writes += stop - first

    async def _save_old_data_in_thread(self, needs, started: float) -> None:
        """The same as `_save_old_data`, in worker threads, for stores with a
        timeout: one thread reads the old data, one per store writes it, so
        that a hung target holds up no other store. The runs are claimed
        meanwhile (other writes to them wait); a store that does not get its
        copy by its deadline fails by its policy. Threads are left to finish
        on their own: each releases its store's claims (marking what it
        copied) when it is done."""
        claims = [(store, [store.claim(first, stop) for first, stop in runs])
                  for store, runs in needs]
        low, high = _bytes_needed(needs)
        old = bytearray(high - low)  # not a reused buffer: a thread may outlive this call
        read = _Read()
        outcome: dict[int, OSError | None] = {}  # id(store): None once copied, or the error
        token = trio.lowlevel.current_trio_token()

        def settle(store: Store, store_claims, error: OSError | None) -> None:
            outcome[id(store)] = error
            for claim in store_claims:
                store.release(claim, copied=error is None and store.broken is None)
            if error is None:
                store.clusters_copied_by_writes += sum(c.end - c.first for c in store_claims)
            store.flushing -= 1

        def read_old() -> None:
            try:
                self.source.readinto(low, memoryview(old))
            except OSError as e:
                read.error = e
            finally:
                read.done.set()

        def put(store: Store, runs, store_claims, handoff: _Handoff) -> None:
            if not handoff.take():
                return  # given up before this thread started: settled already
            read.done.wait()
            error = read.error
            if error is None:
                try:
                    self._put_runs(store, runs, low, memoryview(old), mark=False)
                except OSError as e:
                    error = e
            try:
                trio.from_thread.run_sync(settle, store, store_claims, error, trio_token=token)
            except trio.RunFinishedError:
                pass

        async def run_put(store: Store, runs, store_claims) -> None:
            handoff = _Handoff()
            try:
                await trio.to_thread.run_sync(put, store, runs, store_claims, handoff,
                                              abandon_on_cancel=True, limiter=self._threads)
            except trio.Cancelled:
                if handoff.give_up():  # no thread took it: release the claims here
                    settle(store, store_claims, TimeoutError(
                        errno.ETIMEDOUT, "no thread was free for copy-before-write"))
                raise

        for store, _ in needs:
            store.flushing += 1  # not closed while a thread may write it
        failures = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                trio.to_thread.run_sync, read_old, abandon_on_cancel=True))
            for (store, runs), (_, store_claims) in zip(needs, claims):
                nursery.start_soon(run_put, store, runs, store_claims)
            def deadline(store: Store) -> float:
                return started + store.timeout if store.timeout is not None else float("inf")

            for store, store_claims in sorted(claims, key=lambda pair: deadline(pair[0])):
                with trio.move_on_at(deadline(store)):
                    for claim in store_claims:
                        await claim.done.wait()
                if id(store) not in outcome:
                    failures.append((store, _timed_out(store)))
                elif outcome[id(store)] is not None:
                    failures.append((store, outcome[id(store)]))
            nursery.cancel_scope.cancel()  # the threads go on alone if they must
        self._failed(failures)

    async def _wait_for_claim(self, store: Store, claim: Claim, started: float | None) -> None:
        """Wait until `claim` (a copy into `store` in flight) is done, at most
        until the store's timeout runs out; then the copy counts as failed."""
        if store.timeout is None:
            await claim.done.wait()
            return
        with trio.move_on_at(started + store.timeout):
            await claim.done.wait()
        if not claim.done.is_set():
            self._failed([(store, _timed_out(store))])

    def _failed(self, failures: list[tuple[Store, OSError]]) -> None:
        """Apply each store's policy to its failure: break the snapshot (it is
        out of copy-before-write when this returns), or fail the write."""
        refused = None
        for store, error in failures:
            why = describe(error)
            if store.on_error == "break-snapshot":
                log.error("%s: breaking the snapshot: old data could not be saved: %s",
                          store.target.path, why)
                self.break_store(store, f"old data could not be saved: {why}")
            else:
                store.failed_writes += 1
                store.last_error = why
                if refused is None:
                    refused = error
        if refused is not None:
            code = errno.ENOSPC if refused.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
            raise OSError(code, f"old data could not be saved: {describe(refused)}")

    def break_store(self, store: Store, why: str) -> None:
        """Break a snapshot: its reads fail from now on, and no write saves
        old data for it any more."""
        store.break_(why)
        if store in self.stores:
            self.remove(store)

    def _claim_overlapping(self, offset: int, end: int) -> tuple[Store, Claim] | None:
        for store in self.stores:
            claim = store.overlapping(*store.cluster_span(offset, end - offset))
            if claim is not None:
                return store, claim
        return None

    # --- the background copy --------------------------------------------

    def copy(self, store: Store, first: int, end: int, clone: bool = False) -> bool:
        """Copy clusters [first, end) from the source to `store`'s target
        (the caller holds a claim on them). Does not touch the copy map.
        With `clone`, first try to clone them instead (the target shares the
        source's extents, see `Image.clone_from`); True if they were cloned,
        False if copied."""
        start, stop = store.byte_span(first, end)
        if clone and store.target.clone_from(self.source, start, stop - start):
            return True
        view = self._buffer(stop - start)
        self.source.readinto(start, view)
        store.put(start, view)
        return False

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
        store being flushed is not closed meanwhile (see `Store.flushing`).
        A store that cannot be flushed fails by its policy: the flush fails
        (EIO, the source not flushed), or the snapshot breaks."""
        stores = list(self.stores)
        for store in stores:
            store.flushing += 1
        try:
            failures = await trio.to_thread.run_sync(self._flush, stores)
        finally:
            for store in stores:
                store.flushing -= 1
        self._failed(failures)

    def _flush(self, stores: list[Store]) -> list[tuple[Store, OSError]]:
        failures = []
        for store in stores:
            try:
                store.flush()
            except OSError as e:
                failures.append((store, e))
        if all(store.on_error == "break-snapshot" for store, _ in failures):
            self.source.flush()
        return failures


def _bytes_needed(needs) -> tuple[int, int]:
    """The bytes [low, high) that cover every store's runs in `needs`."""
    low = min(store.byte_span(*runs[0])[0] for store, runs in needs)
    high = max(store.byte_span(*runs[-1])[1] for store, runs in needs)
    return low, high


def _timed_out(store: Store) -> TimeoutError:
    return TimeoutError(errno.ETIMEDOUT, f"copy-before-write took more than {store.timeout:g} s")
