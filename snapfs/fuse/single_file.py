"""What the live and the snapshot mounts share: a root directory holding one
regular file, and the boundary where errors become FUSE error codes."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat

import pyfuse3

log = logging.getLogger(__name__)

FILE_INODE = pyfuse3.ROOT_INODE + 1
#: the attributes never change behind the kernel's back: let it cache them
ATTR_TIMEOUT = 300


def fuse_errors(handler):
    """Turn errors leaving a FUSE handler into FUSEError. Only FUSEError may
    leave a pyfuse3 handler: anything else would end the FUSE main loop."""

    @functools.wraps(handler)
    async def wrapper(*args):
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            log.warning("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class SingleFileOperations(pyfuse3.Operations):
    """A root directory with one regular file, `name`, of a fixed `size`."""

    def __init__(self, name: str, size: int, file_mode: int, owner: os.stat_result):
        super().__init__()
        self.name = name.encode()
        self.size = size
        self.file_mode = stat.S_IFREG | file_mode
        self.owner = owner

    # --- attributes -----------------------------------------------------

    def times(self) -> os.stat_result:
        """The stat result whose times the file reports."""
        return self.owner

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        times = self.times()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_uid = self.owner.st_uid
        attrs.st_gid = self.owner.st_gid
        attrs.st_atime_ns = times.st_atime_ns
        attrs.st_mtime_ns = times.st_mtime_ns
        attrs.st_ctime_ns = times.st_ctime_ns
        attrs.st_blksize = 4096
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
            attrs.st_size = 0
            attrs.st_blocks = 0
        else:
            attrs.st_mode = self.file_mode
            attrs.st_nlink = 1
            attrs.st_size = self.size
            attrs.st_blocks = -(-self.size // 512)
        return attrs

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == self.name:
            return self._attributes(FILE_INODE)
        if name in (b".", b".."):
            return self._attributes(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    # --- the directory --------------------------------------------------

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attributes(FILE_INODE), 1)

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = -(-self.size // 4096)
        data.f_bfree = data.f_bavail = 0
        data.f_files = 2
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # --- the file -------------------------------------------------------

    def check_open(self, inode: int, flags: int) -> None:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode, flags, ctx):
        self.check_open(inode, flags)
        # keep_cache: only this process changes the file, so the kernel's
        # page cache stays right across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

    def clip(self, offset: int, length: int) -> int:
        """How many of `length` bytes at `offset` lie inside the file."""
        return max(0, min(length, self.size - offset))
