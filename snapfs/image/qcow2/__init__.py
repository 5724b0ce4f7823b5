"""qcow2 images (versions 2 and 3), written from QEMU's format specification
(docs/interop/qcow2.rst).

The driver is split by concern, as QEMU's is (block/qcow2.c,
qcow2-cluster.c, qcow2-refcount.c):

- `header`: the on-disk constants; reading and checking the header and its
  extensions, encoding extensions;
- `mapping`: the L1 and L2 tables: what a guest range maps to (`Run`s),
  changing L2 entries, block status;
- `refcount`: refcounts, the reserved pool that allocation takes clusters
  from, deferred frees;
- `bitmaps`: finding the clusters of persistent bitmaps (dropped at the
  first write);
- `create`: laying out a new image file;
- `fileio`: positional I/O, big-endian tables, and `ImageFile` (the
  descriptor with the metadata lock and syncing without it);
- `cache`: the bounded cache of L2 tables and refcount blocks;
- `image`: `Qcow2Image`, the `Image` interface over all of them, and the
  backing chain.

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
`fdatasync` (`ImageFile.sync_unlocked`), so other requests go on meanwhile.
The ordering rules above still hold, because a sync only has to cover writes
that completed before it started, and each rule is kept by what is done
under the lock before and after the sync:

- Frees (rule 4): `flush` and `close` take the queued frees under the lock,
  sync without it, then lower those refcounts under it. A free is queued only
  after the write that dropped the reference has completed, so the sync
  covers that write; frees queued during the sync wait for the next flush.
- The pool (rule 1): a refill, under the lock, writes the new refcount blocks
  (and table) and raises the refcounts of a run of clusters past the end of
  the file (no second refill starts meanwhile, so nothing else takes the
  run); it syncs without the lock; under the lock it points the refcount
  table (or the header) at the new blocks (or table), and syncs again
  without it; only then, under the lock, does the run join the pool.
  Allocation takes clusters from the pool alone, so no table ever points to
  a cluster whose refcount raise is not yet durable: a writer that finds the
  pool too small while a refill is in progress waits for it
  (`Refcounts.refilling`) rather than taking from the run being refilled or
  starting a second refill. Writers that the pool already covers do not
  wait.
- Only the refilling thread changes the refcount table, the frontier and the
  file's size while it syncs, so what it computed before a sync still holds
  after it. Other threads' refcount changes (frees) go into the same cached
  refcount blocks, written through under the lock, so they and the refill's
  raises never undo each other.
- A writer makes sure the pool holds enough for an L2 table's worth of its
  write (`Refcounts.ensure_pool`, which may wait or release the lock) before
  it looks that L2 table up, and then allocates and writes its data and L2
  entries without releasing the lock. So no writer acts on a mapping read
  before a sync, and two writers into one unallocated cluster never both
  allocate it.
- The first write's header rewrite (dropping bitmaps, clearing autoclear
  bits) is synced before any guest data changes: other writers wait for it
  (`Qcow2Image._starting`); readers do not.
- `close` (which must not run concurrently with other calls anyway) waits
  for refills, first-write preparations and syncs in progress.
"""

from snapfs.image.qcow2.image import Qcow2Image

__all__ = ["Qcow2Image"]
