"""What the live and the snapshot mounts share: a root directory holding one
regular file that stands for a disk image, or, for a mount on a regular file,
that file itself as the root.

The file reports its image's owner and permission bits (the snapshot's
without write), read from the image's open descriptor: renaming or deleting
the image file while it is mounted changes nothing here. Both mounts use
`default_permissions`, so the kernel checks access against these attributes
for every user, as it does for the image file itself.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable

import pyfuse3

from snapfs.fuse.boundary import ErrorBoundary

#: the file's inode when the mount point is a directory
FILE_INODE = pyfuse3.ROOT_INODE + 1
#: how long the kernel may cache attributes and names: short, so that a
#: chmod or chown of the image reaches the mounts' permission checks soon
ATTR_TIMEOUT = 1.0
_WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


class SingleFileOperations(ErrorBoundary):
    """A root directory with one regular file, `name`, of a fixed `size`; or,
    with `root_is_file`, that file as the root (a mount on a regular file).

    `image_stat` returns the image file's current status (owner and
    permissions come from it); `times`, if given, is a fixed status whose
    times the file reports instead of the current ones."""

    def __init__(self, name: str, size: int, image_stat: Callable[[], os.stat_result],
                 writable: bool, times: os.stat_result | None = None,
                 root_is_file: bool = False):
        super().__init__()
        self.file_inode = pyfuse3.ROOT_INODE if root_is_file else FILE_INODE
        self.name = os.fsencode(name)
        self.size = size
        self.image_stat = image_stat
        self.writable = writable
        self.fixed_times = times

    # --- attributes -----------------------------------------------------

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        image = self.image_stat()
        times = self.fixed_times or image
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_uid = image.st_uid
        attrs.st_gid = image.st_gid
        attrs.st_atime_ns = times.st_atime_ns
        attrs.st_mtime_ns = times.st_mtime_ns
        attrs.st_ctime_ns = times.st_ctime_ns
        attrs.st_blksize = 4096
        if inode != self.file_inode:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
            attrs.st_size = 0
            attrs.st_blocks = 0
        else:
            mode = stat.S_IMODE(image.st_mode) & 0o777
            attrs.st_mode = stat.S_IFREG | (mode if self.writable else mode & ~_WRITE_BITS)
            attrs.st_nlink = 1
            attrs.st_size = self.size
            attrs.st_blocks = -(-self.size // 512)
        return attrs

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, self.file_inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or self.file_inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == self.name:
            return self._attributes(FILE_INODE)
        if name in (b".", b".."):
            return self._attributes(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    # --- the directory --------------------------------------------------

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE or self.file_inode == pyfuse3.ROOT_INODE:
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
        if inode == self.file_inode:
            return
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
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
