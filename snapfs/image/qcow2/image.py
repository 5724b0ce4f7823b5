"""`Qcow2Image`: a qcow2 image behind the `Image` interface (guest reads and
writes, zeroing, block status, flush, close), tying the header, the cluster
mapping and the refcounts together (as QEMU's block/qcow2.c), and opening
the backing chain.

The crash-ordering, failure and locking rules it keeps are in the package
docstring.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import zlib
from collections import Counter
from typing import Iterator, NamedTuple

from snapfs.errors import UserError
from snapfs.image.base import Image
from snapfs.image.qcow2.bitmaps import bitmap_clusters
from snapfs.image.qcow2.create import create_file, remove_quietly
from snapfs.image.qcow2.fileio import (ImageFile, pread_exact, pread_into, pwrite, pwritev)
from snapfs.image.qcow2.header import (AUTOCLEAR_AT, AUTOCLEAR_BITMAPS, EXT_BITMAPS,
                                       L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                                       OFLAG_COPIED, OFLAG_ZERO, encode_extensions, printable,
                                       read_header)
from snapfs.image.qcow2.mapping import (COMPRESSED, DATA, UNALLOC, ZERO, ClusterMap, L2Change,
                                        Run)
from snapfs.image.qcow2.refcount import Refcounts
from snapfs.image.raw import RawImage, punch_hole

MAX_CHAIN_DEPTH = 256

log = logging.getLogger("snapfs")


def _regular_or_block(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


class Placement(NamedTuple):
    """Where a write puts the data of one guest cluster: in its host cluster
    `host` (a fresh one from the pool if `fresh`), replacing L2 entry
    `entry`."""
    cluster: int
    entry: int
    host: int
    fresh: bool


class Qcow2Image(Image):
    """A qcow2 image, with its backing chain opened read-only."""

    # ------------------------------------------------------------------
    # opening and creating
    # ------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, writable: bool = False, backing_dir: str | None = None,
             with_backing: bool = True) -> "Qcow2Image":
        """Open an existing qcow2 image (and its backing chain, read-only).

        A relative backing file name is found in `backing_dir` (by default
        the directory of `path`: give it when `path` is not where the image
        lives, e.g. /proc/self/fd/N). Without `with_backing` the image is
        opened alone, read-only: reading a part that it does not hold and
        that would come from its backing file fails with EIO (for a reader
        that never reads those)."""
        if writable and not with_backing:
            raise ValueError("a qcow2 image is only writable with its backing chain")
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            return cls._from_fd(path, fd, writable, 0, set(), backing_dir, with_backing)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: str, size: int, cluster_size: int = 65536,
               backing_file: str | None = None, backing_format: str | None = None,
               overwrite: bool = False) -> "Qcow2Image":
        """Create a version 3 image of `size` bytes (rounded up to a multiple of
        512, as qemu-img does) and return it open for writing.

        `backing_file` is stored exactly as given (a relative name is relative
        to the directory of `path`), with `backing_format` ('raw' or 'qcow2')
        in the backing-format header extension."""
        fd = create_file(path, size, cluster_size, backing_file, backing_format, overwrite)
        try:
            return cls._from_fd(path, fd, True, 0, set())
        except BaseException:
            os.close(fd)
            remove_quietly(path)
            raise

    @classmethod
    def _from_fd(cls, path: str, fd: int, writable: bool, depth: int, seen: set,
                 backing_dir: str | None = None, with_backing: bool = True) -> "Qcow2Image":
        self = cls.__new__(cls)
        self.path = path
        self.writable = writable
        self.backing = None
        self.backing_size = 0
        st = os.fstat(fd)
        seen.add((st.st_dev, st.st_ino))
        file_size = os.lseek(fd, 0, os.SEEK_END)   # st_size is 0 for a block device
        header = read_header(fd, path, file_size, writable)
        self.header = header
        self.version = header.version
        self.size = header.size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self._file = ImageFile(fd, path, header.cluster_bits, file_size, writable)
        self._lock = self._file.lock
        self._refcounts = Refcounts(self._file, header, file_size) if writable else None
        # a read-only top image may be written meanwhile by another process
        # (the snapshot process reads the target the live process writes)
        self._follow = not writable and depth == 0
        self._clusters = ClusterMap(self._file, header, self._follow, self._refcounts)
        self._zero_flag = self._clusters.zero_flag
        self._write_started = False
        self._starting = False          # a thread is preparing the first write
        self._header_unsynced = False   # the first write's header rewrite needs a sync
        self._backing_missing = False   # it has a backing file, deliberately not opened
        if with_backing:
            self._open_backing(depth, seen, backing_dir)
        else:
            self._backing_missing = header.backing_name is not None
        return self

    def _refuse(self, problem: str) -> UserError:
        return UserError(f"{self.path}: {problem}")

    def _open_backing(self, depth: int, seen: set, backing_dir: str | None) -> None:
        name = self.header.backing_name
        if name is None:
            return
        shown = printable(os.fsdecode(name))
        fmt = self.header.backing_format
        if fmt is None:
            raise self._refuse(f"the backing file {shown} has no backing format in the "
                               "image header and snapfs does not guess it (set it with "
                               f"'qemu-img rebase -u -b {shown} -F FORMAT')")
        if fmt not in ("raw", "qcow2"):
            raise self._refuse(f"backing format {fmt!r} of {shown} is not supported "
                               "(only raw and qcow2)")
        if depth + 1 >= MAX_CHAIN_DEPTH:
            raise self._refuse(f"the backing chain is deeper than {MAX_CHAIN_DEPTH} images")
        path = os.fsdecode(name)
        if not os.path.isabs(path):
            path = os.path.join(backing_dir if backing_dir is not None
                                else os.path.dirname(self.path), path)
        try:
            # a device node is not even opened (opening one can have effects:
            # a terminal, a watchdog, a tape); O_NONBLOCK: a name that leads
            # to a FIFO put there since must not hang the open
            if not _regular_or_block(os.stat(path).st_mode):
                raise self._refuse(f"the backing file {shown} is not a regular file")
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise self._refuse(f"cannot open backing file {shown}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not _regular_or_block(st.st_mode):
                raise self._refuse(f"the backing file {shown} is not a regular file")
            if (st.st_dev, st.st_ino) in seen:
                raise self._refuse(f"backing chain loop: {shown} is already in the chain")
            if fmt == "raw":
                seen.add((st.st_dev, st.st_ino))
                self.backing = RawImage.from_fd(path, fd)  # the file checked above
                fd = -1
            else:
                try:
                    self.backing = Qcow2Image._from_fd(path, fd, False, depth + 1, seen)
                except UserError as e:
                    # name the image the user opened, then the backing file
                    # where the problem is (deeper down: that one alone, so
                    # that a long chain still gives a short line)
                    problem = str(e).removeprefix(f"{path}: ")
                    if not problem.startswith("backing file "):
                        problem = f"backing file {shown}: {problem}"
                    raise self._refuse(problem) from None
        except OSError as e:
            # (a file that cannot be read like one: a /proc or /sys file)
            if fd >= 0:
                os.close(fd)
            raise self._refuse(f"cannot read backing file {shown}: {e.strerror}") from None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self.backing_size = self.backing.size

    @property
    def fd(self) -> int:
        """The descriptor of the image file (-1 once closed)."""
        return self._file.fd

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the header (None if none)."""
        name = self.header.backing_name
        return None if name is None else os.fsdecode(name)

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    # ------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------

    def _read_compressed(self, entry: int) -> bytes:
        offset, stop = self._clusters.compressed_range(entry)
        self._file.check_inside(offset, "compressed cluster")
        raw = os.pread(self._file.fd, stop - offset, offset)
        try:
            # raw deflate (no zlib header), as QEMU writes it (window bits 12)
            data = zlib.decompressobj(-12).decompress(raw, self.cluster_size)
        except zlib.error as e:
            raise self._file.corrupt(f"compressed cluster at {offset:#x}: {e}") from None
        if len(data) != self.cluster_size:
            raise self._file.corrupt(f"compressed cluster at {offset:#x} is short")
        return data

    def _read_backing_into(self, view: memoryview, start: int, stop: int) -> None:
        """Guest bytes [start, stop) of the backing chain into view[:stop-start],
        zeroes where the chain does not reach."""
        if self._backing_missing:
            raise OSError(errno.EIO, f"{self.path}: guest bytes {start}-{stop} come from the "
                          "backing file, which was not opened")
        end = min(stop, self.backing_size) if self.backing is not None else start
        if start < end:
            part = view[:end - start]
            readinto = getattr(self.backing, "readinto", None)
            if readinto is not None:
                readinto(start, part)
            else:
                part[:] = self.backing.read(start, end - start)
        if max(start, end) < stop:
            view[max(start, end) - start:stop - start] = bytes(stop - max(start, end))

    def _read_run(self, run: Run, view: memoryview, offset: int) -> None:
        kind, start, stop, host, entry = run
        part = view[start - offset:stop - offset]
        if kind == DATA:
            pread_into(self._file.fd, part, host)
        elif kind == UNALLOC:
            self._read_backing_into(part, start, stop)
        elif kind == ZERO:
            part[:] = bytes(len(part))
        else:
            skip = start & (self.cluster_size - 1)
            try:
                data = self._read_compressed(entry)
            except OSError:
                if not self._follow:
                    raise
                # the writer may have rewritten the cluster and freed (punched)
                # its old compressed data since we looked it up: look again
                with self._lock:
                    runs = self._clusters.runs(start, stop - start)
                if runs == [run]:
                    raise
                self._read_into(start, part)
                return
            part[:] = data[skip:skip + stop - start]

    def _read_into(self, offset: int, view: memoryview, as_bytes: bool = False) -> bytes | None:
        """Read the guest range at `offset` into `view`. With `as_bytes`, a
        range that is one run of host bytes is returned (read without a copy)
        instead."""
        later = []
        with self._lock:
            runs = self._clusters.runs(offset, len(view))
            if (as_bytes and len(runs) == 1 and runs[0].kind == DATA and
                    (runs[0].entry & OFLAG_COPIED or not self.writable)):
                host = runs[0].host
            else:
                host = None
                for run in runs:
                    # compressed and shared clusters can be freed by a concurrent
                    # rewrite of another part of them: read those under the lock
                    if self.writable and (run.kind == COMPRESSED or
                                          (run.kind == DATA and not run.entry & OFLAG_COPIED)):
                        self._read_run(run, view, offset)
                    else:
                        later.append(run)
        if host is not None:
            return pread_exact(self._file.fd, len(view), host)
        for run in later:
            self._read_run(run, view, offset)
        return None

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        buf = bytearray(length)
        data = self._read_into(offset, memoryview(buf), as_bytes=True)
        return bytes(buf) if data is None else data

    def readinto(self, offset: int, buffer) -> None:
        """Fill `buffer` with the guest bytes at `offset`, without a copy."""
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if len(view):
            self._read_into(offset, view)

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        end = min(offset + length, self.size)
        if offset < end:
            yield from self._clusters.extents(offset, end)

    def zero_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Zero clusters of this layer (they read as zeroes, whatever lies below)."""
        end = min(offset + length, self.size)
        if offset < end:
            with self._lock:
                runs = self._clusters.runs(offset, end - offset)
            for run in runs:
                if run.kind == ZERO:
                    yield max(run.start, offset), min(run.stop, end)

    # ------------------------------------------------------------------
    # writing
    # ------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if not len(view):
            return
        with self._lock:
            self._start_writing()
            runs = self._clusters.runs(offset, len(view))
            if not all(r.kind == DATA and r.entry & OFLAG_COPIED for r in runs):
                self._write_locked(offset, view)
                return
            bits = self.cluster_bits
            for run in runs:
                first = run.host >> bits
                self._file.check_data_clusters(
                    first, ((run.host + run.stop - run.start - 1) >> bits) - first + 1,
                    "data cluster")
        # all clusters are allocated and ours alone: no metadata to change
        fd = self._file.fd
        for run in runs:
            pwrite(fd, view[run.start - offset:run.stop - offset], run.host)

    def _start_writing(self) -> None:
        """Before the first write: drop persistent bitmaps and clear the
        autoclear bits, durably, before any guest data changes. Other writers
        wait meanwhile; the lock is released while the header is synced."""
        while not self._write_started:
            if not self.writable:
                raise OSError(errno.EBADF, f"{self.path}: image is open read-only")
            if self._starting:
                self._file.cond.wait()
                continue
            self._starting = True
            try:
                header = self.header
                if self.version >= 3 and (header.autoclear or any(
                        ext.type == EXT_BITMAPS for ext in header.extensions)):
                    self._drop_bitmaps()
                    self._header_unsynced = True
                if self._header_unsynced:
                    self._file.sync_unlocked()
                    self._header_unsynced = False
                self._write_started = True
            finally:
                self._starting = False
                self._file.cond.notify_all()

    def _drop_bitmaps(self) -> None:
        """Before the first write: clear the autoclear bits (the spec demands
        it of a writer that does not know them) and remove persistent bitmaps,
        which this driver would not keep up to date; QEMU would ignore them
        from then on and their clusters would leak, so free them cleanly
        (like dropped L2 entries: at the next flush or close).

        A bitmaps extension without the bitmaps autoclear bit is stale (a
        writer that did not know bitmaps has changed the image since), and
        QEMU ignores it: its clusters may have been freed and reused since,
        so only the extension goes."""
        header = self.header
        bitmaps = [ext.data for ext in header.extensions if ext.type == EXT_BITMAPS]
        kept = [ext for ext in header.extensions if ext.type != EXT_BITMAPS]
        clusters: Counter = Counter()
        names = []
        for data in bitmaps if header.autoclear & AUTOCLEAR_BITMAPS else ():
            names += bitmap_clusters(self._file, data, clusters)
        for c, n in clusters.items():
            self._file.check_data_clusters(c, 1, "persistent bitmap cluster")
            if self._refcounts.refcount(c) < n:
                raise self._file.corrupt(f"cluster {c} of a persistent bitmap has refcount "
                                         f"{self._refcounts.refcount(c)}, below its {n} "
                                         "reference(s)")
        # 1. the header: no autoclear bits, no bitmaps extension (synced by
        #    the caller before any guest data changes)
        fields = bytearray(pread_exact(self._file.fd, header.header_length - AUTOCLEAR_AT,
                                       AUTOCLEAR_AT))
        fields[0:8] = bytes(8)
        pwrite(self._file.fd, fields + encode_extensions(kept), AUTOCLEAR_AT)
        header.autoclear = 0
        header.extensions = kept
        # 2. then the clusters the bitmaps used: freed after the next sync
        self._refcounts.free_later(clusters)
        if names:
            log.warning("%s: removed persistent bitmap(s) %s: snapfs does not keep them "
                        "up to date", self.path, ", ".join(names))

    def _fill(self, cluster: int, entry: int, fresh: bool) -> bytes | None:
        """The current guest content of a cluster, for the copy-on-write fill
        of a partial write into a new host cluster; None if it is zeroes and
        the new cluster is fresh (already zeroes)."""
        cs = self.cluster_size
        if entry & OFLAG_COMPRESSED:
            return self._read_compressed(entry)
        host = entry & L2E_OFFSET_MASK
        if entry & self._zero_flag:
            return None if fresh else bytes(cs)
        if host:
            return pread_exact(self._file.fd, cs, host)
        start = cluster * cs
        if self.backing is None or start >= self.backing_size:
            return None if fresh else bytes(cs)
        buf = bytearray(cs)
        self._read_backing_into(memoryview(buf), start, min(start + cs, self.size))
        return buf

    def _write_locked(self, offset: int, view: memoryview) -> None:
        """A write that may need allocation or copy-on-write (under the lock,
        which a pool refill may release between L2 tables)."""
        clusters = self._clusters
        refcounts = self._refcounts
        bits = self.cluster_bits
        cs = self.cluster_size
        l2_bits = clusters.l2_bits
        zero_flag = self._zero_flag
        end = offset + len(view)
        c = offset >> bits
        last = (end - 1) >> bits
        while c <= last:
            l1_index = c >> l2_bits
            seg_last = min(last, ((l1_index + 1) << l2_bits) - 1)
            # enough clusters for every cluster and the L2 table, before the
            # table is looked at (this may release the lock)
            refcounts.ensure_pool(seg_last - c + 1
                                  + (not clusters.l1[l1_index] & L1E_OFFSET_MASK))
            table = clusters.l2_for_write(l1_index)
            base = l1_index << l2_bits

            # a cluster is written in place if it is ours alone (COPIED, maybe
            # a preallocated zero cluster), else into a fresh one
            needed = 0
            for cc in range(c, seg_last + 1):
                e = table[cc - base]
                if e & OFLAG_COMPRESSED or not e & L2E_OFFSET_MASK or not e & OFLAG_COPIED:
                    needed += 1
                    if e:
                        clusters.check_replaceable(e)    # its clusters are freed
                elif e & L2E_OFFSET_MASK & (cs - 1):
                    raise self._file.corrupt(f"data cluster offset {e & L2E_OFFSET_MASK:#x} "
                                             "is not aligned")
                else:
                    self._file.check_data_clusters((e & L2E_OFFSET_MASK) >> bits, 1,
                                                   "data cluster")
            fresh = refcounts.alloc(needed) if needed else []
            taken = iter(fresh)
            placements = []
            for cc in range(c, seg_last + 1):
                e = table[cc - base]
                if e & OFLAG_COMPRESSED or not e & L2E_OFFSET_MASK or not e & OFLAG_COPIED:
                    placements.append(Placement(cc, e, next(taken) << bits, True))
                else:
                    placements.append(Placement(cc, e, e & L2E_OFFSET_MASK, False))
            try:
                self._write_data(offset, view, placements)
            except BaseException:
                # nothing points to them: a failed write leaks nothing
                refcounts.free_later(fresh)
                raise

            # then the L2 entries that point to it
            changes = [L2Change(p.cluster - base, p.host | OFLAG_COPIED) for p in placements
                       if p.fresh or p.entry & zero_flag]
            if changes:
                clusters.update_l2(l1_index, table, changes)
            c = seg_last + 1

    def _write_data(self, offset: int, view: memoryview, placements: list[Placement]) -> None:
        """Write the guest data of a write at `offset` into its host clusters,
        with the copy-on-write fill of partially written clusters that are
        fresh or were zero."""
        bits = self.cluster_bits
        cs = self.cluster_size
        zero_flag = self._zero_flag
        end = offset + len(view)
        # the data, with copy-on-write fills, as host pieces [start, end, parts];
        # a part is a (start, end) range of `view` or bytes of a fill
        pieces: list = []
        for cc, e, host, fresh in placements:
            cstart = cc << bits
            cend = min(cstart + cs, self.size)
            a = max(offset, cstart)
            b = min(end, cend)
            data = (a - offset, b - offset)
            if not fresh and not e & zero_flag:
                parts = [data]
                hstart = host + (a - cstart)
            elif a == cstart and b == cend:
                parts = [data]
                hstart = host
            else:
                old = self._fill(cc, e, fresh=fresh)
                if old is None:
                    parts = [data]
                    hstart = host + (a - cstart)
                else:
                    old = memoryview(old)
                    parts = [old[:a - cstart], data, old[b - cstart:cend - cstart]]
                    hstart = host
            hend = hstart + sum(len(p) if not isinstance(p, tuple) else p[1] - p[0]
                                for p in parts)
            if pieces and pieces[-1][1] == hstart:
                prev = pieces[-1]
                prev[1] = hend
                if (isinstance(prev[2][-1], tuple) and isinstance(parts[0], tuple)
                        and prev[2][-1][1] == parts[0][0]):
                    prev[2][-1] = (prev[2][-1][0], parts[0][1])
                    parts = parts[1:]
                prev[2].extend(parts)
            else:
                pieces.append([hstart, hend, parts])
        for hstart, _, parts in pieces:
            pwritev(self._file.fd, [view[p[0]:p[1]] if isinstance(p, tuple) else p
                                    for p in parts], hstart)

    # ------------------------------------------------------------------
    # zeroing
    # ------------------------------------------------------------------

    def _reads_as_zero(self, cluster: int) -> bool:
        """Whether a cluster certainly reads as zeroes (cheap checks only)."""
        clusters = self._clusters
        table = clusters.l2_table(cluster >> clusters.l2_bits)
        e = 0 if table is None else table[cluster & (clusters.l2_entries - 1)]
        if e & OFLAG_COMPRESSED:
            return False
        if e & self._zero_flag:
            return True
        if e & L2E_OFFSET_MASK:
            return False
        return self.backing is None or (cluster << self.cluster_bits) >= self.backing_size

    def write_zeroes(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        bits = self.cluster_bits
        cs = self.cluster_size
        end = offset + length
        with self._lock:
            self._start_writing()
            first = offset >> bits
            last = (end - 1) >> bits
            whole_first, whole_last = first, last
            # partial clusters at the edges are written as zero data
            for cc in sorted({first, last}):
                cstart = cc << bits
                cend = min(cstart + cs, self.size)
                a, b = max(offset, cstart), min(end, cend)
                if (a, b) == (cstart, cend):
                    continue
                if cc == whole_first:
                    whole_first += 1
                if cc == whole_last:
                    whole_last -= 1
                if not self._reads_as_zero(cc):
                    self._write_locked(a, memoryview(bytes(b - a)))
            if whole_first <= whole_last:
                if self.version >= 3:
                    self._zero_clusters_v3(whole_first, whole_last)
                else:
                    self._zero_clusters_v2(whole_first, whole_last)

    def _zero_clusters_v3(self, first: int, last: int) -> None:
        """Set the zero flag on clusters [first, last]."""
        clusters = self._clusters
        bits = self.cluster_bits
        cs = self.cluster_size
        l2_bits = clusters.l2_bits
        backing_clusters = -(-self.backing_size // cs) if self.backing is not None else 0
        c = first
        while c <= last:
            l1_index = c >> l2_bits
            seg_last = min(last, ((l1_index + 1) << l2_bits) - 1)
            base = l1_index << l2_bits
            if not clusters.l1[l1_index] & L1E_OFFSET_MASK:
                if c >= backing_clusters:
                    c = seg_last + 1      # unallocated and nothing below: reads as zeroes
                    continue
                self._refcounts.ensure_pool(1)   # for the L2 table (may release the lock)
            table = clusters.l2_table(l1_index)
            changes = []
            punch = []
            for cc in range(c, seg_last + 1):
                e = 0 if table is None else table[cc - base]
                host = e & L2E_OFFSET_MASK
                if e & OFLAG_COMPRESSED:
                    clusters.check_replaceable(e)
                    changes.append(L2Change(cc - base, OFLAG_ZERO))
                elif e & OFLAG_ZERO:
                    continue
                elif host and e & OFLAG_COPIED:
                    # keep the cluster preallocated, give its space back
                    if host & (cs - 1):
                        raise self._file.corrupt(f"data cluster offset {host:#x} is not "
                                                 "aligned")
                    self._file.check_data_clusters(host >> bits, 1, "data cluster")
                    changes.append(L2Change(cc - base, host | OFLAG_COPIED | OFLAG_ZERO))
                    punch.append(host >> bits)
                elif host or cc < backing_clusters:
                    if host:
                        clusters.check_replaceable(e)
                    changes.append(L2Change(cc - base, OFLAG_ZERO))
            if changes:
                table = clusters.l2_for_write(l1_index)
                clusters.update_l2(l1_index, table, changes)
                self._refcounts.punch(punch)
            c = seg_last + 1

    def _zero_clusters_v2(self, first: int, last: int) -> None:
        """Version 2 has no zero flag: punch our own clusters, write zeroes
        where the backing chain or shared data would show through."""
        bits = self.cluster_bits
        cs = self.cluster_size
        step = max(cs, (4 << 20) // cs * cs)
        pos, end = first << bits, min((last + 1) << bits, self.size)
        while pos < end:
            # one run at a time, looked up again after each write (which may
            # release the lock to refill the pool)
            run = self._clusters.runs(pos, min(step, end - pos))[0]
            if run.kind == DATA and run.entry & OFLAG_COPIED:
                self._file.check_data_clusters(run.host >> bits,
                                               (run.stop - run.start + cs - 1) >> bits,
                                               "data cluster")
                if not punch_hole(self._file.fd, run.host, run.stop - run.start):
                    pwrite(self._file.fd, bytes(run.stop - run.start), run.host)
            elif run.kind != UNALLOC or (self.backing is not None
                                         and run.start < self.backing_size):
                self._write_locked(run.start, memoryview(bytes(run.stop - run.start)))
            pos = run.stop

    # ------------------------------------------------------------------
    # durability
    # ------------------------------------------------------------------

    def flush(self) -> None:
        if not self.writable:
            return
        with self._lock:
            if self._file.fd < 0:
                return
            self._refcounts.apply_frees()     # syncs first if it has anything to do
            self._file.sync_unlocked()

    def close(self) -> None:
        file = self._file
        with self._lock:
            if file.fd < 0:
                return
            refcounts = self._refcounts
            while (refcounts is not None and refcounts.refilling) or self._starting \
                    or file.syncs:
                file.cond.wait()
            try:
                if self.writable and self._write_started:
                    # give the unused pool back (nothing points to it) and cut
                    # the free clusters off the end of the file
                    refcounts.release_pool()
                    refcounts.apply_frees()
                    refcounts.trim_tail()
                    file.sync_unlocked()
            finally:
                os.close(file.fd)
                file.fd = -1
                if self.backing is not None:
                    self.backing.close()
                    self.backing = None
