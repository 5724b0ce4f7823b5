"""The live mount: the source image as a writable file whose writes go
through copy-before-write. Its root directory also carries the control
interface (extended attributes, see snapfs.control)."""

from __future__ import annotations

import errno
import json
import os
from typing import Callable

import pyfuse3
import trio

from snapfs import control
from snapfs.backup.cbw import CopyBeforeWrite
from snapfs.fuse.single_file import SingleFileOperations

_STATUS = control.STATUS_XATTR.encode()  # pyfuse3 passes attribute names as bytes
_COMMAND = control.COMMAND_XATTR.encode()


class LiveOperations(SingleFileOperations):
    """The disk's size is fixed: size changes fail with EPERM, except that an
    open with O_TRUNC (dd of=FILE without conv=notrunc) is accepted and keeps
    size and data, as qemu-storage-daemon's FUSE export does. pyfuse3 has no
    fallocate handler, so the kernel refuses fallocate with EOPNOTSUPP."""

    def __init__(self, name: str, engine: CopyBeforeWrite,
                 status: Callable[[], dict], command: Callable[[str], None]):
        super().__init__(name, engine.size, engine.source.stat, writable=True)
        self.engine = engine
        self.status = status
        self.command = command

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
        await trio.to_thread.run_sync(self.engine.flush)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # the disk's size is fixed
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_atime or fields.update_mtime:
            now = self.engine.source.stat()
            atime = attr.st_atime_ns if fields.update_atime else now.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns
            os.utime(self.engine.source.fd, ns=(atime, mtime))
        return await self.getattr(inode, ctx)

    # --- control --------------------------------------------------------

    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == _STATUS:
            return json.dumps(self.status()).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return [_STATUS] if inode == pyfuse3.ROOT_INODE else []

    async def setxattr(self, inode, name, value, ctx):
        if inode != pyfuse3.ROOT_INODE or name != _COMMAND:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        command = value.decode(errors="replace")
        if command not in control.COMMANDS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        self.command(command)
