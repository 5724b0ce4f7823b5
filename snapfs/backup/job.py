"""The background job that fills the target according to the sync mode.

- full: every cluster of the image;
- top: the clusters that hold data in the source's topmost layer (for a raw
  file, its allocated extents), as they were when the job started;
- none: nothing (the job only reports; copy-before-write does all the work);
- incremental: the clusters change tracking says changed since the base
  backup (`changed`, one bit per `changed_granularity` bytes).

The job walks the clusters in order: each of its COPY_WORKERS tasks claims the
next run of clusters that are neither copied nor claimed, copies it in a
worker thread and releases it.

Where the target can share the source's extents (raw files on one file system
that has reflinks: XFS, btrfs), the job clones the runs instead of copying
them (`Image.clone_from`), in the same place: in the worker thread, on the
claimed clusters, the bits set after it returns. Its first attempt decides for
the whole job: if it cannot clone, it copies from then on without asking
again; if it can, runs grow to CLONE_CHUNK_BYTES (a clone costs metadata, not
bandwidth), and a run that cannot be cloned after all is copied. The job stops between two runs when asked
(cancel or shutdown), never in the middle of one.

With a speed limit the job pays before it copies: a run of n bytes starts no
earlier than n / speed seconds after the runs before it were paid for, so at
any time t after the start it has copied at most speed * t bytes (plus the
clusters that writes made it skip). Runs are cut to a quarter second's worth,
and the waiting happens before a run is claimed, so a write never waits for
the job's pause.
"""

from __future__ import annotations

import array
import collections
import logging

import trio

from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.backup.store import Store
from snapfs.errors import describe
from snapfs.protocol import SYNC_MODES

log = logging.getLogger(__name__)

#: bytes one claim copies at most (the last one may be shorter)
CHUNK_BYTES = 4 << 20
#: bytes one claim clones at most, once the job knows it can clone
CLONE_CHUNK_BYTES = 64 << 20
#: copies in flight at once: one reads while the other writes
COPY_WORKERS = 2
#: with a speed limit, a run holds at most this many seconds' worth of bytes
PACE_SECONDS = 0.25
#: the window over which the rate is measured
RATE_WINDOW = 5.0


class BackupJob:
    def __init__(self, engine: CopyBeforeWrite, store: Store, sync: str,
                 speed: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                 changed: int = 0, changed_granularity: int = 1):
        """Plans the copy: for top, what the source's top layer holds now (the
        caller makes this the snapshot's point in time)."""
        if sync not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {sync!r}")
        self.engine = engine
        self.store = store
        self.sync = sync
        self.speed = speed
        self.state = "running"
        self.error: str | None = None
        self.bytes_done = 0
        #: what the job copied itself (the rest of bytes_done it found copied)
        self.bytes_copied = 0
        #: (time, bytes_done) after recent chunks, for the rate
        self._progress: collections.deque = collections.deque()
        if speed:
            chunk_bytes = min(chunk_bytes, int(speed * PACE_SECONDS))
        self._max_clusters = max(1, chunk_bytes // store.cluster_size)
        #: clone clusters instead of copying them: None until the first attempt says
        self.cloning: bool | None = None
        self._decided = trio.Event()
        self._probing = False
        self._clone_clusters = (max(self._max_clusters, CLONE_CHUNK_BYTES // store.cluster_size)
                                if not speed else self._max_clusters)
        #: the part of bytes_copied that was cloned
        self.bytes_cloned = 0
        self._changed = (changed, changed_granularity)
        self._runs = self._cluster_runs()
        self.bytes_total = sum(self._run_bytes(self._runs[i], self._runs[i + 1])
                               for i in range(0, len(self._runs), 2))
        self._stop = trio.Event()
        self._again = False  # see _copy_all
        self._pace = trio.Lock()
        self.finished = trio.Event()
        store.on_break.append(lambda why: self._stop.set())

    def _cluster_runs(self) -> array.array:
        """The clusters to copy, as a flat array [first0, end0, first1, end1, ...]."""
        store = self.store
        runs = array.array("Q")
        if self.sync == "full":
            runs.extend((0, store.clusters))
        elif self.sync in ("top", "incremental"):
            cs = store.cluster_size
            extents = (self.engine.source.data_extents(0, store.size) if self.sync == "top"
                       else _set_extents(*self._changed, store.size))
            for start, end in extents:
                first, stop = start // cs, -(-end // cs)
                if runs and runs[-1] >= first:  # touches the previous run
                    runs[-1] = max(runs[-1], stop)
                else:
                    runs.extend((first, stop))
        return runs

    def _run_bytes(self, first: int, end: int) -> int:
        start, stop = self.store.byte_span(first, end)
        return stop - start

    def _note_progress(self) -> None:
        now = trio.current_time()
        self._progress.append((now, self.bytes_done))
        while self._progress and self._progress[0][0] < now - RATE_WINDOW:
            self._progress.popleft()

    def rate(self) -> float | None:
        """Bytes per second over the last RATE_WINDOW seconds (None: too early
        to say, or not running)."""
        if self.state != "running" or len(self._progress) < 2:
            return None
        (t0, b0), (t1, b1) = self._progress[0], self._progress[-1]
        now = trio.current_time()
        if now - t1 > RATE_WINDOW:  # nothing moved lately
            return 0.0
        return (b1 - b0) / (now - t0) if now > t0 else None

    def seconds_left(self) -> float | None:
        rate = self.rate()
        if not rate:
            return None
        return max(0.0, (self.bytes_total - self.bytes_done) / rate)

    def cancel(self) -> None:
        """Stop the copy at the next run boundary, for good (nothing to do
        unless a copy is running)."""
        if self.state == "running" and self.sync != "none":
            self._stop.set()

    def stop(self) -> None:
        """Stop the copy because snapfs is shutting down."""
        self._stop.set()

    def ended(self, state: str, error: str | None = None) -> None:
        """The job had ended before the daemon restarted (the copy map's
        header says how): it stays ended and `run` returns at once."""
        self.state, self.error = state, error
        if state == "completed":
            self.bytes_done = self.bytes_total
        self._stop.set()
        self.finished.set()

    async def run(self) -> None:
        """Copy until done or stopped. With sync none, just wait to be stopped:
        the target then holds every cluster that writes replaced."""
        if self.finished.is_set():
            return
        try:
            if self.sync == "none":
                await self._stop.wait()
                finished = True
            else:
                finished = await self._copy_all()
        except Exception as e:  # an I/O error ends the job, not the daemon
            if self.store.broken is None:
                log.exception("background copy failed")
            self.state = "failed"
            self.error = self.store.broken or describe(e)
        else:
            if self.store.broken is not None:  # its snapshot broke: it stopped
                self.state, self.error = "failed", self.store.broken
            else:
                self.state = "completed" if finished else "cancelled"
            log.info("background copy %s: %d of %d bytes (%d cloned)", self.state,
                     self.bytes_done, self.bytes_total, self.bytes_cloned)
        finally:
            self.finished.set()

    async def _copy_all(self) -> bool:
        """Copy every run with COPY_WORKERS copies in flight; False if stopped
        before the end.

        A pass skips clusters that a copy-before-write has claimed (with
        --cbw-timeout it copies in a worker thread); if that copy then fails,
        they are still uncopied when the pass ends, so passes go on, after
        those claims end, until every cluster of the runs is in the target."""
        self._started = trio.current_time()
        self._paid = 0  # bytes of the runs claimed so far, for the speed limit
        self._again = False  # a later pass: what it skips or copies was counted done
        while True:
            self._run = 0
            self._pos = self._runs[0] if self._runs else 0
            async with trio.open_nursery() as nursery:
                for _ in range(COPY_WORKERS):
                    nursery.start_soon(self._worker)
            if self._run * 2 < len(self._runs):
                return False  # stopped
            if not self._uncopied_left():
                return True
            while self.store.claims and not self._stop.is_set():
                with trio.move_on_after(0.1):
                    await self.store.claims[0].done.wait()
            if self._stop.is_set():
                return False
            self._again = True

    def _uncopied_left(self) -> bool:
        runs, copymap = self._runs, self.store.copymap
        return any(copymap.next_uncopied(runs[i], runs[i + 1]) < runs[i + 1]
                   for i in range(0, len(runs), 2))

    def _next_chunk(self, move: bool = True) -> tuple[int, int] | None:
        """Claimable clusters at the job's position, which moves past them
        (unless not `move`); what it skips was copied already (by writes)."""
        runs, run, pos, skipped = self._runs, self._run, self._pos, 0
        found = None
        while run * 2 < len(runs):
            end = runs[run * 2 + 1]
            found = self.store.next_claimable(pos, end, self._max_clusters)
            if found is not None:
                skipped += self._run_bytes(pos, found[0])
                pos = found[1]
                break
            skipped += self._run_bytes(pos, end)
            run += 1
            if run * 2 < len(runs):
                pos = runs[run * 2]
        if move:
            self._run, self._pos = run, pos
            if not self._again:
                self.bytes_done += skipped
        return found

    async def _worker(self) -> None:
        store = self.store
        while not self._stop.is_set():
            if self._probing:  # another worker's first clone attempt decides first
                await self._decided.wait()
                continue
            probe = self.cloning is None
            claim = await self._claim_next()
            if claim is None:
                return
            if probe and self.cloning is None:
                self._probing = True
            copied = cloned = False
            try:
                cloned = await trio.to_thread.run_sync(
                    self.engine.copy, store, claim.first, claim.end, self.cloning is not False)
                copied = True
            finally:
                store.release(claim, copied=copied)
                if self._probing:
                    self._decide(copied and cloned)
            done = self._run_bytes(claim.first, claim.end)
            if not self._again:
                self.bytes_done += done
            self.bytes_copied += done
            if cloned:
                self.bytes_cloned += done
            self._note_progress()

    def _decide(self, cloning: bool) -> None:
        """The first clone attempt is over: clone from now on, or never try again."""
        self._probing = False
        self.cloning = cloning
        if cloning:
            self._max_clusters = self._clone_clusters
            log.info("background copy: cloning the clusters (the target shares SOURCE's extents)")
        self._decided.set()

    async def _claim_next(self):
        """Claim the next run to copy, after waiting for its turn under the
        speed limit; None when there is nothing left or the job was stopped."""
        if not self.speed:
            found = self._next_chunk()
            return None if found is None else self.store.claim(*found)
        async with self._pace:
            ahead = self._next_chunk(move=False)
            if ahead is None:
                self._next_chunk()  # nothing left: move to the end
                return None
            paid = self._paid + self._run_bytes(*ahead)
            with trio.move_on_at(self._started + paid / self.speed):
                await self._stop.wait()
            if self._stop.is_set():
                return None
            # No checkpoint from here on: writes may have copied part of the
            # run meanwhile, so look again and claim at once.
            found = self._next_chunk()
            if found is None:
                return None
            self._paid += self._run_bytes(*found)
            return self.store.claim(*found)


def _set_extents(value: int, granularity: int, size: int):
    """Yield the byte ranges (start, end) of the set bits of `value` (bit i:
    bytes [i * granularity, (i+1) * granularity))."""
    c = 0
    while value >> c:
        rest = value >> c
        c += (rest & -rest).bit_length() - 1  # the next set bit
        ones = ~(value >> c)
        stop = c + (ones & -ones).bit_length() - 1  # the next clear bit after it
        yield c * granularity, min(stop * granularity, size)
        c = stop
