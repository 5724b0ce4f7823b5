"""The cluster mapping: L1 and L2 tables, what a guest range maps to, and
changing L2 entries (as QEMU's block/qcow2-cluster.c).

The L1 table lives in memory; L2 tables are kept in a bounded cache. Both
are write-through: an entry is written to the file first and taken into
memory only once that write has succeeded. Everything here runs under the
image's metadata lock (`ImageFile.lock`).
"""

from __future__ import annotations

import array
import errno
import re
from typing import Iterator, NamedTuple

from snapfs.image.qcow2.cache import LRU
from snapfs.image.qcow2.fileio import ImageFile, be_array, be_bytes, pread_exact, pwrite
from snapfs.image.qcow2.header import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                                       OFLAG_COPIED, OFLAG_ZERO, Header)
from snapfs.image.qcow2.refcount import Refcounts

L2_CACHE_BYTES = 32 << 20

# what a run of guest clusters is, in the mapping
UNALLOC, ZERO, DATA, COMPRESSED = range(4)

_NONZERO = re.compile(rb"[^\x00]")
_tuple_new = tuple.__new__      # makes a Run without the Python-level __new__ (hot path)


class Run(NamedTuple):
    """Guest bytes [start, stop) that map alike: `kind` (UNALLOC: from the
    backing file or zeroes; ZERO; DATA at host offset `host` onwards;
    COMPRESSED: one cluster's part) and the L2 entry of the run's first
    cluster (0 if its L2 table is unallocated)."""
    kind: int
    start: int
    stop: int
    host: int
    entry: int


class L2Change(NamedTuple):
    """A new value for entry `index` of an L2 table."""
    index: int
    entry: int


class HostRange(NamedTuple):
    """Bytes [start, stop) of the image file."""
    start: int
    stop: int


class ClusterMap:
    """The L1 table and the (cached) L2 tables of an image.

    `follow`: the image is read-only and another process may be writing it
    (the snapshot process reads the target the live process fills): each
    lookup reads again the L2 entries it covers, and an L1 entry it has seen
    as 0. With this driver as the writer, an L1 entry only changes from 0 to
    an L2 table that never moves, host clusters are never reused, and every
    entry is 8-byte aligned and written whole, so fresh entries are all a
    reader needs to see every write that completed before its read.

    `refcounts` (writable images only) allocates L2 tables and takes the
    frees of the clusters that changed entries drop."""

    def __init__(self, file: ImageFile, header: Header, follow: bool,
                 refcounts: Refcounts | None):
        self.file = file
        self.follow = follow
        self._refcounts = refcounts
        bits = header.cluster_bits
        self.cluster_bits = bits
        self.l2_bits = bits - 3
        self.l2_entries = 1 << self.l2_bits
        self.l1_offset = header.l1_offset
        self.l1 = be_array(pread_exact(file.fd, header.l1_size * 8, header.l1_offset)) \
            if header.l1_size else array.array("Q")
        self._l2_cache = LRU(max(8, L2_CACHE_BYTES >> bits))
        if file.metadata is not None:
            cs = file.cluster_size
            file.register(header.l1_offset, header.l1_size * 8, "L1 table")
            size = file.known_size
            for e in self.l1:
                offset = e & L1E_OFFSET_MASK
                if offset and not offset & (cs - 1) and offset < size:
                    file.register(offset, cs, "L2 table")
        self.zero_flag = OFLAG_ZERO if header.version >= 3 else 0
        # compressed cluster descriptor: offset in bits 0..x-1, sectors in x..61
        self._cshift = 62 - (bits - 8)
        self._coff_mask = (1 << self._cshift) - 1
        self._csec_mask = (1 << (bits - 8)) - 1

    # --- lookup -----------------------------------------------------------

    def l2_table(self, l1_index: int) -> array.array | None:
        """The L2 table of an L1 entry (cached), or None if unallocated."""
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not offset:
            return None
        table = self._l2_cache.lookup(offset)
        if table is None:
            self.file.check_metadata_offset(offset, "L2 table")
            self.file.check_metadata_cluster(offset, "L2 table")
            table = be_array(pread_exact(self.file.fd, self.file.cluster_size, offset))
            self._l2_cache.put(offset, table)
        return table

    def l2_fresh(self, l1_index: int, lo: int, hi: int) -> array.array | None:
        """The L2 table of an L1 entry with entries [lo, hi) read again from
        the file (for `follow`)."""
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not offset:
            e = int.from_bytes(pread_exact(self.file.fd, 8, self.l1_offset + l1_index * 8),
                               "big")
            if not e & L1E_OFFSET_MASK:
                return None
            self.l1[l1_index] = e
            return self.l2_table(l1_index)      # not cached: read now
        table = self._l2_cache.lookup(offset)
        if table is None:
            return self.l2_table(l1_index)
        table[lo:hi] = be_array(pread_exact(self.file.fd, (hi - lo) * 8, offset + lo * 8))
        return table

    def runs(self, offset: int, length: int) -> list[Run]:
        """The guest range as runs of clusters that map alike.

        Adjacent clusters of the same kind are merged (data clusters only when
        their host ranges are contiguous and their COPIED flags are equal);
        compressed clusters are never merged."""
        runs: list[Run] = []
        bits = self.cluster_bits
        cs = 1 << bits
        end = offset + length
        c = offset >> bits
        last = (end - 1) >> bits
        l2_bits = self.l2_bits
        zero_flag = self.zero_flag
        while c <= last:
            l1_index = c >> l2_bits
            seg_last = min(last, ((l1_index + 1) << l2_bits) - 1)
            base = l1_index << l2_bits
            if self.follow:
                table = self.l2_fresh(l1_index, c - base, seg_last + 1 - base)
            else:
                table = self.l2_table(l1_index)
            if table is None:
                start = max(offset, c << bits)
                stop = min(end, (seg_last + 1) << bits)
                if runs and runs[-1].kind == UNALLOC:
                    runs[-1] = runs[-1]._replace(stop=stop)
                else:
                    runs.append(_tuple_new(Run, (UNALLOC, start, stop, 0, 0)))
                c = seg_last + 1
                continue
            for cc in range(c, seg_last + 1):
                e = table[cc - base]
                start = cc << bits
                stop = start + cs
                if start < offset:
                    start = offset
                if stop > end:
                    stop = end
                if e & OFLAG_COMPRESSED:
                    runs.append(_tuple_new(Run, (COMPRESSED, start, stop, 0, e)))
                    continue
                host = e & L2E_OFFSET_MASK
                if e & zero_flag:
                    kind = ZERO
                elif host:
                    kind = DATA
                    if host & (cs - 1):
                        raise self.file.corrupt(f"data cluster offset {host:#x} is not aligned")
                    if host >= self.file.known_size:
                        self.file.check_inside(host, "data cluster")
                    host += start & (cs - 1)
                elif e & OFLAG_COPIED:
                    raise self.file.corrupt(f"L2 entry {e:#x} has no offset")
                else:
                    kind = UNALLOC
                if runs:
                    prev = runs[-1]
                    if prev.kind == kind and prev.stop == start and (
                            kind == UNALLOC or kind == ZERO or
                            (kind == DATA and prev.host + (start - prev.start) == host
                             and (prev.entry ^ e) & OFLAG_COPIED == 0)):
                        runs[-1] = _tuple_new(Run, (kind, prev.start, stop, prev.host,
                                                    prev.entry))
                        continue
                runs.append(_tuple_new(Run, (kind, start, stop, host, e)))
            c = seg_last + 1
        return runs

    def extents(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        """The (start, end) byte ranges within [offset, end) whose L2 entries
        are not 0 (data, zero or compressed clusters: the top layer's block
        status), merged. Takes the lock for each L2 table."""
        bits = self.cluster_bits
        l2_bits = self.l2_bits
        file = self.file
        first = offset >> bits
        last = (end - 1) >> bits
        pending = None
        for l1_index in range(first >> l2_bits, (last >> l2_bits) + 1):
            base = l1_index << l2_bits
            lo = max(first, base) - base
            hi = min(last + 1, base + self.l2_entries) - base
            with file.lock:
                if self.follow and not self.l1[l1_index] & L1E_OFFSET_MASK:
                    self.l2_fresh(l1_index, lo, hi)
                l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
                if not l2_offset:
                    continue
                table = None if self.follow else self._l2_cache.lookup(l2_offset)
                if table is not None:
                    raw = table.tobytes()  # zero or not does not depend on byte order
                else:
                    file.check_metadata_offset(l2_offset, "L2 table")
                    file.check_metadata_cluster(l2_offset, "L2 table")
                    raw = pread_exact(file.fd, file.cluster_size, l2_offset)
                    table = array.array("Q")
                    table.frombytes(raw)
            runs = []
            i = lo
            while i < hi:
                m = _NONZERO.search(raw, i * 8, hi * 8)
                if m is None:
                    break
                i = m.start() >> 3
                try:
                    j = table.index(0, i, hi)
                except ValueError:
                    j = hi
                runs.append((max(offset, (base + i) << bits), min(end, (base + j) << bits)))
                i = j
            for start, stop in runs:
                if pending is not None and pending[1] == start:
                    pending = (pending[0], stop)
                    continue
                if pending is not None:
                    yield pending
                pending = (start, stop)
        if pending is not None:
            yield pending

    def compressed_range(self, entry: int) -> HostRange:
        """Where the compressed data of a compressed cluster's entry lies."""
        offset = entry & self._coff_mask
        sectors = (entry >> self._cshift) & self._csec_mask
        return HostRange(offset, (offset & ~511) + (sectors + 1) * 512)

    def entry_clusters(self, entry: int) -> range:
        """The host clusters an L2 entry names (a compressed cluster's data
        may straddle two)."""
        bits = self.cluster_bits
        if entry & OFLAG_COMPRESSED:
            data = self.compressed_range(entry)
            return range(data.start >> bits, ((data.stop - 1) >> bits) + 1)
        host = entry & L2E_OFFSET_MASK
        return range(host >> bits, (host >> bits) + 1) if host else range(0)

    # --- changes (writable images) -----------------------------------------

    def write_l1_entry(self, l1_index: int, entry: int) -> None:
        """Write an L1 entry to the file, then to memory."""
        pwrite(self.file.fd, entry.to_bytes(8, "big"), self.l1_offset + l1_index * 8)
        self.l1[l1_index] = entry

    def l2_for_write(self, l1_index: int) -> array.array:
        """The L2 table of an L1 entry, allocated if needed (from the pool,
        which the caller made sure of) and writable in place (refcount 1)."""
        refcounts = self._refcounts
        entry = self.l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if not offset:
            [cluster] = refcounts.alloc(1)
            offset = cluster << self.cluster_bits
            entry = offset | OFLAG_COPIED
            table = array.array("Q", bytes(self.file.cluster_size))  # pool clusters are zeroes
            try:
                self.write_l1_entry(l1_index, entry)
            except OSError:
                got = self.file.on_disk(self.l1_offset + l1_index * 8, 8)
                if got == entry.to_bytes(8, "big"):
                    self.l1[l1_index] = entry
                    self.file.register(offset, self.file.cluster_size, "L2 table")
                    self._l2_cache.put(offset, table)
                elif got is not None:
                    refcounts.free_later([cluster])
                raise
            self.file.register(offset, self.file.cluster_size, "L2 table")
            self._l2_cache.put(offset, table)
            return table
        table = self.l2_table(l1_index)
        if not entry & OFLAG_COPIED:
            refcount = refcounts.refcount(offset >> self.cluster_bits)
            if refcount != 1:
                raise OSError(errno.ENOTSUP, f"{self.file.path}: L2 table at {offset:#x} is "
                              f"shared (refcount {refcount}); cannot write")
            self.write_l1_entry(l1_index, entry | OFLAG_COPIED)
        return table

    def update_l2(self, l1_index: int, table: array.array, changes: list[L2Change]) -> None:
        """Set L2 entries (sorted by index): in the file, then in memory; then
        queue the freeing of the clusters the replaced entries named and the
        new ones do not.

        If the write fails, the entries are read back to learn which reached
        the file; memory is set to that, and for each entry whichever of the
        old and the new clusters lost its reference is queued for freeing (a
        failed allocating write leaks nothing). If the read fails too, the
        table is dropped from the cache and nothing is freed: a leak at
        worst, never a freed cluster that an entry may point to."""
        lo, hi = changes[0].index, changes[-1].index + 1
        if hi - lo == 1:     # the common case, cheaper
            raw = changes[0].entry.to_bytes(8, "big")
        else:
            new = table[lo:hi]
            for i, e in changes:
                new[i - lo] = e
            raw = be_bytes(new)
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        try:
            pwrite(self.file.fd, raw, offset + lo * 8)
        except OSError:
            raw = self.file.on_disk(offset + lo * 8, (hi - lo) * 8)
            if raw is None:
                self._l2_cache.pop(offset, None)
                raise
            found = be_array(raw)
            for i, e in changes:
                if found[i - lo] == e:
                    self.drop_reference(table[i], e)
                elif found[i - lo] == table[i]:
                    self.drop_reference(e, table[i])
            table[lo:hi] = found
            raise
        for i, e in changes:
            if table[i]:
                self.drop_reference(table[i], e)
            table[i] = e

    def check_replaceable(self, entry: int) -> None:
        """Refuse (EIO) to replace an L2 entry whose clusters would then be
        freed while they hold metadata or lie past the end of the file."""
        clusters = self.entry_clusters(entry)
        if clusters:
            self.file.check_data_clusters(clusters.start, len(clusters), "data cluster")

    def drop_reference(self, entry: int, kept: int) -> None:
        """L2 entry `entry` was replaced by `kept`: queue the freeing of the
        clusters it named, unless `kept` names the same cluster."""
        if not entry & OFLAG_COMPRESSED:
            host = entry & L2E_OFFSET_MASK
            if not host or (not kept & OFLAG_COMPRESSED and kept & L2E_OFFSET_MASK == host):
                return
        self._refcounts.free_later(self.entry_clusters(entry))
