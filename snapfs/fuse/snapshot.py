"""The snapshot mount: the point-in-time image as a read-only file.

The mount itself is read-only (the kernel refuses writes, chmod and unlink
with EROFS before they reach us); the handlers refuse them too. Since the
contents never change, the kernel may keep its page cache across opens.
"""

from __future__ import annotations

import errno
import os

import pyfuse3

from snapfs.fuse.single_file import SingleFileOperations
from snapfs.backup.reader import SnapshotReader


class SnapshotOperations(SingleFileOperations):
    def __init__(self, name: str, reader: SnapshotReader, times, root_is_file: bool = False,
                 uncached: bool = False):
        """`times`: SOURCE's times at the point in time (st_atime_ns, ...);
        owner and permissions (minus write) follow SOURCE's current ones.
        `uncached`: the kernel keeps no pages of the file (direct I/O), so
        that every read reaches `reader` (a snapshot that may break: from the
        break on, every read must fail)."""
        super().__init__(name, reader.size, reader.source.stat, writable=False, times=times,
                         root_is_file=root_is_file)
        self.reader = reader
        self.uncached = uncached

    async def open(self, inode, flags, ctx):
        self.check_open(inode, flags)
        if self.uncached:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        # keep_cache: the snapshot never changes, so the kernel's page cache
        # stays right across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def check_open(self, inode, flags):
        super().check_open(inode, flags)
        if self.reader.copymap.broken:
            raise pyfuse3.FUSEError(errno.EIO)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)

    async def read(self, fh, off, size):
        return self.reader.read(off, size)

    async def write(self, fh, off, buf):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setattr(self, inode, attr, fields, fh, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def fsync(self, fh, datasync):
        pass
