"""Change tracking: which clusters of the live disk changed since each backup.

Time is cut by *boundaries*, one per backup that may become a base for
incremental ones (a FULL, a TOP into qcow2, an incremental): its point in
time. Between two boundaries, and after the last one, a *segment* records
the clusters that writes changed, one bit per `GRANULARITY` bytes: segment i
holds the changes from boundary i to boundary i+1, the last segment (the
active one) those since the last boundary. What changed since boundary j is
the union of the segments from j on. A boundary is `pending` while its backup
runs, a `checkpoint` once its job completed; a backup that is cancelled,
fails or ends before completing takes its boundary away, and its segment is
merged into the one before (as QEMU's bitmap-mode on-success): the next
incremental still sees those changes. Before the first boundary nothing is
tracked (there is nothing to be incremental to), so a live disk that never
had a backup pays nothing.

The rule: a cluster's bit is durable before the first write to it since the
last boundary can reach SOURCE. `CopyBeforeWrite.write` asks `ready` (no
checkpoint) before it writes, and awaits `track` until it is: `track` sets
the bits and syncs them (msync) in a worker thread, so the cost is one sync
per newly changed cluster, never per write; writes that come while a sync
runs are made durable together by the next one (group commit). A write sets and syncs exactly
the bits of the clusters it touches, except that a write that starts where the last tracked one ended (a
sequential writer) also gets the bits of the next `SEQUENTIAL_BATCH` clusters
at once. Those bits ahead are remembered until a write reaches them; at the
next boundary, the ones still unwritten are cleared again and left out of
what changed. So the bits say exactly what changed, except after a crash:
then they may say more (bits ahead that no write reached), never less.

Files, in the live disk's state directory (`changes/`): `index.json` (the
boundaries, the segments' files, the SOURCE record below), one bitmap file
per segment, and a spare segment made ahead of time, so that a boundary can
be added at the point in time without any I/O. `index.json` is replaced
atomically. A crash between a boundary and the index that records it leaves
bits in the spare: they are merged into the active segment when the index is
next read (more than changed, never less).

What SOURCE looked like (`seen`): every save of the index records SOURCE's
identity, size and times, and the index is saved whenever the disk has had no
write for a second and at a clean stop; a heartbeat file notes the time
every second while writes go on. At the next start, SOURCE must match the
record, or (after a daemon that died on this same boot, while writing) have
changed no later than its last heartbeat allows; otherwise something wrote
it while no snapfs instance had it mounted, and every boundary is dropped
(`invalid` says why): the next backup must be a full one. (A write by
another program within two seconds of the daemon's death cannot be told from
the daemon's own last writes.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time

import trio
from typing import Callable

from snapfs.backup.bitmap import ClusterBitmap
from snapfs.durable import fsync_dir, replace_json

#: bytes per bit of change tracking
GRANULARITY = 64 << 10
#: how far ahead a sequential writer's bits are set and synced at once (4 MiB):
#: the cost of a sync is paid once per batch, and at most the end of the last
#: batch of a sequential run is reported changed without being written
SEQUENTIAL_BATCH = 64
#: boundaries kept at most; older checkpoints are merged away
MAX_BOUNDARIES = 16
#: how long after a write SOURCE counts as quiet
QUIET_SECONDS = 1.0
#: slack between the last heartbeat and SOURCE's ctime after a daemon died
HEARTBEAT_SLACK_NS = 2_000_000_000

INDEX = "index.json"
#: what a boundary may be
STATES = ("pending", "checkpoint")
HEARTBEAT = "heartbeat"


class ChangeMap(ClusterBitmap):
    MAGIC = b"SNAPFS-CHANGES\n"
    KIND = "change map"


def source_record(fd: int, identity: list[int], boot: str) -> dict:
    st = os.fstat(fd)
    return {"identity": identity, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "boot_id": boot}


class ChangeTracker:
    def __init__(self, directory: str, size: int, record: Callable[[], dict]):
        self.dir = directory
        self.size = size
        self._record = record
        self.clusters = -(-size // GRANULARITY)
        self.boundaries: list[dict] = []  # {"id", "state", "backup": {...}}
        self.segments: list[ChangeMap] = []  # one per boundary
        self.spare: ChangeMap | None = None
        self.invalid: str | None = None  # why tracking was reset, until a new checkpoint
        #: bits set but not yet durable: waiting for a sync, and in the one running
        self._unsynced: list[tuple[ChangeMap, int, int]] = []
        self._syncing: list[tuple[ChangeMap, int, int]] = []
        self._round: trio.Event | None = None  # set when the running sync ends
        self._retired: list[ChangeMap] = []  # removed, closed once no sync uses them
        self._sequential_end = -1  # where the last tracked write ended (cluster)
        self._ahead: set[int] = set()  # bits set ahead of a sequential writer, not yet written
        self._saving = threading.Lock()  # saves run in worker threads
        self._last_write = 0.0
        self._quiet_recorded = True

    # --- opening and saving ---------------------------------------------

    @classmethod
    def open(cls, directory: str, size: int, record: Callable[[], dict]) -> "ChangeTracker":
        """The tracker of the live disk whose state directory holds
        `directory`; `record()` describes SOURCE now (`source_record`), and
        is checked against what was recorded."""
        tracker = cls(directory, size, record)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            with open(os.path.join(directory, INDEX)) as f:
                index = json.load(f)
        except FileNotFoundError:
            index = None
        except (ValueError, OSError):
            index = {"size": None}  # damaged: start afresh, saying why
            _remove_path(os.path.join(directory, INDEX))
        if index is not None:
            tracker._load(index)
        tracker._remove_strays()
        return tracker

    def _load(self, index) -> None:
        try:
            why = self._load_checked(index)
        except (TypeError, KeyError, ValueError, AttributeError, OSError) as e:
            why = f"the change tracking's files are damaged ({e!r})"
        if why:
            self._reset(why)

    def _load_checked(self, index) -> str | None:
        """Open what the index lists, checking every piece; why it cannot be
        trusted, or None. Raises on a damaged index."""
        if not isinstance(index, dict):
            raise ValueError("the index is not an object")
        if index.get("size") != self.size or index.get("granularity") != GRANULARITY:
            return "SOURCE's size changed, or the change tracking's index is damaged"
        self.invalid = index.get("invalid")
        if self.invalid is not None and not isinstance(self.invalid, str):
            raise ValueError("invalid is not text")
        boundaries, names = index.get("boundaries", []), index.get("segments", [])
        counts = index.get("counts", [0] * len(names))
        if not (isinstance(boundaries, list) and isinstance(names, list)
                and isinstance(counts, list) and len(boundaries) == len(names) == len(counts)):
            raise ValueError("boundaries, segments and counts do not match")
        for boundary in boundaries:
            backup = boundary["backup"]
            if not (isinstance(boundary["id"], str) and boundary["state"] in STATES
                    and isinstance(backup, dict) and isinstance(backup.get("target"), str)):
                raise ValueError("a boundary's record is incomplete")
        why = self._changed_offline(index)
        for name, count in zip(names, counts):
            segment = self._open_segment(name)
            self.segments.append(segment)
            if segment.count() < count:  # bits are never cleared but by a boundary
                why = why or f"change tracking segment {name} lost bits"
        self.boundaries = boundaries
        spare = index.get("spare")
        if spare and os.path.lexists(os.path.join(self.dir, spare)):
            self.spare = self._open_segment(spare)
            if self.segments and self.spare.count():  # a boundary the index missed
                self.segments[-1].set_bits(self.spare.bits())
                self.segments[-1].flush()
        return why

    def _open_segment(self, name: str) -> ChangeMap:
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"bad segment name {name!r}")
        segment = ChangeMap.open(os.path.join(self.dir, name), writable=True)
        if (segment.info.get("name") != name or segment.size != self.size
                or segment.cluster_size != GRANULARITY):
            segment.close()
            raise ValueError(f"{name} is not a change tracking segment of this disk")
        return segment

    def _changed_offline(self, index: dict) -> str | None:
        """Why SOURCE may have been written while no instance had it
        mounted, or None."""
        if not index.get("boundaries"):
            return None
        seen, now = index.get("seen"), self._record()
        if not isinstance(seen, dict):
            return "nothing recorded what SOURCE looked like"
        if now["identity"] != seen["identity"] or now["size"] != seen["size"]:
            return "SOURCE (or a file of its backing chain) was replaced or changed"
        if (now["mtime_ns"], now["ctime_ns"]) == (seen["mtime_ns"], seen["ctime_ns"]):
            return None
        if not index.get("clean") and seen["boot_id"] == now["boot_id"]:
            # the daemon died while writing: its own last writes are no later
            # than its last heartbeat allows
            try:
                with open(os.path.join(self.dir, HEARTBEAT)) as f:
                    beat = int(f.read().strip() or 0)
            except (OSError, ValueError):
                beat = 0
            if beat and now["ctime_ns"] <= beat + HEARTBEAT_SLACK_NS:
                return None
        return ("SOURCE was changed while no snapfs instance had it mounted (or just "
                "before the machine went down)")

    def _reset(self, why: str) -> None:
        for segment in self.segments:
            _remove(segment)
        if self.spare is not None:
            _remove(self.spare)
        self.segments, self.boundaries, self.spare = [], [], None
        self.invalid = why

    def _remove_strays(self) -> None:
        keep = {os.path.basename(s.path) for s in self.segments}
        if self.spare is not None:
            keep.add(os.path.basename(self.spare.path))
        for name in os.listdir(self.dir):
            if name.endswith(".map") and name not in keep:
                _remove_path(os.path.join(self.dir, name))

    def save(self, clean: bool = False) -> None:
        """Write the index durably, with what SOURCE looks like now (from a
        worker thread); `clean` at a clean stop."""
        with self._saving:
            self._save(clean)

    def _save(self, clean: bool) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)  # renamed away meanwhile?
        index = {"size": self.size, "granularity": GRANULARITY,
                 "boundaries": self.boundaries,
                 "segments": [os.path.basename(s.path) for s in self.segments],
                 "counts": [s.count() for s in self.segments],
                 "spare": os.path.basename(self.spare.path) if self.spare else None,
                 "invalid": self.invalid, "seen": self._record(), "clean": clean}
        replace_json(os.path.join(self.dir, INDEX), index)

    def make_spare(self) -> None:
        """Make the segment file the next boundary will use (in a worker thread)."""
        if self.spare is None:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            name = f"segment-{secrets.token_hex(6)}.map"
            self.spare = ChangeMap.create(os.path.join(self.dir, name), self.size, GRANULARITY,
                                          {"name": name})
            self.spare.flush()
            fsync_dir(self.dir)

    def close(self) -> None:
        for bitmap in [*self.segments, *self._retired, self.spare]:
            if bitmap is not None:
                bitmap.close()

    # --- boundaries -----------------------------------------------------

    def add_boundary(self, boundary_id: str, backup: dict) -> None:
        """Cut time now (no checkpoint: call at the point in time, after
        `make_spare`); writes from here on are the new boundary's."""
        assert self.spare is not None, "make_spare first"
        if self.segments:  # bits set ahead that no write reached: nothing changed there
            for c in self._ahead:
                self.segments[-1].clear(c)
        self._ahead.clear()
        self._sequential_end = -1
        self.boundaries.append({"id": boundary_id, "state": "pending", "backup": backup})
        self.segments.append(self.spare)
        self.spare = None
        if len(self.boundaries) > MAX_BOUNDARIES:
            self._drop_oldest_checkpoint()

    def complete(self, boundary_id: str) -> None:
        """Its backup completed: a checkpoint, a base for incremental ones."""
        for boundary in self.boundaries:
            if boundary["id"] == boundary_id:
                boundary["state"] = "checkpoint"
                self.invalid = None

    def abandon(self, boundary_id: str) -> None:
        """Its backup did not complete: the boundary goes, its changes join
        the segment before (no checkpoint: runs in the trio thread)."""
        for i, boundary in enumerate(self.boundaries):
            if boundary["id"] == boundary_id:
                self._remove_boundary(i)
                return

    def _remove_boundary(self, i: int) -> None:
        was_active = i == len(self.segments) - 1
        segment = self.segments.pop(i)
        del self.boundaries[i]
        if was_active:  # what was set ahead in it: only what the segment before lacks
            if i > 0:
                before = self.segments[i - 1]
                self._ahead = {c for c in self._ahead if not before.get(c, c + 1)}
            else:
                self._ahead.clear()
        if i > 0:  # the changes after it belong to the segment before it now
            before = self.segments[i - 1]
            before.set_bits(segment.bits())
            before.flush()
        os.unlink(segment.path)
        self._retired.append(segment)  # a sync in a worker thread may still use it
        self._close_retired()

    def _close_retired(self) -> None:
        busy = {id(entry[0]) for entry in (*self._unsynced, *self._syncing)}
        for segment in list(self._retired):
            if id(segment) not in busy:
                segment.close()
                self._retired.remove(segment)

    def _drop_oldest_checkpoint(self) -> None:
        for i, boundary in enumerate(self.boundaries):
            if boundary["state"] != "pending":
                self._remove_boundary(i)
                return

    def find(self, boundary_id: str) -> dict | None:
        for boundary in self.boundaries:
            if boundary["id"] == boundary_id:
                return boundary
        return None

    def last_checkpoint(self) -> dict | None:
        for boundary in reversed(self.boundaries):
            if boundary["state"] == "checkpoint":
                return boundary
        return None

    def changed_since(self, boundary_id: str, until: str | None = None) -> int:
        """The clusters (bit i: cluster i of GRANULARITY) changed from
        boundary `boundary_id` to boundary `until` (default: now)."""
        ids = [b["id"] for b in self.boundaries]
        first = ids.index(boundary_id)
        last = ids.index(until) if until is not None else len(ids)
        value = 0
        for segment in self.segments[first:last]:
            bits = segment.bits()
            if segment is self.segments[-1]:  # the active one: less what is set ahead
                for c in self._ahead:
                    bits &= ~(1 << c)
            value |= bits
        return value

    # --- the write path -------------------------------------------------

    def span(self, offset: int, end: int) -> tuple[int, int]:
        return offset // GRANULARITY, -(-end // GRANULARITY)

    def ready(self, offset: int, end: int) -> bool:
        """Whether the bits of [offset, end) are durable in the active
        segment (or nothing is tracked). Called for every write; the first
        one after a quiet record leaves a heartbeat first."""
        if not self.segments:
            return True
        self._last_write = time.monotonic()
        if self._quiet_recorded:
            self._quiet_recorded = False
            self.write_heartbeat()
        c0, c1 = self.span(offset, end)
        if self._pending(c0, c1):
            return False
        if self.segments[-1].next_clear(c0, c1) != c1:
            return False
        if self._ahead:  # bits set ahead that this write now makes true
            self._ahead.difference_update(range(c0, c1))
        self._sequential_end = c1  # where the last write ended, tracked or not
        return True

    def _pending(self, c0: int, c1: int) -> bool:
        """Whether bits of clusters [c0, c1) are set but not yet durable."""
        for _, first, stop in (*self._unsynced, *self._syncing):
            if first < c1 and c0 < stop:
                return True
        return False

    async def track(self, offset: int, end: int) -> None:
        """Make the bits of [offset, end) durable (see `ready`). Writes that
        arrive while a sync runs join the next one: one sync for all of them
        (group commit), whatever the number of writes in flight."""
        if not self.segments:
            return
        c0, c1 = self.span(offset, end)
        active = self.segments[-1]
        if active.next_clear(c0, c1) < c1:
            first, stop = c0, c1
            if c0 <= self._sequential_end <= c1:  # a sequential writer: the next batch too
                stop = min(self.clusters, max(c1, c0 + SEQUENTIAL_BATCH))
                self._ahead.update(c for c in range(c1, stop) if not active.get(c, c + 1))
            self._sequential_end = c1
            active.set(first, stop)
            self._unsynced.append((active, first, stop))
        while self._pending(c0, c1):
            if self._round is not None:
                await self._round.wait()  # a sync runs: the next one takes ours
            else:
                await self._sync_round()

    async def _sync_round(self) -> None:
        """Sync every bit set so far (in a worker thread), as one round."""
        batch, self._unsynced = self._unsynced, []
        self._syncing = batch
        self._round = done = trio.Event()
        spans: dict[int, tuple[ChangeMap, int, int]] = {}
        for segment, first, stop in batch:
            _, low, high = spans.get(id(segment), (segment, first, stop))
            spans[id(segment)] = (segment, min(low, first), max(high, stop))
        try:
            await trio.to_thread.run_sync(_sync_all, list(spans.values()))
        except BaseException:
            self._unsynced[:0] = batch  # not durable: whoever waits on them tries again
            raise
        finally:
            self._syncing = []
            self._round = None
            done.set()
            self._close_retired()

    # --- quiet and heartbeat --------------------------------------------

    def write_heartbeat(self) -> None:
        """Note the time (ns) while writes go on (no sync: it matters only
        after the daemon dies, when the page cache still has it)."""
        path = os.path.join(self.dir, HEARTBEAT)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, b"%020d\n" % time.time_ns(), 0)
        finally:
            os.close(fd)

    @property
    def writing(self) -> bool:
        """Writes happened since SOURCE was last recorded quiet."""
        return not self._quiet_recorded

    @property
    def quiet_due(self) -> bool:
        """Writes happened, and none for QUIET_SECONDS: time to record SOURCE."""
        return (not self._quiet_recorded
                and time.monotonic() - self._last_write >= QUIET_SECONDS)

    def record_quiet(self, clean: bool = False) -> None:
        """Record SOURCE now that nothing writes it (worker thread); `clean` at
        a clean stop. The heartbeat goes: from here on SOURCE must match."""
        for segment in self.segments:
            segment.flush()
        self.save(clean=clean)
        try:
            os.unlink(os.path.join(self.dir, HEARTBEAT))
        except FileNotFoundError:
            pass
        self._quiet_recorded = True

    def bytes_changed(self) -> int | None:
        """Bytes changed since the last checkpoint (None: no checkpoint)."""
        last = self.last_checkpoint()
        if last is None:
            return None
        changed = self.changed_since(last["id"])
        total = changed.bit_count() * GRANULARITY
        if changed >> (self.clusters - 1) & 1:  # the last cluster may be short
            total -= self.clusters * GRANULARITY - self.size
        return total

    def touched(self) -> None:
        """SOURCE's times are about to change without a write (utime through
        the live disk): as for a write, a heartbeat first."""
        self.ready(0, 0)


def _sync_all(spans: list[tuple[ChangeMap, int, int]]) -> None:
    for segment, first, stop in spans:
        segment.sync(first, stop)


def extents(value: int, clusters: int, granularity: int, size: int) -> list[dict]:
    """The disk as extents like `qemu-img map --output=json`: start, length,
    and whether the clusters in it changed (bit i of `value`: cluster i)."""
    found = []
    c = 0
    while c < clusters:
        bit = (value >> c) & 1
        rest = (value >> c) if not bit else (~value >> c)
        rest &= (1 << (clusters - c)) - 1
        end = clusters if rest == 0 else c + ((rest & -rest).bit_length() - 1)
        start = c * granularity
        found.append({"start": start, "length": min(end * granularity, size) - start,
                      "changed": bool(bit)})
        c = end
    return found


def _remove(bitmap: ClusterBitmap) -> None:
    bitmap.close()
    try:
        os.unlink(bitmap.path)
    except FileNotFoundError:
        pass


def _remove_path(path: str) -> None:
    """Remove a file, a link or a whole directory put where a file should be."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

