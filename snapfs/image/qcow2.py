"""qcow2 images (versions 2 and 3), written from QEMU's format specification
(docs/interop/qcow2.rst).

What is supported
-----------------
Reading: versions 2 and 3, cluster sizes 512 B to 2 MiB, refcount widths 1 to
64 bits, zero clusters (with or without a preallocated host cluster),
deflate-compressed clusters, and a backing chain of raw and qcow2 images (the
backing format must be named by the backing-format header extension; it is
never guessed). Writing: allocation of data clusters, L2 tables, refcount
blocks and a bigger refcount table, with exact refcounts and COPIED flags.
Creating: version 3 images with an optional backing file.

Refused when opening (one-line `UserError`): encryption, an external data
file, extended L2 entries, a compression type other than deflate, unknown
incompatible features, the corrupt bit; and for writing also internal
snapshots and the dirty bit. A malformed header is refused the same way:
every offset, size and name it gives is checked before use (tables inside
the file, cluster aligned, within QEMU's size limits, not on the header nor
on each other; a backing file name in the first cluster after the header,
without NUL bytes, naming a regular file; extension lengths within the
header; a bitmap directory inside the file). A table entry met later that
points to an unaligned place or past the end of the file (an L2 table, a
refcount block) gives EIO when it is used.

Metadata handling
-----------------
The L1 table and (when writable) the refcount table live in memory; L2 tables
and refcount blocks are kept in bounded LRU caches. All metadata caches are
write-through: a metadata change is written to the file (`pwrite`) first and
taken into memory only once that write has succeeded, all before the lock
protecting it is released, so memory never holds metadata the file lacks.

Host clusters are only ever allocated at the end of the file, never reused:
refcount-0 clusters inside the file (freed clusters) stay free and their space
is given back with `fallocate(PUNCH_HOLE)`. Allocation takes clusters from a
*reserved pool*: runs of clusters past the end of the file whose refcounts
have already been raised to 1 (and the file extended over them) and made
durable with `fdatasync`. The pool grows geometrically (from 8 MiB, by
doubling, up to 128 MiB or 65536 clusters) so that the fsync is rare; `close`
frees what is left of it and truncates the file after its last cluster in
use.

Crash guarantees
----------------
*Process crash (kill -9, an exception, a lost FUSE daemon)*: every completed
`pwrite` is in the kernel and reaches the file, so the order of the system
calls is what matters. The driver issues them in this order:

1. refcounts of new clusters are raised before any table points to them
   (pool reservation, above); a new refcount block is written before the
   refcount table entry that points to it; a moved refcount table is written
   in full before the header points to it;
2. guest data (including the copy-on-write fill of partially written
   clusters) is written before the L2 entry that points to it;
3. a new L2 table is all zeroes (fresh pool cluster) before the L1 entry
   points to it;
4. a reference is removed (L2 entry rewritten; the header switched to a
   moved refcount table; a bitmap dropped from the header) before the
   refcount of the cluster it named is lowered; lowering is deferred to the
   next `flush` or `close`, after an `fdatasync`.

So at any point the file on disk is consistent: the worst a crash can do is
leak clusters (refcount 1, no reference: the unused pool, deferred frees),
which `qemu-img check` reports as leaks (exit code 3) and `-r leaks` repairs.

*Power loss or OS crash*: the `fdatasync`s at the ordering points that protect
metadata (after raising refcounts and before using them, between a new
refcount block and its table entry, before and after switching the header to
a moved refcount table, before lowering refcounts) keep the *metadata*
consistent (leaks only). As with QEMU, guest data and L2/L1 updates written
since the last `flush` have no ordering among themselves at the disk level: a
newly allocated cluster may read as zeroes or as its new data. `flush()`
makes everything written so far durable.

The dirty bit is never set (refcounts are never lower than the references).

Failed writes
-------------
A write that fails (ENOSPC on a full file system, EIO) leaves the image
consistent, and once `close` has run (if it can write) without leaks:

- memory takes a metadata change only after its write succeeded; when the
  write of L1 or L2 entries, refcounts, refcount table entries or the header's
  refcount table fields fails, they are read back to learn what reached the
  file (if that read fails too, the cached copy is dropped and nothing is
  freed: a leak at worst, never a freed cluster that may still be in use);
- clusters that a failed write took from the pool and that no L2 entry came
  to point to, whichever of the old and new clusters of an L2 entry lost its
  reference, and the clusters of a failed pool refill are queued for freeing
  like dropped references (lowered at the next `flush` or `close`);
- frees that fail stay queued.

The failed write itself may be partly done (some clusters new, some old), as
on a disk.

Readers in other processes
--------------------------
A read-only image (the top of a chain; backing files are taken to be
unchanging) may be written meanwhile by another process through this driver:
snapfs's snapshot process reads the backup target that the live process
fills. Such a reader re-reads, for each request, the L2 entries it covers
(and an L1 entry it has seen as 0) from the file, so it sees every write that
completed before the request; it relies on this driver's writer never moving
L2 tables and never reusing host clusters.

Threads
-------
One `threading.Lock` protects the metadata (with a `Condition` on it for
threads that wait for another's pool refill or first-write preparation).
Reads and writes of clusters that are already allocated (refcount 1, COPIED)
do their data I/O outside the lock; allocating writes, copy-on-write,
zeroing, compressed-cluster reads (whose host clusters can be freed by a
concurrent rewrite of a neighbouring part) run under it. Callers must use
distinct byte ranges concurrently (as snapfs does); two writers into
different parts of the same cluster are serialised by the lock whenever the
cluster needs allocating.

No lock is held while the file is synced: `flush` (a guest's fsync), a pool
refill and the first write's header rewrite release the lock around their
`fdatasync` (`_sync_unlocked`), so other requests go on meanwhile. The
ordering rules above still hold, because a sync only has to cover writes
that completed before it started, and each rule is kept by what is done
under the lock before and after the sync:

- Frees (rule 4): `flush` and `close` take the queued frees under the lock,
  sync without it, then lower those refcounts under it. A free is queued only
  after the write that dropped the reference has completed, so the sync
  covers that write; frees queued during the sync wait for the next flush.
- The pool (rule 1): a refill, under the lock, writes the new refcount blocks
  (and table) and raises the refcounts of a run of clusters past the end of
  the file (no second refill starts meanwhile, so nothing else takes the
  run); it syncs without the lock; under the lock it points the refcount table (or
  the header) at the new blocks (or table), and syncs again without it; only
  then, under the lock, does the run join the pool. Allocation takes
  clusters from the pool alone, so no table ever points to a cluster whose
  refcount raise is not yet durable: a writer that finds the pool too small
  while a refill is in progress waits for it (`_refilling`) rather than
  taking from the run being refilled or starting a second refill. Writers
  that the pool already covers do not wait.
- Only the refilling thread changes the refcount table, the frontier and the
  file's size while it syncs, so what it computed before a sync still holds
  after it. Other threads' refcount changes (frees) go into the same cached
  refcount blocks, written through under the lock, so they and the refill's
  raises never undo each other.
- A writer makes sure the pool holds enough for an L2 table's worth of its
  write (`_ensure_pool`, which may wait or release the lock) before it looks
  that L2 table up, and then allocates and writes its data and L2 entries
  without releasing the lock. So no writer acts on a mapping read before a
  sync, and two writers into one unallocated cluster never both allocate it.
- The first write's header rewrite (dropping bitmaps, clearing autoclear
  bits) is synced before any guest data changes: other writers wait for it
  (`_starting`); readers do not.
- `close` (which must not run concurrently with other calls anyway) waits
  for refills, first-write preparations and syncs in progress.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import re
import stat
import struct
import sys
import threading
import zlib
from collections import Counter, OrderedDict
from typing import Iterator

from snapfs.errors import UserError
from snapfs.image.base import Image
from snapfs.image.raw import RawImage, punch_hole

MAGIC = b"QFI\xfb"

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
AUTOCLEAR_BITMAPS = 1 << 0

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20          # QEMU's limit
MAX_REFTABLE_BYTES = 8 << 20     # QEMU's limit
MAX_BACKING_NAME = 1023
MAX_FORMAT_NAME = 15             # QEMU's limit (a 16-byte buffer)
MAX_SNAPSHOTS = 65536            # QEMU's limit
SNAPSHOT_ENTRY_MIN = 40          # the fixed part of a snapshot table entry
MAX_BITMAPS = 65535              # QEMU's limit
MAX_BITMAP_DIRECTORY_BYTES = 64 << 20
MAX_CHAIN_DEPTH = 16
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 112           # what create() writes: up to compression_type + padding

L2_CACHE_BYTES = 32 << 20
RB_CACHE_BYTES = 4 << 20
POOL_FIRST_BYTES = 8 << 20
POOL_MAX_BYTES = 128 << 20
POOL_MAX_CLUSTERS = 1 << 16

# cluster kinds, as seen by the mapping
UNALLOC, ZERO, DATA, COMPRESSED = range(4)

_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")   # the 72 bytes of a version 2 header
_HEADER3 = struct.Struct(">QQQII")           # bytes 72..103 of version 3
_BIG = sys.byteorder == "big"
_NONZERO = re.compile(rb"[^\x00]")
log = logging.getLogger("snapfs")
_IOV_MAX = 1024
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    pass

_COMPRESSION_NAMES = {1: "zstd"}


def _be_array(raw: bytes) -> array.array:
    """An array of unsigned 64-bit ints from big-endian bytes."""
    arr = array.array("Q")
    arr.frombytes(raw)
    if not _BIG:
        arr.byteswap()
    return arr


def _be_bytes(arr: array.array) -> bytes:
    if not _BIG:
        arr = array.array("Q", arr)
        arr.byteswap()
    return arr.tobytes()


def _printable(text: str) -> str:
    """`text` for a one-line message: control characters (and undecodable
    bytes) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset`; past the end of the file with
    zeroes."""
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            view[:] = bytes(len(view))
            return
        view = view[n:]
        offset += n


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    buf = bytearray(length)
    view = memoryview(buf)
    view[:len(data)] = data
    _pread_into(fd, view[len(data):], offset + len(data))
    return bytes(buf)


def _pwritev(fd: int, bufs: list, offset: int) -> None:
    """Write all buffers, in order, at `offset`."""
    bufs = [memoryview(b) for b in bufs if len(b)]
    bufs = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in bufs]
    i = 0
    while i < len(bufs):
        chunk = bufs[i:i + _IOV_MAX]
        n = os.pwritev(fd, chunk, offset)
        offset += n
        while n:
            if n >= len(bufs[i]):
                n -= len(bufs[i])
                i += 1
            else:
                bufs[i] = bufs[i][n:]
                n = 0


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


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
        if size < 0:
            raise ValueError("negative image size")
        if (cluster_size & (cluster_size - 1) or
                not (1 << MIN_CLUSTER_BITS) <= cluster_size <= (1 << MAX_CLUSTER_BITS)):
            raise UserError(f"{path}: cluster size {cluster_size} is not supported "
                            "(a power of two from 512 to 2097152)")
        name = b""
        fmt = b""
        if backing_file is not None:
            if backing_format not in ("raw", "qcow2"):
                raise UserError(f"{path}: backing format {backing_format!r} is not supported "
                                "(give 'raw' or 'qcow2')")
            name = os.fsencode(backing_file)
            fmt = backing_format.encode()
            if not name:
                raise UserError(f"{path}: empty backing file name")
            if len(name) > MAX_BACKING_NAME:
                raise UserError(f"{path}: backing file name longer than {MAX_BACKING_NAME} bytes")
        elif backing_format is not None:
            raise UserError(f"{path}: backing format given without a backing file")

        size = -(-size // 512) * 512
        cs = cluster_size
        bits = cs.bit_length() - 1
        l2_span = cs * (cs // 8)
        l1_size = -(-size // l2_span)
        if l1_size * 8 > MAX_L1_BYTES:
            raise UserError(f"{path}: size {size} is too big for cluster size {cs} "
                            "(the L1 table would exceed 32 MiB)")
        l1_clusters = -(-l1_size * 8 // cs)
        rb_entries = cs * 8 // 16
        reft_clusters, blocks = 1, 1
        while True:  # the refcount structures must cover themselves
            total = 1 + reft_clusters + blocks + l1_clusters
            need_blocks = -(-total // rb_entries)
            need_reft = max(1, -(-need_blocks * 8 // cs))
            if (need_blocks, need_reft) == (blocks, reft_clusters):
                break
            blocks, reft_clusters = need_blocks, need_reft
        reft_off = cs
        blocks_off = reft_off + reft_clusters * cs
        l1_off = blocks_off + blocks * cs

        exts = b""
        if fmt:
            exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt
            exts += bytes(-len(exts) % 8)
        exts += struct.pack(">II", EXT_END, 0)
        backing_off = V3_HEADER_LENGTH + len(exts) if name else 0
        header = _HEADER.pack(MAGIC, 3, backing_off, len(name), bits, size, 0, l1_size,
                              l1_off, reft_off, reft_clusters, 0, 0)
        header += _HEADER3.pack(0, 0, 0, 4, V3_HEADER_LENGTH)
        header += bytes(V3_HEADER_LENGTH - len(header))  # compression_type 0 (deflate), padding
        header += exts + name
        if len(header) > cs:
            raise UserError(f"{path}: the backing file name does not fit in the first "
                            f"cluster; use a bigger cluster size than {cs}")

        reftable = array.array("Q", (blocks_off + i * cs for i in range(blocks)))
        reftable.frombytes(bytes(reft_clusters * cs - blocks * 8))
        refblocks = (b"\x00\x01" * total).ljust(blocks * cs, b"\x00")

        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
        fd = os.open(path, flags, 0o644)
        try:
            _pwrite(fd, header, 0)
            _pwrite(fd, _be_bytes(reftable), reft_off)
            _pwrite(fd, refblocks, blocks_off)
            os.ftruncate(fd, total * cs)
            os.fdatasync(fd)
            _fsync_dir(path)
            return cls._from_fd(path, fd, True, 0, set())
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise

    @classmethod
    def _from_fd(cls, path: str, fd: int, writable: bool, depth: int, seen: set,
                 backing_dir: str | None = None, with_backing: bool = True) -> "Qcow2Image":
        self = cls.__new__(cls)
        self.path = path
        self.fd = fd
        self.writable = writable
        self.backing = None
        self._backing_missing = False   # it has a backing file, deliberately not opened
        self._lock = threading.Lock()
        # waits (releasing the lock) for a pool refill or the first write's
        # header rewrite that another thread is syncing
        self._cond = threading.Condition(self._lock)
        st = os.fstat(fd)
        seen.add((st.st_dev, st.st_ino))
        # a read-only top image may be written meanwhile by another process
        # (the snapshot process reads the target the live process writes)
        self._follow = not writable and depth == 0
        try:
            file_size = os.lseek(fd, 0, os.SEEK_END)   # st_size is 0 for a block device
            self._read_header(file_size)
            if writable:
                self._load_refcount_table()
            if with_backing:
                self._open_backing(depth, seen, backing_dir)
            else:
                self.backing_size = 0
                self._backing_missing = self._backing_name is not None
        except BaseException:
            if self.backing is not None:
                self.backing.close()
            raise
        return self

    def _refuse(self, problem: str) -> UserError:
        return UserError(f"{self.path}: {problem}")

    def _read_header(self, file_size: int) -> None:
        """Parse the header, its extensions and the backing file name, and
        load the L1 table.

        Every offset, size and name is checked before it is used, so that a
        malformed image is refused with one line whatever its bytes: QEMU's
        checks (qcow2_do_open), plus tables that must lie inside the file and
        not on the header or on each other."""
        fd = self.fd
        head = os.pread(fd, 4096, 0)
        if len(head) < 4 or head[:4] != MAGIC:
            raise self._refuse("not a qcow2 image")
        if len(head) < _HEADER.size:
            raise self._refuse("truncated qcow2 header")
        (_, version, backing_off, backing_len, bits, size, crypt, l1_size, l1_off,
         reft_off, reft_clusters, nb_snapshots, snapshots_off) = _HEADER.unpack_from(head)
        if version not in (2, 3):
            raise self._refuse(f"qcow2 version {version} is not supported")
        if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
            raise self._refuse(f"cluster size 2^{bits} is not supported (512 B to 2 MiB)")
        cs = 1 << bits
        first = _pread_exact(fd, cs, 0) if cs > len(head) else head[:cs].ljust(cs, b"\0")
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = V2_HEADER_LENGTH
        compression_type = 0
        if version >= 3:
            if len(head) < 104:
                raise self._refuse("truncated qcow2 header")
            incompat, compat, autoclear, refcount_order, header_length = \
                _HEADER3.unpack_from(first, 72)
            if header_length < 104 or header_length % 8 or header_length > cs:
                raise self._refuse(f"invalid header length {header_length}")
            if header_length > 104:
                compression_type = first[104]

        # the backing file name: in the first cluster, after the header; the
        # header extensions end where it starts
        ext_end = cs
        if backing_off:
            if backing_len > MAX_BACKING_NAME:
                raise self._refuse(f"backing file name longer than {MAX_BACKING_NAME} bytes")
            if not header_length <= backing_off <= cs - backing_len:
                raise self._refuse(f"invalid backing file name location ({backing_len} bytes "
                                   f"at offset {backing_off:#x}): it must lie in the first "
                                   "cluster, after the header")
            ext_end = backing_off

        # header extensions
        backing_format = None
        feature_names = {}
        extensions = []
        pos = header_length
        while pos + 8 <= ext_end:
            ext_type, ext_len = struct.unpack_from(">II", first, pos)
            if ext_type == EXT_END:
                break
            if ext_len > ext_end - pos - 8:
                raise self._refuse(f"invalid header extension {ext_type:#x}: its length "
                                   f"{ext_len} runs past the end of the header")
            data = first[pos + 8:pos + 8 + ext_len]
            extensions.append((ext_type, data))
            if ext_type == EXT_BACKING_FORMAT:
                if ext_len > MAX_FORMAT_NAME:
                    raise self._refuse(f"invalid backing format header extension ({ext_len} "
                                       f"bytes; a format name has at most {MAX_FORMAT_NAME})")
                backing_format = data.decode("utf-8", "replace")
            elif ext_type == EXT_FEATURE_NAMES:
                for i in range(0, ext_len - 47, 48):
                    kind, bit = data[i], data[i + 1]
                    feature_names[kind, bit] = data[i + 2:i + 48].rstrip(b"\0").decode(
                        "utf-8", "replace")
            elif ext_type == EXT_BITMAPS and autoclear & AUTOCLEAR_BITMAPS:
                self._check_bitmaps_extension(data, cs, file_size)
            pos += 8 + ext_len + (-ext_len % 8)

        # refusals, most fundamental first
        if crypt != 0:
            raise self._refuse("encrypted images are not supported")
        if incompat & INCOMPAT_CORRUPT:
            raise self._refuse("the image is marked corrupt; repair it with "
                               "'qemu-img check -r all' first")
        if incompat & INCOMPAT_DATA_FILE:
            raise self._refuse("images with an external data file are not supported")
        if incompat & INCOMPAT_EXTL2:
            raise self._refuse("images with extended L2 entries (subclusters) are not supported")
        if incompat & INCOMPAT_COMPRESSION or compression_type != 0:
            if compression_type == 0:
                raise self._refuse("the compression type bit is set but no compression "
                                   "type is given")
            name = _COMPRESSION_NAMES.get(compression_type, f"#{compression_type}")
            raise self._refuse(f"compression type {name} is not supported (only deflate)")
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            bits_set = [b for b in range(64) if unknown >> b & 1]
            names = ", ".join(f"bit {b}" + (f" ({_printable(feature_names[0, b])})"
                                            if feature_names.get((0, b)) else "")
                              for b in bits_set)
            raise self._refuse(f"unknown incompatible features are set: {names}")
        if self.writable and nb_snapshots:
            raise self._refuse(f"the image has {nb_snapshots} internal snapshot(s); "
                               "it can only be opened read-only")
        if self.writable and incompat & INCOMPAT_DIRTY:
            raise self._refuse("the image is dirty (refcounts may be wrong); repair it "
                               "with 'qemu-img check -r all' first")
        if refcount_order > 6:
            raise self._refuse(f"invalid refcount order {refcount_order}")

        # the tables: sizes within QEMU's limits, cluster aligned, inside the
        # file, not on the header nor on each other
        l2_bits = bits - 3
        l2_span = 1 << (bits + l2_bits)
        if size > MAX_L1_BYTES // 8 * l2_span:
            raise self._refuse(f"image size {size} is too large for cluster size {cs}")
        if l1_size * 8 > MAX_L1_BYTES:
            raise self._refuse(f"L1 table too large ({l1_size} entries)")
        if l1_size < -(-size // l2_span):
            raise self._refuse("L1 table is too small for the image size")
        if l1_off % cs:
            raise self._refuse("L1 table offset is not cluster aligned")
        if l1_size:
            self._check_table_location("L1 table", l1_off, l1_size * 8, cs, file_size)
        if reft_off % cs:
            raise self._refuse("refcount table offset is not cluster aligned")
        if not 0 < reft_clusters <= MAX_REFTABLE_BYTES // cs:
            raise self._refuse(f"invalid refcount table size ({reft_clusters} clusters)")
        self._check_table_location("refcount table", reft_off, reft_clusters * cs, cs,
                                   file_size)
        if l1_size and l1_off < reft_off + reft_clusters * cs and reft_off < l1_off + l1_size * 8:
            raise self._refuse("the L1 table and the refcount table overlap")
        if nb_snapshots > MAX_SNAPSHOTS:
            raise self._refuse(f"too many internal snapshots ({nb_snapshots})")
        if snapshots_off % cs:
            raise self._refuse("snapshot table offset is not cluster aligned")
        if nb_snapshots:
            self._check_table_location("snapshot table", snapshots_off,
                                       nb_snapshots * SNAPSHOT_ENTRY_MIN, cs, file_size)

        self._backing_name = None
        if backing_off and backing_len:   # an empty name is no backing file, as in QEMU
            name = first[backing_off:backing_off + backing_len]
            if b"\0" in name:
                raise self._refuse(f"the backing file name {_printable(os.fsdecode(name))} "
                                   "contains a NUL byte")
            self._backing_name = name

        self.version = version
        self.cluster_bits = bits
        self.cluster_size = cs
        self.size = size
        self.l2_bits = l2_bits
        self.l2_entries = 1 << l2_bits
        self.l1_size = l1_size
        self.l1_offset = l1_off
        self.reft_offset = reft_off
        self.reft_clusters = reft_clusters
        self.refcount_order = refcount_order
        self.autoclear = autoclear
        self._header_length = header_length
        self._extensions = extensions
        self.compat = compat
        self.incompat = incompat
        self.nb_snapshots = nb_snapshots
        self._zero_flag = OFLAG_ZERO if version >= 3 else 0
        # compressed cluster descriptor: offset in bits 0..x-1, sectors in x..61
        self._cshift = 62 - (bits - 8)
        self._coff_mask = (1 << self._cshift) - 1
        self._csec_mask = (1 << (bits - 8)) - 1
        self._backing_format = backing_format
        self.l1 = _be_array(_pread_exact(self.fd, l1_size * 8, l1_off)) if l1_size \
            else array.array("Q")
        self._l2_cache = _LRU(max(8, L2_CACHE_BYTES // cs))
        self._rb_cache = _LRU(max(8, RB_CACHE_BYTES // cs))
        self._write_started = False
        self._starting = False          # a thread is preparing the first write
        self._header_unsynced = False   # the first write's header rewrite needs a sync
        self._pending_frees: Counter = Counter()
        self._pool: list[list[int]] = []    # [next, end) cluster runs, durable refcount 1
        self._pool_count = 0
        self._refilling = False         # a thread is refilling the pool
        self._syncs = 0                 # threads syncing without the lock
        self._grown = False             # the file was extended by this instance
        self._pool_chunk = max(1, min(POOL_MAX_CLUSTERS, POOL_FIRST_BYTES // cs))
        self._frontier = -(-file_size // cs)
        self._file_end = file_size     # known to be at most the file's size (it only grows)

    def _check_table_location(self, what: str, offset: int, length: int, cs: int,
                              file_size: int) -> None:
        """Refuse a (cluster aligned) table of the header that overlaps the
        header or does not lie inside the file."""
        if offset < cs:
            raise self._refuse(f"the {what} offset {offset:#x} overlaps the header")
        if offset + length > file_size:
            raise self._refuse(f"the {what} ({length} bytes at offset {offset:#x}) lies past "
                               f"the end of the file ({file_size} bytes)")

    def _check_bitmaps_extension(self, data: bytes, cs: int, file_size: int) -> None:
        """Refuse a bitmaps extension whose directory cannot be read (it is
        read at the first write, to free the bitmaps)."""
        if len(data) < 24:
            raise self._refuse(f"invalid bitmaps header extension ({len(data)} bytes)")
        count, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", data)
        if not 0 < count <= MAX_BITMAPS:
            raise self._refuse(f"invalid bitmaps header extension ({count} bitmaps)")
        if not 0 < dir_size <= MAX_BITMAP_DIRECTORY_BYTES or dir_offset % cs:
            raise self._refuse(f"invalid bitmaps header extension (a directory of {dir_size} "
                               f"bytes at offset {dir_offset:#x})")
        self._check_table_location("bitmap directory", dir_offset, dir_size, cs, file_size)

    def _load_refcount_table(self) -> None:
        cs = self.cluster_size
        self.reftable = _be_array(_pread_exact(self.fd, self.reft_clusters * cs,
                                               self.reft_offset))
        self._rb_entries = cs * 8 >> self.refcount_order
        self._rc_max = (1 << (1 << self.refcount_order)) - 1

    def _open_backing(self, depth: int, seen: set, backing_dir: str | None = None) -> None:
        name = self._backing_name
        if name is None:
            self.backing_size = 0
            return
        shown = _printable(os.fsdecode(name))
        fmt = self._backing_format
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
            # (O_NONBLOCK: a name that leads to a FIFO must not hang the open)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise self._refuse(f"cannot open backing file {shown}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise self._refuse(f"the backing file {shown} is not a regular file")
            if (st.st_dev, st.st_ino) in seen:
                raise self._refuse(f"backing chain loop: {shown} is already in the chain")
            if fmt == "raw":
                seen.add((st.st_dev, st.st_ino))
                os.close(fd)
                fd = -1
                self.backing = RawImage.open(path, writable=False)
            else:
                try:
                    self.backing = Qcow2Image._from_fd(path, fd, False, depth + 1, seen)
                except UserError as e:
                    # name the image the user opened, then the chain down to the problem
                    problem = str(e).removeprefix(f"{path}: ")
                    raise self._refuse(f"backing file {shown}: {problem}") from None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self.backing_size = self.backing.size

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the header (None if none)."""
        return None if self._backing_name is None else os.fsdecode(self._backing_name)

    @property
    def backing_format(self) -> str | None:
        return self._backing_format

    # ------------------------------------------------------------------
    # metadata access (all under self._lock)
    # ------------------------------------------------------------------

    def _sync_unlocked(self) -> None:
        """fdatasync the file with the metadata lock released (the caller
        holds it, and has it again when this returns or raises): no request
        waits for the disk because another one syncs. Whatever the caller
        read under the lock before may have changed when this returns."""
        self._syncs += 1
        self._lock.release()
        try:
            os.fdatasync(self.fd)
        finally:
            self._lock.acquire()
            self._syncs -= 1
            if not self._syncs:
                self._cond.notify_all()

    def _corrupt(self, what: str) -> OSError:
        return OSError(errno.EIO, f"{self.path}: corrupt qcow2 image: {what}")

    def _check_metadata_offset(self, offset: int, what: str) -> None:
        """Refuse (EIO) a table or block offset that a table entry gives and
        that cannot be right: not cluster aligned, or past the end of the
        file (the check that keeps a bogus entry from becoming a read or
        write at an absurd offset). Only looks at the file when the offset
        is past the size seen last: the file only grows."""
        if offset & (self.cluster_size - 1):
            raise self._corrupt(f"{what} offset {offset:#x} is not cluster aligned")
        if offset >= self._file_end:
            self._file_end = os.lseek(self.fd, 0, os.SEEK_END)
            if offset >= self._file_end:
                raise self._corrupt(f"{what} offset {offset:#x} lies past the end of the file")

    def _l2_table(self, l1_index: int) -> array.array | None:
        """The L2 table of an L1 entry (cached), or None if unallocated."""
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not offset:
            return None
        table = self._l2_cache.lookup(offset)
        if table is None:
            self._check_metadata_offset(offset, "L2 table")
            table = _be_array(_pread_exact(self.fd, self.cluster_size, offset))
            self._l2_cache.put(offset, table)
        return table

    def _l2_fresh(self, l1_index: int, lo: int, hi: int) -> array.array | None:
        """The L2 table of an L1 entry with entries [lo, hi) read again from
        the file: for a read-only image that another process may be writing.

        With this driver as the writer, an L1 entry only changes from 0 to an
        L2 table that never moves, host clusters are never reused, and every
        entry is 8-byte aligned and written whole, so fresh entries are all a
        reader needs to see every write that completed before its read."""
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not offset:
            e = int.from_bytes(_pread_exact(self.fd, 8, self.l1_offset + l1_index * 8), "big")
            if not e & L1E_OFFSET_MASK:
                return None
            self.l1[l1_index] = e
            return self._l2_table(l1_index)      # not cached: read now
        table = self._l2_cache.lookup(offset)
        if table is None:
            return self._l2_table(l1_index)
        table[lo:hi] = _be_array(_pread_exact(self.fd, (hi - lo) * 8, offset + lo * 8))
        return table

    def _write_l1_entry(self, l1_index: int, entry: int) -> None:
        """Write an L1 entry to the file, then to memory."""
        _pwrite(self.fd, entry.to_bytes(8, "big"), self.l1_offset + l1_index * 8)
        self.l1[l1_index] = entry

    def _on_disk(self, offset: int, length: int) -> bytes | None:
        """The bytes of the file at `offset`, or None if they cannot be read:
        after a failed metadata write, what reached the file."""
        try:
            return _pread_exact(self.fd, length, offset)
        except OSError:
            return None

    def _update_l2(self, l1_index: int, table: array.array, changes: list) -> None:
        """Set L2 entries [(index, new entry)], sorted by index: in the file,
        then in memory; then queue the freeing of the clusters the replaced
        entries named and the new ones do not.

        If the write fails, the entries are read back to learn which reached
        the file; memory is set to that, and for each entry whichever of the
        old and the new clusters lost its reference is queued for freeing (a
        failed allocating write leaks nothing). If the read fails too, the
        table is dropped from the cache and nothing is freed: a leak at
        worst, never a freed cluster that an entry may point to."""
        lo, hi = changes[0][0], changes[-1][0] + 1
        if hi - lo == 1:     # the common case, cheaper
            raw = changes[0][1].to_bytes(8, "big")
        else:
            new = table[lo:hi]
            for i, e in changes:
                new[i - lo] = e
            raw = _be_bytes(new)
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        try:
            _pwrite(self.fd, raw, offset + lo * 8)
        except OSError:
            raw = self._on_disk(offset + lo * 8, (hi - lo) * 8)
            if raw is None:
                self._l2_cache.pop(offset, None)
                raise
            found = _be_array(raw)
            for i, e in changes:
                if found[i - lo] == e:
                    self._drop_reference(table[i], e)
                elif found[i - lo] == table[i]:
                    self._drop_reference(e, table[i])
            table[lo:hi] = found
            raise
        for i, e in changes:
            if table[i]:
                self._drop_reference(table[i], e)
            table[i] = e

    def _map(self, offset: int, length: int) -> list:
        """The guest range as runs [kind, start, end, host offset, L2 entry].

        Adjacent clusters of the same kind are merged (data clusters only when
        their host ranges are contiguous and their COPIED flags are equal);
        compressed clusters are never merged."""
        runs: list = []
        bits = self.cluster_bits
        cs = self.cluster_size
        end = offset + length
        c = offset >> bits
        last = (end - 1) >> bits
        l2_bits = self.l2_bits
        zero_flag = self._zero_flag
        while c <= last:
            l1_index = c >> l2_bits
            seg_last = min(last, ((l1_index + 1) << l2_bits) - 1)
            base = l1_index << l2_bits
            if self._follow:
                table = self._l2_fresh(l1_index, c - base, seg_last + 1 - base)
            else:
                table = self._l2_table(l1_index)
            if table is None:
                start = max(offset, c << bits)
                stop = min(end, (seg_last + 1) << bits)
                if runs and runs[-1][0] == UNALLOC:
                    runs[-1][2] = stop
                else:
                    runs.append([UNALLOC, start, stop, 0, 0])
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
                    runs.append([COMPRESSED, start, stop, 0, e])
                    continue
                host = e & L2E_OFFSET_MASK
                if e & zero_flag:
                    kind = ZERO
                elif host:
                    kind = DATA
                    if host & (cs - 1):
                        raise self._corrupt(f"data cluster offset {host:#x} is not aligned")
                    host += start & (cs - 1)
                elif e & OFLAG_COPIED:
                    raise self._corrupt(f"L2 entry {e:#x} has no offset")
                else:
                    kind = UNALLOC
                if runs:
                    prev = runs[-1]
                    if prev[0] == kind and prev[2] == start and (
                            kind == UNALLOC or kind == ZERO or
                            (kind == DATA and prev[3] + (start - prev[1]) == host
                             and (prev[4] ^ e) & OFLAG_COPIED == 0)):
                        prev[2] = stop
                        continue
                runs.append([kind, start, stop, host, e])
            c = seg_last + 1
        return runs

    # --- refcounts ----------------------------------------------------

    def _refblock(self, index: int, must_exist: bool = True) -> tuple[bytearray | None, int]:
        offset = self.reftable[index] & REFT_OFFSET_MASK if index < len(self.reftable) else 0
        if not offset:
            if must_exist:
                raise self._corrupt(f"refcount block {index} is missing")
            return None, 0
        block = self._rb_cache.lookup(index)
        if block is None:
            self._check_metadata_offset(offset, "refcount block")
            block = bytearray(_pread_exact(self.fd, self.cluster_size, offset))
            self._rb_cache.put(index, block)
        return block, offset

    def _rc_entry_bytes(self, first: int, end: int) -> tuple[int, int]:
        """The byte range of refcount block entries [first, end)."""
        order = self.refcount_order
        if order >= 3:
            width = 1 << (order - 3)
            return first * width, end * width
        per_byte = 8 >> order
        return first // per_byte, -(-end // per_byte)

    def _rc_get_in(self, block: bytearray, i: int) -> int:
        order = self.refcount_order
        if order >= 3:
            width = 1 << (order - 3)
            return int.from_bytes(block[i * width:(i + 1) * width], "big")
        nbits = 1 << order
        pos = i * nbits
        return (block[pos >> 3] >> (pos & 7)) & ((1 << nbits) - 1)

    def _rc_set_in(self, block: bytearray, i: int, value: int) -> None:
        order = self.refcount_order
        if order >= 3:
            width = 1 << (order - 3)
            block[i * width:(i + 1) * width] = value.to_bytes(width, "big")
            return
        nbits = 1 << order
        pos = i * nbits
        mask = ((1 << nbits) - 1) << (pos & 7)
        block[pos >> 3] = (block[pos >> 3] & ~mask) | (value << (pos & 7))

    def _rc_set_range_in(self, block: bytearray, first: int, end: int, value: int) -> None:
        order = self.refcount_order
        if order >= 3:
            width = 1 << (order - 3)
            block[first * width:end * width] = value.to_bytes(width, "big") * (end - first)
        else:
            for i in range(first, end):
                self._rc_set_in(block, i, value)

    def _refcount(self, cluster: int) -> int:
        block, _ = self._refblock(cluster // self._rb_entries, must_exist=False)
        return 0 if block is None else self._rc_get_in(block, cluster % self._rb_entries)

    def _rc_change(self, deltas: dict) -> list[int]:
        """Add deltas {cluster: delta} to refcounts, writing each touched
        refcount block once (the file first, then memory). Returns the
        clusters whose refcount became 0.

        Applied deltas are removed from `deltas`: after a failure it holds
        what is still to do. (A block whose write fails is read back to
        learn which of its entries reached the file; if that read fails too,
        the block is dropped from the cache and its deltas given up. This is
        only used to lower refcounts, so giving up leaks at worst.)"""
        per_block: dict = {}
        E = self._rb_entries
        for cluster in deltas:
            per_block.setdefault(cluster // E, []).append(cluster % E)
        freed = []
        for index in sorted(per_block):
            block, offset = self._refblock(index)
            entries = per_block[index]
            new = bytearray(block)
            for i in entries:
                value = self._rc_get_in(block, i) + deltas[index * E + i]
                if value < 0 or value > self._rc_max:
                    del deltas[index * E + i]      # never to be tried again
                    raise self._corrupt(f"refcount of cluster {index * E + i} out of range "
                                        f"({value})")
                self._rc_set_in(new, i, value)
            a, b = self._rc_entry_bytes(min(entries), max(entries) + 1)
            try:
                _pwrite(self.fd, new[a:b], offset + a)
            except OSError:
                raw = self._on_disk(offset + a, b - a)
                if raw is None:
                    self._rb_cache.pop(index, None)
                for i in entries:
                    if raw is None or self._rc_get_in(new, i) == self._rc_get_in(
                            bytearray(a) + raw, i):
                        del deltas[index * E + i]
                if raw is not None:
                    block[a:b] = raw
                raise
            block[a:b] = new[a:b]
            for i in entries:
                del deltas[index * E + i]
                if not self._rc_get_in(block, i):
                    freed.append(index * E + i)
        return freed

    # --- allocation -----------------------------------------------------

    def _ensure_pool(self, count: int) -> None:
        """Make the pool hold at least `count` clusters, refilling it (or
        waiting for the thread that is refilling it) if it does not. May
        release the lock while a refill syncs: call it before reading the
        metadata the allocation depends on."""
        while self._pool_count < count:
            if self._refilling:
                self._cond.wait()
            else:
                self._refill_pool(count - self._pool_count)

    def _alloc(self, count: int) -> list[tuple[int, int]]:
        """Take `count` fresh (all-zero, durable refcount 1) clusters from the
        pool, which `_ensure_pool` made big enough: a list of (first cluster,
        number of clusters)."""
        if count > self._pool_count:
            raise RuntimeError("qcow2: allocation from a pool that was not ensured")
        out: list = []
        while count:
            run = self._pool[0]
            take = min(count, run[1] - run[0])
            if out and out[-1][0] + out[-1][1] == run[0]:
                out[-1] = (out[-1][0], out[-1][1] + take)
            else:
                out.append((run[0], take))
            run[0] += take
            if run[0] == run[1]:
                del self._pool[0]
            self._pool_count -= take
            count -= take
        return out

    def _refill_pool(self, count: int) -> None:
        """Add a run of at least `count` clusters past the end of the file to
        the pool, creating refcount blocks and growing the refcount table as
        needed; durable before the clusters join the pool.

        One thread refills at a time (`_refilling`); the lock is released
        while it syncs (see "Threads" in the module docstring for why that is
        safe). If it fails (ENOSPC, EIO), the pool is unchanged and every
        cluster whose refcount was raised and that nothing points to is
        queued for freeing: the image stays consistent and leaks nothing."""
        self._refilling = True
        try:
            self._refill_pool_locked(count)
        finally:
            self._refilling = False
            self._cond.notify_all()

    def _refill_pool_locked(self, count: int) -> None:
        cs = self.cluster_size
        E = self._rb_entries
        want = max(count, self._pool_chunk)
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
                        raise OSError(errno.ENOSPC, f"{self.path}: image file too large for "
                                      "the qcow2 refcount table")
                miss = [b for b in range(first // E, last_block + 1)
                        if b >= len(self.reftable) or not self.reftable[b] & REFT_OFFSET_MASK]
                if table == new_table and miss == missing:
                    break
                new_table, missing = table, miss
            # clusters past the end of the file must be free; skip any that are not
            busy = self._last_used_in(first, end)
            if busy is None:
                break
            self._frontier = busy + 1

        table_at = first
        blocks_at = first + new_table
        pool_at = blocks_at + len(missing)
        block_host = {b: (blocks_at + i) * cs for i, b in enumerate(missing)}
        new_blocks = {}
        raised = False
        size_before = os.fstat(self.fd).st_size
        try:
            # 1. new metadata past the end of the file, which nothing points
            #    to yet: new refcount blocks (counting the clusters of the
            #    region they cover) and the new refcount table
            for b in missing:
                lo, hi = max(first, b * E) - b * E, min(end, (b + 1) * E) - b * E
                block = new_blocks[b] = bytearray(cs)
                self._rc_set_range_in(block, lo, hi, 1)
                _pwrite(self.fd, block, block_host[b])
            if os.fstat(self.fd).st_size < end * cs:
                os.ftruncate(self.fd, end * cs)
            if new_table:
                reftable = array.array("Q", self.reftable)
                reftable.frombytes(bytes(new_table * cs - len(reftable) * 8))
                for b, host in block_host.items():
                    reftable[b] = host
                _pwrite(self.fd, _be_bytes(reftable), table_at * cs)
            # 2. the refcounts of the region's clusters in existing blocks
            for b in range(first // E, last_block + 1):
                if b in block_host:
                    continue
                lo, hi = max(first, b * E) - b * E, min(end, (b + 1) * E) - b * E
                block, offset = self._refblock(b)
                new = bytearray(block)
                self._rc_set_range_in(new, lo, hi, 1)
                x, y = self._rc_entry_bytes(lo, hi)
                raised = True
                try:
                    _pwrite(self.fd, new[x:y], offset + x)
                except OSError:
                    raw = self._on_disk(offset + x, y - x)
                    if raw is None:
                        self._rb_cache.pop(b, None)
                    else:
                        block[x:y] = raw
                    raise
                block[x:y] = new[x:y]
            self._sync_unlocked()

            # 3. point the refcount table (or the header) at what was written
            if new_table:
                switch = struct.pack(">QI", table_at * cs, new_table)
                try:
                    _pwrite(self.fd, switch, 48)
                except OSError:
                    got = self._on_disk(48, 12)
                    if got is None:
                        raised = None      # unknown: the new table may be in use
                    elif got == switch:
                        self._use_reftable(reftable, table_at * cs, new_table, new_blocks)
                    raise
                self._use_reftable(reftable, table_at * cs, new_table, new_blocks)
                self._sync_unlocked()
            elif missing:
                lo, hi = min(missing), max(missing) + 1
                entries = self.reftable[lo:hi]
                for b, host in block_host.items():
                    entries[b - lo] = host
                try:
                    _pwrite(self.fd, _be_bytes(entries), self.reft_offset + lo * 8)
                except OSError:
                    raw = self._on_disk(self.reft_offset + lo * 8, (hi - lo) * 8)
                    if raw is None:
                        raised = None      # unknown: the blocks may be in use
                        raise
                    entries = _be_array(raw)
                    self._link_blocks(lo, entries, new_blocks)
                    raise
                self._link_blocks(lo, entries, new_blocks)
                self._sync_unlocked()
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
                    if os.fstat(self.fd).st_size > size_before:
                        os.ftruncate(self.fd, size_before)
                except OSError:
                    self._frontier = end
                    self._grown = True
            raise
        self._pool.append([pool_at, end])
        self._pool_count += end - pool_at
        self._frontier = end
        self._grown = True
        self._pool_chunk = min(self._pool_chunk * 2, max(1, POOL_MAX_BYTES // cs),
                               POOL_MAX_CLUSTERS)

    def _use_reftable(self, reftable: array.array, offset: int, clusters: int,
                      blocks: dict) -> None:
        """The header now points to a new refcount table (with new blocks):
        use it, and queue the old one for freeing (after the next sync)."""
        old_first = self.reft_offset // self.cluster_size
        for c in range(old_first, old_first + self.reft_clusters):
            self._pending_frees[c] += 1
        self.reftable = reftable
        self.reft_offset, self.reft_clusters = offset, clusters
        for b, block in blocks.items():
            self._rb_cache.put(b, block)

    def _link_blocks(self, lo: int, entries: array.array, blocks: dict) -> None:
        """Refcount table entries [lo, lo + len(entries)) are now in the file
        as `entries`: take them, and the new blocks they point to."""
        self.reftable[lo:lo + len(entries)] = entries
        for b, block in blocks.items():
            if self.reftable[b] & REFT_OFFSET_MASK:
                self._rb_cache.put(b, block)

    def _abandon(self, first: int, end: int) -> None:
        """After a failed refill of the pool: queue for freeing every cluster
        of [first, end) that has a refcount and that nothing points to (all
        but the refcount table and blocks the file now points to)."""
        cs = self.cluster_size
        keep = set(range(self.reft_offset // cs, self.reft_offset // cs + self.reft_clusters))
        for b in range(first // self._rb_entries, (end - 1) // self._rb_entries + 1):
            if b < len(self.reftable):
                keep.add((self.reftable[b] & REFT_OFFSET_MASK) // cs)
        try:
            for c in range(first, end):
                if c not in keep and self._refcount(c):
                    self._pending_frees[c] += 1
        except OSError:
            pass     # a refcount block cannot be read: leak what is left

    def _last_used_in(self, first: int, end: int) -> int | None:
        """The last cluster in [first, end) with a nonzero refcount, or None."""
        E = self._rb_entries
        found = None
        for b in range(first // E, (end - 1) // E + 1):
            block, _ = self._refblock(b, must_exist=False)
            if block is None:
                continue
            lo, hi = max(first, b * E) - b * E, min(end, (b + 1) * E) - b * E
            x, y = self._rc_entry_bytes(lo, hi)
            if not any(block[x:y]):
                continue
            for i in range(hi - 1, lo - 1, -1):
                if self._rc_get_in(block, i):
                    found = b * E + i
                    break
        return found

    def _punch_clusters(self, clusters: list[int]) -> None:
        """Give back the space of freed clusters."""
        cs = self.cluster_size
        clusters = sorted(clusters)
        i = 0
        while i < len(clusters):
            j = i + 1
            while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                j += 1
            try:
                punch_hole(self.fd, clusters[i] * cs, (j - i) * cs)
            except OSError:
                pass
            i = j

    def _free_later(self, entry: int) -> None:
        """Queue the refcount decrements for a dropped L2 entry."""
        cs = self.cluster_size
        if entry & OFLAG_COMPRESSED:
            offset = entry & self._coff_mask
            sectors = (entry >> self._cshift) & self._csec_mask
            stop = (offset & ~511) + (sectors + 1) * 512
            for c in range(offset // cs, (stop - 1) // cs + 1):
                self._pending_frees[c] += 1
        else:
            host = entry & L2E_OFFSET_MASK
            if host:
                self._pending_frees[host // cs] += 1

    def _drop_reference(self, entry: int, kept: int) -> None:
        """L2 entry `entry` was replaced by `kept`: queue the freeing of the
        clusters it named, unless `kept` names the same cluster."""
        if not entry & OFLAG_COMPRESSED:
            host = entry & L2E_OFFSET_MASK
            if not host or (not kept & OFLAG_COMPRESSED and kept & L2E_OFFSET_MASK == host):
                return
        self._free_later(entry)

    def _discard(self, clusters) -> None:
        """Queue for freeing clusters taken from the pool that no table
        points to: what a failed allocating write took."""
        for c in clusters:
            self._pending_frees[c] += 1

    def _apply_frees(self) -> None:
        """Lower the refcounts of dropped clusters, now that the tables that
        dropped them are durable: the frees queued so far are taken, the file
        is synced (without the lock), then they are applied. What fails stays
        queued."""
        if not self._pending_frees:
            return
        frees = self._pending_frees
        self._pending_frees = Counter()
        try:
            self._sync_unlocked()
        except BaseException:
            self._pending_frees.update(frees)
            raise
        deltas = {c: -n for c, n in frees.items()}
        try:
            self._punch_clusters(self._rc_change(deltas))
        finally:
            for c, delta in deltas.items():
                self._pending_frees[c] -= delta

    def _start_writing(self) -> None:
        """Before the first write: drop persistent bitmaps and clear the
        autoclear bits, durably, before any guest data changes. Other writers
        wait meanwhile; the lock is released while the header is synced."""
        while not self._write_started:
            if not self.writable:
                raise OSError(errno.EBADF, f"{self.path}: image is open read-only")
            if self._starting:
                self._cond.wait()
                continue
            self._starting = True
            try:
                if self.version >= 3 and (self.autoclear or
                                          any(t == EXT_BITMAPS for t, _ in self._extensions)):
                    self._drop_bitmaps()
                    self._header_unsynced = True
                if self._header_unsynced:
                    self._sync_unlocked()
                    self._header_unsynced = False
                self._write_started = True
            finally:
                self._starting = False
                self._cond.notify_all()

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
        cs = self.cluster_size
        bitmaps = [d for t, d in self._extensions if t == EXT_BITMAPS]
        kept = [(t, d) for t, d in self._extensions if t != EXT_BITMAPS]
        clusters: Counter = Counter()
        names = []
        for data in bitmaps if self.autoclear & AUTOCLEAR_BITMAPS else ():
            names += self._bitmap_clusters(data, clusters)
        for c, n in clusters.items():
            if self._refcount(c) < n:
                raise self._corrupt(f"cluster {c} of a persistent bitmap has refcount "
                                    f"{self._refcount(c)}, below its {n} reference(s)")
        # 1. the header: no autoclear bits, no bitmaps extension (synced by
        #    the caller before any guest data changes)
        exts = bytearray()
        for ext_type, data in kept:
            exts += struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
        exts += struct.pack(">II", EXT_END, 0)
        head = bytearray(_pread_exact(self.fd, self._header_length - 88, 88))
        head[0:8] = bytes(8)
        _pwrite(self.fd, head + exts, 88)
        self.autoclear = 0
        self._extensions = kept
        # 2. then the clusters the bitmaps used: freed after the next sync
        self._pending_frees.update(clusters)
        if names:
            log.warning("%s: removed persistent bitmap(s) %s: snapfs does not keep them "
                        "up to date", self.path, ", ".join(names))

    def _bitmap_clusters(self, data: bytes, clusters: Counter) -> list[str]:
        """Count the clusters of the bitmaps of a bitmaps extension (checked
        when the image was opened) into `clusters`: the directory, the
        bitmap tables and their data. Returns the bitmaps' names."""
        cs = self.cluster_size
        count, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", data)
        directory = _pread_exact(self.fd, dir_size, dir_offset)
        for c in range(dir_offset // cs, (dir_offset + dir_size + cs - 1) // cs):
            clusters[c] += 1
        names = []
        pos = 0
        for _ in range(count):
            if pos + 24 > dir_size:
                raise self._corrupt("the bitmap directory is truncated")
            table_offset, table_size, _, _, _, name_size, extra_size = \
                struct.unpack_from(">QIIBBHI", directory, pos)
            name_at = pos + 24 + extra_size
            if name_at + name_size > dir_size:
                raise self._corrupt("the bitmap directory is truncated")
            names.append(_printable(directory[name_at:name_at + name_size].decode(
                "utf-8", "replace")))
            pos = name_at + name_size
            pos += -pos % 8
            if not table_size:
                continue
            if table_size > MAX_BITMAP_DIRECTORY_BYTES // 8:
                raise self._corrupt(f"bitmap table too large ({table_size} entries)")
            self._check_metadata_offset(table_offset, "bitmap table")
            self._check_metadata_offset(table_offset + (table_size * 8 - 1) // cs * cs,
                                        "bitmap table")
            for c in range(table_offset // cs, (table_offset + table_size * 8 + cs - 1) // cs):
                clusters[c] += 1
            table = _be_array(_pread_exact(self.fd, table_size * 8, table_offset))
            for entry in table:
                offset = entry & L2E_OFFSET_MASK
                if offset:
                    self._check_metadata_offset(offset, "bitmap data cluster")
                    clusters[offset // cs] += 1
        return names

    def _l2_for_write(self, l1_index: int) -> array.array:
        """The L2 table of an L1 entry, allocated if needed and writable in
        place (refcount 1)."""
        entry = self.l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if not offset:
            [(cluster, _)] = self._alloc(1)
            offset = cluster << self.cluster_bits
            entry = offset | OFLAG_COPIED
            table = array.array("Q", bytes(self.cluster_size))  # the pool cluster is zeroes
            try:
                self._write_l1_entry(l1_index, entry)
            except OSError:
                got = self._on_disk(self.l1_offset + l1_index * 8, 8)
                if got == entry.to_bytes(8, "big"):
                    self.l1[l1_index] = entry
                    self._l2_cache.put(offset, table)
                elif got is not None:
                    self._discard([cluster])
                raise
            self._l2_cache.put(offset, table)
            return table
        table = self._l2_table(l1_index)
        if not entry & OFLAG_COPIED:
            refcount = self._refcount(offset >> self.cluster_bits)
            if refcount != 1:
                raise OSError(errno.ENOTSUP, f"{self.path}: L2 table at {offset:#x} is shared "
                              f"(refcount {refcount}); cannot write")
            self._write_l1_entry(l1_index, entry | OFLAG_COPIED)
        return table

    # ------------------------------------------------------------------
    # guest I/O
    # ------------------------------------------------------------------

    def _read_compressed(self, entry: int) -> bytes:
        offset = entry & self._coff_mask
        sectors = (entry >> self._cshift) & self._csec_mask
        stop = (offset & ~511) + (sectors + 1) * 512
        raw = os.pread(self.fd, stop - offset, offset)
        try:
            # raw deflate (no zlib header), as QEMU writes it (window bits 12)
            data = zlib.decompressobj(-12).decompress(raw, self.cluster_size)
        except zlib.error as e:
            raise self._corrupt(f"compressed cluster at {offset:#x}: {e}") from None
        if len(data) != self.cluster_size:
            raise self._corrupt(f"compressed cluster at {offset:#x} is short")
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

    def _read_run(self, run: list, view: memoryview, offset: int) -> None:
        kind, start, stop, host, entry = run
        part = view[start - offset:stop - offset]
        if kind == DATA:
            _pread_into(self.fd, part, host)
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
                    runs = self._map(start, stop - start)
                if runs == [[COMPRESSED, start, stop, 0, entry]]:
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
            runs = self._map(offset, len(view))
            if (as_bytes and len(runs) == 1 and runs[0][0] == DATA and
                    (runs[0][4] & OFLAG_COPIED or not self.writable)):
                host = runs[0][3]
            else:
                host = None
                for run in runs:
                    # compressed and shared clusters can be freed by a concurrent
                    # rewrite of another part of them: read those under the lock
                    if self.writable and (run[0] == COMPRESSED or
                                          (run[0] == DATA and not run[4] & OFLAG_COPIED)):
                        self._read_run(run, view, offset)
                    else:
                        later.append(run)
        if host is not None:
            return _pread_exact(self.fd, len(view), host)
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

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if not len(view):
            return
        with self._lock:
            self._start_writing()
            runs = self._map(offset, len(view))
            if not all(r[0] == DATA and r[4] & OFLAG_COPIED for r in runs):
                self._write_locked(offset, view)
                return
        # all clusters are allocated and ours alone: no metadata to change
        for _, start, stop, host, _ in runs:
            _pwrite(self.fd, view[start - offset:stop - offset], host)

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
            return _pread_exact(self.fd, cs, host)
        start = cluster * cs
        if self.backing is None or start >= self.backing_size:
            return None if fresh else bytes(cs)
        buf = bytearray(cs)
        self._read_backing_into(memoryview(buf), start, min(start + cs, self.size))
        return buf

    def _write_locked(self, offset: int, view: memoryview) -> None:
        """A write that may need allocation or copy-on-write (under the lock,
        which a pool refill may release between L2 tables)."""
        bits = self.cluster_bits
        cs = self.cluster_size
        l2_bits = self.l2_bits
        zero_flag = self._zero_flag
        end = offset + len(view)
        c = offset >> bits
        last = (end - 1) >> bits
        while c <= last:
            l1_index = c >> l2_bits
            seg_last = min(last, ((l1_index + 1) << l2_bits) - 1)
            # enough clusters for every cluster and the L2 table, before the
            # table is looked at (this may release the lock)
            self._ensure_pool(seg_last - c + 1 + (not self.l1[l1_index] & L1E_OFFSET_MASK))
            table = self._l2_for_write(l1_index)
            base = l1_index << l2_bits

            # which clusters need a new host cluster
            clusters = []        # [cluster, entry, host, new?]
            needed = 0
            for cc in range(c, seg_last + 1):
                e = table[cc - base]
                host = e & L2E_OFFSET_MASK
                if not e & OFLAG_COMPRESSED and host and e & OFLAG_COPIED:
                    if host & (cs - 1):
                        raise self._corrupt(f"data cluster offset {host:#x} is not aligned")
                    clusters.append([cc, e, host, False])   # in place (maybe a zero cluster)
                else:
                    clusters.append([cc, e, 0, True])
                    needed += 1
            fresh = []
            if needed:
                fresh = [first + i for first, n in self._alloc(needed) for i in range(n)]
                taken = iter(fresh)
                for item in clusters:
                    if item[3]:
                        item[2] = next(taken) << bits
            try:
                self._write_data(offset, view, clusters)
            except BaseException:
                self._discard(fresh)     # nothing points to them: a failed write leaks nothing
                raise

            # then the L2 entries that point to it
            changes = [(cc - base, host | OFLAG_COPIED) for cc, e, host, new in clusters
                       if new or e & zero_flag]
            if changes:
                self._update_l2(l1_index, table, changes)
            c = seg_last + 1

    def _write_data(self, offset: int, view: memoryview, clusters: list) -> None:
        """Write the guest data of a write at `offset` into its host clusters
        ([cluster, entry, host offset, new?] for each), with the copy-on-write
        fill of partially written clusters that are new or were zero."""
        bits = self.cluster_bits
        cs = self.cluster_size
        zero_flag = self._zero_flag
        end = offset + len(view)
        # the data, with copy-on-write fills, as host pieces [start, end, parts]
        pieces: list = []
        for cc, e, host, new in clusters:
            cstart = cc << bits
            cend = min(cstart + cs, self.size)
            a = max(offset, cstart)
            b = min(end, cend)
            data = (a - offset, b - offset)
            zero_reuse = not new and e & zero_flag
            if not new and not zero_reuse:
                parts = [data]
                hstart = host + (a - cstart)
            elif a == cstart and b == cend:
                parts = [data]
                hstart = host
            else:
                old = self._fill(cc, e, fresh=new)
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
            _pwritev(self.fd, [view[p[0]:p[1]] if isinstance(p, tuple) else p
                               for p in parts], hstart)

    def _reads_as_zero(self, cluster: int) -> bool:
        """Whether a cluster certainly reads as zeroes (cheap checks only)."""
        table = self._l2_table(cluster >> self.l2_bits)
        e = 0 if table is None else table[cluster & (self.l2_entries - 1)]
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
        bits = self.cluster_bits
        cs = self.cluster_size
        l2_bits = self.l2_bits
        backing_clusters = -(-self.backing_size // cs) if self.backing is not None else 0
        c = first
        while c <= last:
            l1_index = c >> l2_bits
            seg_last = min(last, ((l1_index + 1) << l2_bits) - 1)
            base = l1_index << l2_bits
            if not self.l1[l1_index] & L1E_OFFSET_MASK:
                if c >= backing_clusters:
                    c = seg_last + 1      # unallocated and nothing below: reads as zeroes
                    continue
                self._ensure_pool(1)      # for the L2 table (may release the lock)
            table = self._l2_table(l1_index)
            changes = []         # (index in the table, new entry)
            punch = []
            for cc in range(c, seg_last + 1):
                e = 0 if table is None else table[cc - base]
                host = e & L2E_OFFSET_MASK
                if e & OFLAG_COMPRESSED:
                    changes.append((cc - base, OFLAG_ZERO))
                elif e & OFLAG_ZERO:
                    continue
                elif host and e & OFLAG_COPIED:
                    # keep the cluster preallocated, give its space back
                    changes.append((cc - base, host | OFLAG_COPIED | OFLAG_ZERO))
                    punch.append(host >> bits)
                elif host or cc < backing_clusters:
                    changes.append((cc - base, OFLAG_ZERO))
            if changes:
                table = self._l2_for_write(l1_index)
                self._update_l2(l1_index, table, changes)
                self._punch_clusters(punch)
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
            kind, start, stop, host, e = self._map(pos, min(step, end - pos))[0]
            if kind == DATA and e & OFLAG_COPIED:
                if not punch_hole(self.fd, host, stop - start):
                    _pwrite(self.fd, bytes(stop - start), host)
            elif kind != UNALLOC or (self.backing is not None and start < self.backing_size):
                self._write_locked(start, memoryview(bytes(stop - start)))
            pos = stop

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        end = min(offset + length, self.size)
        if offset >= end:
            return
        bits = self.cluster_bits
        l2_bits = self.l2_bits
        first = offset >> bits
        last = (end - 1) >> bits
        pending = None
        for l1_index in range(first >> l2_bits, (last >> l2_bits) + 1):
            base = l1_index << l2_bits
            lo = max(first, base) - base
            hi = min(last + 1, base + self.l2_entries) - base
            with self._lock:
                if self._follow and not self.l1[l1_index] & L1E_OFFSET_MASK:
                    self._l2_fresh(l1_index, lo, hi)
                l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
                if not l2_offset:
                    continue
                table = None if self._follow else self._l2_cache.lookup(l2_offset)
                if table is not None:
                    raw = table.tobytes()  # zero or not does not depend on byte order
                else:
                    self._check_metadata_offset(l2_offset, "L2 table")
                    raw = _pread_exact(self.fd, self.cluster_size, l2_offset)
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

    # ------------------------------------------------------------------
    # durability
    # ------------------------------------------------------------------

    def flush(self) -> None:
        if not self.writable:
            return
        with self._lock:
            if self.fd < 0:
                return
            self._apply_frees()     # syncs first if it has anything to do
            self._sync_unlocked()

    def close(self) -> None:
        with self._lock:
            if self.fd < 0:
                return
            while self._refilling or self._starting or self._syncs:
                self._cond.wait()
            try:
                if self.writable and self._write_started:
                    # give the unused pool back (nothing points to it) and cut
                    # the free clusters off the end of the file
                    for first, end in self._pool:
                        self._discard(range(first, end))
                    self._pool.clear()
                    self._pool_count = 0
                    self._apply_frees()
                    if self._grown:
                        self._trim_tail()
                    self._sync_unlocked()
            finally:
                os.close(self.fd)
                self.fd = -1
                if self.backing is not None:
                    self.backing.close()
                    self.backing = None

    def _trim_tail(self) -> None:
        """Truncate the file after its last cluster in use, if only free
        clusters (the released pool) follow it."""
        cs = self.cluster_size
        end = self._frontier
        if os.fstat(self.fd).st_size > end * cs:
            return           # something this driver did not put there: leave it
        lo = end
        last = None
        while lo > 0 and last is None:
            lo = max(0, lo - max(self._rb_entries, end - lo))
            last = self._last_used_in(lo, end)
        keep = 0 if last is None else last + 1
        if keep < end:
            os.ftruncate(self.fd, keep * cs)
            self._frontier = keep


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
