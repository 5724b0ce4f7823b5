"""Refcounts: the refcount table and blocks, allocation from the reserved
pool, and freeing (as QEMU's block/qcow2-refcount.c).

Host clusters are only ever allocated at the end of the file, never reused;
freed clusters (refcount 0) stay free and their space is punched. `Refcounts`
exists for a writable image only. Everything here runs under the image's
metadata lock (`ImageFile.lock`), which a pool refill and the application of
frees release while they sync: see "Threads" in the package docstring for
why that keeps the crash ordering.
"""

from __future__ import annotations

import array
import errno
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from snapfs.image.qcow2.cache import LRU
from snapfs.image.qcow2.fileio import ImageFile, be_array, be_bytes, pread_exact, pwrite
from snapfs.image.qcow2.header import (MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, REFTABLE_FIELDS,
                                       REFTABLE_FIELDS_AT, Header)
from snapfs.image.raw import punch_hole

BLOCK_CACHE_BYTES = 4 << 20
POOL_FIRST_BYTES = 8 << 20
POOL_MAX_BYTES = 128 << 20
POOL_MAX_CLUSTERS = 1 << 16


@dataclass(slots=True)
class RefcountBlock:
    """A refcount block as cached: where it is in the file, and its bytes."""
    offset: int
    data: bytearray


class Refcounts:
    """The refcounts of a writable image, its reserved pool of clusters and
    its queue of deferred frees."""

    def __init__(self, file: ImageFile, header: Header, file_size: int):
        self.file = file
        cs = file.cluster_size
        self.reftable_offset = header.reftable_offset
        self.reftable_clusters = header.reftable_clusters
        self.reftable = be_array(pread_exact(file.fd, self.reftable_clusters * cs,
                                             self.reftable_offset))
        self.order = header.refcount_order
        self.block_entries = cs * 8 >> self.order
        self.max = (1 << (1 << self.order)) - 1
        self._blocks = LRU(max(8, BLOCK_CACHE_BYTES // cs))
        # deferred frees: {cluster: refcount decrement}, lowered by apply_frees
        self._pending: Counter = Counter()
        # the reserved pool: [next, end) runs of clusters past what is in use,
        # whose refcount 1 is durable
        self._pool: list[list[int]] = []
        self.pool_count = 0
        self.refilling = False          # a thread is refilling the pool
        self._grown = False             # the file was extended by this instance
        self._pool_chunk = max(1, min(POOL_MAX_CLUSTERS, POOL_FIRST_BYTES // cs))
        self._frontier = -(-file_size // cs)   # clusters from here on are free
        self._leak_limit = (min(POOL_MAX_CLUSTERS, max(1, POOL_MAX_BYTES // cs))
                            + 2 * (MAX_REFTABLE_BYTES // cs) + 64)
        file.register(self.reftable_offset, self.reftable_clusters * cs, "refcount table")
        for e in self.reftable:
            offset = e & REFT_OFFSET_MASK
            if offset and not offset & (cs - 1) and offset < file_size:
                file.register(offset, cs, "refcount block")

    # --- refcount blocks and entries ------------------------------------

    def block(self, index: int, must_exist: bool = True) -> RefcountBlock | None:
        """Refcount block `index` (cached); None if the table has none there
        (an error if `must_exist`)."""
        offset = self.reftable[index] & REFT_OFFSET_MASK if index < len(self.reftable) else 0
        if not offset:
            if must_exist:
                raise self.file.corrupt(f"refcount block {index} is missing")
            return None
        block = self._blocks.lookup(index)
        if block is None:
            self.file.check_metadata_offset(offset, "refcount block")
            self.file.check_metadata_cluster(offset, "refcount block")
            block = RefcountBlock(offset, bytearray(pread_exact(self.file.fd,
                                                                self.file.cluster_size, offset)))
            self._blocks.put(index, block)
        return block

    def _entry_bytes(self, first: int, end: int) -> slice:
        """The bytes of a block's entries [first, end)."""
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            return slice(first * width, end * width)
        per_byte = 8 >> order
        return slice(first // per_byte, -(-end // per_byte))

    def _get(self, data: bytearray, i: int) -> int:
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            return int.from_bytes(data[i * width:(i + 1) * width], "big")
        nbits = 1 << order
        pos = i * nbits
        return (data[pos >> 3] >> (pos & 7)) & ((1 << nbits) - 1)

    def _set(self, data: bytearray, i: int, value: int) -> None:
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            data[i * width:(i + 1) * width] = value.to_bytes(width, "big")
            return
        nbits = 1 << order
        pos = i * nbits
        mask = ((1 << nbits) - 1) << (pos & 7)
        data[pos >> 3] = (data[pos >> 3] & ~mask) | (value << (pos & 7))

    def _set_range(self, data: bytearray, first: int, end: int, value: int) -> None:
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            data[first * width:end * width] = value.to_bytes(width, "big") * (end - first)
        else:
            for i in range(first, end):
                self._set(data, i, value)

    def refcount(self, cluster: int) -> int:
        block = self.block(cluster // self.block_entries, must_exist=False)
        return 0 if block is None else self._get(block.data, cluster % self.block_entries)

    def change(self, deltas: dict) -> list[int]:
        """Add deltas {cluster: delta} to refcounts, writing each touched
        refcount block once (the file first, then memory). Returns the
        clusters whose refcount became 0.

        Applied deltas are removed from `deltas`: after a failure it holds
        what is still to do. (A block whose write fails is read back to
        learn which of its entries reached the file; if that read fails too,
        the block is dropped from the cache and its deltas given up. This is
        only used to lower refcounts, so giving up leaks at worst.)"""
        per_block: dict = {}
        E = self.block_entries
        for cluster in deltas:
            per_block.setdefault(cluster // E, []).append(cluster % E)
        freed = []
        for index in sorted(per_block):
            block = self.block(index)
            data = block.data
            entries = per_block[index]
            new = bytearray(data)
            for i in entries:
                value = self._get(data, i) + deltas[index * E + i]
                if value < 0 or value > self.max:
                    del deltas[index * E + i]      # never to be tried again
                    raise self.file.corrupt(f"refcount of cluster {index * E + i} out of "
                                            f"range ({value})")
                self._set(new, i, value)
            span = self._entry_bytes(min(entries), max(entries) + 1)
            try:
                pwrite(self.file.fd, new[span], block.offset + span.start)
            except OSError:
                raw = self.file.on_disk(block.offset + span.start, span.stop - span.start)
                if raw is None:
                    self._blocks.pop(index, None)
                for i in entries:
                    if raw is None or self._get(new, i) == self._get(
                            bytearray(span.start) + raw, i):
                        del deltas[index * E + i]
                if raw is not None:
                    data[span] = raw
                raise
            data[span] = new[span]
            for i in entries:
                del deltas[index * E + i]
                if not self._get(data, i):
                    freed.append(index * E + i)
        return freed

    def last_used_in(self, first: int, end: int) -> int | None:
        """The last cluster in [first, end) with a nonzero refcount, or None."""
        E = self.block_entries
        found = None
        for b in range(first // E, (end - 1) // E + 1):
            block = self.block(b, must_exist=False)
            if block is None:
                continue
            lo, hi = max(first, b * E) - b * E, min(end, (b + 1) * E) - b * E
            if not any(block.data[self._entry_bytes(lo, hi)]):
                continue
            for i in range(hi - 1, lo - 1, -1):
                if self._get(block.data, i):
                    found = b * E + i
                    break
        return found

    # --- allocation -----------------------------------------------------

    def ensure_pool(self, count: int) -> None:
        """Make the pool hold at least `count` clusters, refilling it (or
        waiting for the thread that is refilling it) if it does not. May
        release the lock while a refill syncs: call it before reading the
        metadata the allocation depends on."""
        while self.pool_count < count:
            if self.refilling:
                self.file.cond.wait()
            else:
                self._refill(count - self.pool_count)

    def alloc(self, count: int) -> list[int]:
        """Take `count` fresh clusters (all zeroes, durable refcount 1) from
        the pool, which `ensure_pool` made big enough."""
        if count > self.pool_count:
            raise RuntimeError("qcow2: allocation from a pool that was not ensured")
        out: list[int] = []
        while len(out) < count:
            run = self._pool[0]
            take = min(count - len(out), run[1] - run[0])
            out.extend(range(run[0], run[0] + take))
            run[0] += take
            if run[0] == run[1]:
                del self._pool[0]
            self.pool_count -= take
        return out

    def _refill(self, count: int) -> None:
        """Add a run of at least `count` clusters past the end of the file to
        the pool, creating refcount blocks and growing the refcount table as
        needed; durable before the clusters join the pool.

        One thread refills at a time (`refilling`); the lock is released
        while it syncs. If it fails (ENOSPC, EIO), the pool is unchanged and
        every cluster whose refcount was raised and that nothing points to
        is queued for freeing: the image stays consistent and leaks
        nothing."""
        self.refilling = True
        try:
            self._refill_locked(count)
        finally:
            self.refilling = False
            self.file.cond.notify_all()

    def _refill_locked(self, count: int) -> None:
        file = self.file
        fd = file.fd
        cs = file.cluster_size
        E = self.block_entries
        want = max(count, self._pool_chunk)
        start = self._frontier
        while True:
            first = self._frontier
            new_table = 0     # clusters of a new (moved, bigger) refcount table
            missing: list[int] = []
            while True:       # the new metadata must also be counted
                end = first + new_table + len(missing) + want
                last_block = (end - 1) // E
                table = 0
                if last_block >= len(self.reftable):
                    table = -(-(2 * (last_block + 1)) * 8 // cs)
                    if table * cs > MAX_REFTABLE_BYTES:
                        raise OSError(errno.ENOSPC, f"{file.path}: image file too large for "
                                      "the qcow2 refcount table")
                miss = [b for b in range(first // E, last_block + 1)
                        if b >= len(self.reftable) or not self.reftable[b] & REFT_OFFSET_MASK]
                if table == new_table and miss == missing:
                    break
                new_table, missing = table, miss
            # a missing block means its clusters are free: not so if it would
            # count metadata (block 0 always counts the header)
            for b in missing:
                used = [c for c in range(b * E, min(first, (b + 1) * E))
                        if c in (file.metadata or ())]
                if used:
                    raise file.corrupt(f"refcount block {b} is missing, but cluster "
                                       f"{used[0]} ({file.metadata[used[0]]}) is in use")
            # clusters past the end of the file must be free; skip any that are not
            busy = self.last_used_in(first, end)
            if busy is None:
                break
            if busy >= start + self._leak_limit:
                # a crash can leave at most about one refill's worth of
                # clusters counted past the end of the file: more is damage,
                # and would grow the file without bound
                raise file.corrupt(f"refcount of cluster {busy}, far past the end of the "
                                   f"file, is {self.refcount(busy)}")
            self._frontier = busy + 1

        table_at = first
        blocks_at = first + new_table
        pool_at = blocks_at + len(missing)
        block_host = {b: (blocks_at + i) * cs for i, b in enumerate(missing)}
        new_blocks: dict[int, RefcountBlock] = {}
        raised: bool | None = False     # None: unknown whether the file points to them
        size_before = os.fstat(fd).st_size
        try:
            # 1. new metadata past the end of the file, which nothing points
            #    to yet: new refcount blocks (counting the clusters of the
            #    region they cover) and the new refcount table
            for b in missing:
                lo, hi = max(first, b * E) - b * E, min(end, (b + 1) * E) - b * E
                block = new_blocks[b] = RefcountBlock(block_host[b], bytearray(cs))
                self._set_range(block.data, lo, hi, 1)
                pwrite(fd, block.data, block.offset)
            if os.fstat(fd).st_size < end * cs:
                os.ftruncate(fd, end * cs)
            if new_table:
                reftable = array.array("Q", self.reftable)
                reftable.frombytes(bytes(new_table * cs - len(reftable) * 8))
                for b, host in block_host.items():
                    reftable[b] = host
                pwrite(fd, be_bytes(reftable), table_at * cs)
            # 2. the refcounts of the region's clusters in existing blocks
            for b in range(first // E, last_block + 1):
                if b in block_host:
                    continue
                lo, hi = max(first, b * E) - b * E, min(end, (b + 1) * E) - b * E
                block = self.block(b)
                new = bytearray(block.data)
                self._set_range(new, lo, hi, 1)
                span = self._entry_bytes(lo, hi)
                raised = True
                try:
                    pwrite(fd, new[span], block.offset + span.start)
                except OSError:
                    raw = file.on_disk(block.offset + span.start, span.stop - span.start)
                    if raw is None:
                        self._blocks.pop(b, None)
                    else:
                        block.data[span] = raw
                    raise
                block.data[span] = new[span]
            file.sync_unlocked()

            # 3. point the refcount table (or the header) at what was written
            if new_table:
                switch = REFTABLE_FIELDS.pack(table_at * cs, new_table)
                try:
                    pwrite(fd, switch, REFTABLE_FIELDS_AT)
                except OSError:
                    got = file.on_disk(REFTABLE_FIELDS_AT, REFTABLE_FIELDS.size)
                    if got is None:
                        raised = None      # unknown: the new table may be in use
                    elif got == switch:
                        self._use_reftable(reftable, table_at * cs, new_table, new_blocks)
                    raise
                self._use_reftable(reftable, table_at * cs, new_table, new_blocks)
                file.sync_unlocked()
            elif missing:
                lo, hi = min(missing), max(missing) + 1
                entries = self.reftable[lo:hi]
                for b, host in block_host.items():
                    entries[b - lo] = host
                try:
                    pwrite(fd, be_bytes(entries), self.reftable_offset + lo * 8)
                except OSError:
                    raw = file.on_disk(self.reftable_offset + lo * 8, (hi - lo) * 8)
                    if raw is None:
                        raised = None      # unknown: the blocks may be in use
                        raise
                    entries = be_array(raw)
                    self._link_blocks(lo, entries, new_blocks)
                    raise
                self._link_blocks(lo, entries, new_blocks)
                file.sync_unlocked()
        except BaseException:
            if raised is None:
                self._frontier = end           # the region's state is unknown: leak it
                self._grown = True
            elif raised or any(self.reftable[b] & REFT_OFFSET_MASK for b in missing
                               if b < len(self.reftable)):
                self._abandon(first, end)
                self._frontier = end
                self._grown = True
            else:
                # nothing points into the region and no refcount counts it:
                # cut off what was written there, so that it is zeroes again
                # when the next refill takes it
                try:
                    if os.fstat(fd).st_size > size_before:
                        os.ftruncate(fd, size_before)
                except OSError:
                    self._frontier = end
                    self._grown = True
            raise
        self._pool.append([pool_at, end])
        self.pool_count += end - pool_at
        self._frontier = end
        self._grown = True
        self._pool_chunk = min(self._pool_chunk * 2, max(1, POOL_MAX_BYTES // cs),
                               POOL_MAX_CLUSTERS)

    def _use_reftable(self, reftable: array.array, offset: int, clusters: int,
                      blocks: dict[int, RefcountBlock]) -> None:
        """The header now points to a new refcount table (with new blocks):
        use it, and queue the old one for freeing (after the next sync)."""
        cs = self.file.cluster_size
        old_first = self.reftable_offset // cs
        self.free_later(range(old_first, old_first + self.reftable_clusters))
        self.file.unregister(self.reftable_offset, self.reftable_clusters * cs)
        self.file.register(offset, clusters * cs, "refcount table")
        for block in blocks.values():
            self.file.register(block.offset, cs, "refcount block")
        self.reftable = reftable
        self.reftable_offset, self.reftable_clusters = offset, clusters
        for b, block in blocks.items():
            self._blocks.put(b, block)

    def _link_blocks(self, lo: int, entries: array.array,
                     blocks: dict[int, RefcountBlock]) -> None:
        """Refcount table entries [lo, lo + len(entries)) are now in the file
        as `entries`: take them, and the new blocks they point to."""
        self.reftable[lo:lo + len(entries)] = entries
        for b, block in blocks.items():
            if self.reftable[b] & REFT_OFFSET_MASK:
                self.file.register(block.offset, self.file.cluster_size, "refcount block")
                self._blocks.put(b, block)

    def _abandon(self, first: int, end: int) -> None:
        """After a failed refill of the pool: queue for freeing every cluster
        of [first, end) that has a refcount and that nothing points to (all
        but the refcount table and blocks the file now points to)."""
        cs = self.file.cluster_size
        keep = set(range(self.reftable_offset // cs,
                         self.reftable_offset // cs + self.reftable_clusters))
        for b in range(first // self.block_entries, (end - 1) // self.block_entries + 1):
            if b < len(self.reftable):
                keep.add((self.reftable[b] & REFT_OFFSET_MASK) // cs)
        try:
            for c in range(first, end):
                if c not in keep and self.refcount(c):
                    self._pending[c] += 1
        except OSError:
            pass     # a refcount block cannot be read: leak what is left

    # --- freeing --------------------------------------------------------

    def free_later(self, clusters: Iterable[int]) -> None:
        """Queue a refcount decrement for each of `clusters` (a cluster may
        come more than once): for references that were dropped (lowered by
        `apply_frees`, after a sync), and for clusters taken from the pool
        that nothing came to point to."""
        self._pending.update(clusters)

    def apply_frees(self) -> None:
        """Lower the refcounts of dropped clusters, now that the tables that
        dropped them are durable: the frees queued so far are taken, the file
        is synced (without the lock), then they are applied. What fails stays
        queued."""
        if not self._pending:
            return
        frees = self._pending
        self._pending = Counter()
        try:
            self.file.sync_unlocked()
        except BaseException:
            self._pending.update(frees)
            raise
        deltas = {c: -n for c, n in frees.items()}
        try:
            self.punch(self.change(deltas))
        finally:
            for c, delta in deltas.items():
                self._pending[c] -= delta

    def punch(self, clusters: list[int]) -> None:
        """Give back the space of freed (or zeroed, preallocated) clusters."""
        cs = self.file.cluster_size
        clusters = sorted(clusters)
        i = 0
        while i < len(clusters):
            j = i + 1
            while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                j += 1
            try:
                punch_hole(self.file.fd, clusters[i] * cs, (j - i) * cs)
            except OSError:
                pass
            i = j

    # --- closing --------------------------------------------------------

    def release_pool(self) -> None:
        """Queue what is left of the pool for freeing (nothing points to it)."""
        for first, end in self._pool:
            self.free_later(range(first, end))
        self._pool.clear()
        self.pool_count = 0

    def trim_tail(self) -> None:
        """If this instance extended the file and only free clusters (the
        released pool) follow its last cluster in use, truncate them off."""
        if not self._grown:
            return
        cs = self.file.cluster_size
        end = self._frontier
        if os.fstat(self.file.fd).st_size > end * cs:
            return           # something this driver did not put there: leave it
        lo = end
        last = None
        while lo > 0 and last is None:
            lo = max(0, lo - max(self.block_entries, end - lo))
            last = self.last_used_in(lo, end)
        keep = 0 if last is None else last + 1
        if self.file.metadata:
            # never cut off metadata, whatever damaged refcounts say
            keep = max(keep, max(self.file.metadata) + 1)
        if keep < end:
            os.ftruncate(self.file.fd, keep * cs)
            self._frontier = keep
