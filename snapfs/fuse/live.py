"""The live mount: the source image as a writable file whose writes go
through copy-before-write."""

from __future__ import annotations

import errno
import os

import pyfuse3

from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.fuse.single_file import SingleFileOperations


class LiveOperations(SingleFileOperations):
    """The disk's size is fixed: size changes fail with EPERM, except that an
    open with O_TRUNC (dd of=FILE without conv=notrunc) is accepted and keeps
    size and data, as qemu-storage-daemon's FUSE export does. pyfuse3 has no
    fallocate handler, so the kernel refuses fallocate with EOPNOTSUPP."""

    def __init__(self, name: str, engine: CopyBeforeWrite, root_is_file: bool = False):
        super().__init__(name, engine.size, engine.source.stat, writable=True,
                         root_is_file=root_is_file)
        self.engine = engine

    async def open(self, inode, flags, ctx):
        self.check_open(inode, flags)
        # direct_io: requests reach us as the caller made them (up to 1 MiB)
        # instead of through the kernel's page cache of this file, which would
        # cost a copy and, for every write, a getxattr("security.capability")
        # round trip. Reads are still served from SOURCE's page cache.
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return self.engine.source.read(off, self.clip(off, size))

    async def write(self, fh, off, buf):
        if not buf:
            return 0
        length = self.clip(off, len(buf))
        if length == 0:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # at or past the end of the disk
        await self.engine.write(off, buf if length == len(buf) else buf[:length])
        return length

    async def fsync(self, fh, datasync):
        await self.engine.flush()

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode != self.file_inode:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # the disk's size is fixed
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_atime or fields.update_mtime:
            if self.engine.tracker is not None:
                self.engine.tracker.touched()
            now = self.engine.source.stat()
            atime = attr.st_atime_ns if fields.update_atime else now.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns
            os.utime(self.engine.source.fd, ns=(atime, mtime))
        return await self.getattr(inode, ctx)
