"""The copy map: which clusters a snapshot's backup target holds.

A `ClusterBitmap` file (backup/bitmap.py) beside the target, TARGET.snapfs.
Bit i set means cluster i of the point-in-time image is in the target, and the
target's bytes for it are final. Its header records the snapshot (paths, sync
mode, a random id) and how its job ended.

The live process and the snapshot's process map the file with MAP_SHARED: the
live process is the only writer (and sets bits from its trio thread only);
the snapshot's process maps it read-only. A bit is set only after the
cluster's data has been written to the target, and never cleared while the
snapshot lives; docs/design.md explains why that lets the snapshot's process
read without locks.

The last byte of the header says whether the snapshot is broken (its old data
could not be saved and its policy is break-snapshot). The live process sets it
before it lets through the write whose old data was lost, and the snapshot's
process looks at it after every read, by the same ordering argument as the
bits: a read that may have seen that write's data fails.
"""

from __future__ import annotations

from snapfs.backup.bitmap import ClusterBitmap


class CopyMap(ClusterBitmap):
    MAGIC = b"SNAPFS-COPYMAP\n"
    KIND = "copy map"

    #: bit mask of the clusters [c0, c1): bit i set if cluster c0+i is copied
    copied = ClusterBitmap.get
    #: record clusters [c0, c1) as copied: only after their data is in the target
    mark = ClusterBitmap.set
    next_uncopied = ClusterBitmap.next_clear
    next_copied = ClusterBitmap.next_set

    @property
    def broken(self) -> bool:
        return self._mm[self._base - 1] != 0

    def mark_broken(self) -> None:
        """From now on, every read of the snapshot fails (never cleared)."""
        self._mm[self._base - 1] = 1
