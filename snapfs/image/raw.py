"""Raw images: the file's bytes are the guest view."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading
from typing import Iterator

from snapfs.image.base import Image

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range of a file, keeping its size. False if the file
    system cannot do it."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


#: ioctl FICLONERANGE: share a range of another file's extents (struct
#: file_clone_range {s64 src_fd; u64 src_offset, src_length, dest_offset})
FICLONERANGE = 0x4020940D
#: what FICLONERANGE fails with where it cannot share the extents: a file
#: system without reflink (EOPNOTSUPP, ENOTTY), two file systems (EXDEV),
#: ranges the file system's blocks do not fit (EINVAL)
_CLONE_UNSUPPORTED = frozenset((errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS,
                                errno.EXDEV, errno.EINVAL))


#: O_DIRECT needs offsets, lengths and buffer addresses aligned to this
DIRECT_ALIGN = 4096
#: reads and writes at least this large bypass the page cache (O_DIRECT) when
#: they can; smaller ones go through it: for them, waiting for the device costs
#: more than the cache does (4 KiB random first-writes, which copy one 64 KiB
#: cluster each, ran about twice as fast buffered)
DIRECT_MIN = 256 << 10


def _is_aligned(view: memoryview) -> bool:
    """Whether the buffer's address suits O_DIRECT."""
    if view.readonly or not len(view):
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


class RawImage(Image):
    """A raw image file.

    Large copies bypass the page cache, because filling fresh page cache costs
    this kind of machine more than the I/O itself: `readinto` (the copies'
    read of old data) reads large aligned blocks with O_DIRECT, and an image
    made with `create` (a backup target, which nobody reads back soon) writes
    them with O_DIRECT. Everything else goes through the page cache. The
    kernel keeps the two coherent (a direct read writes back dirty cached
    pages of its range first)."""

    def __init__(self, path: str, fd: int, size: int, direct_fd: int = -1,
                 direct_writes: bool = False):
        self.path = path
        self.fd = fd
        self.size = size
        self._direct_fd = direct_fd
        self._direct_writes = direct_writes and direct_fd >= 0
        self._bounce = threading.local()  # an aligned buffer per writing thread

    @staticmethod
    def _open_direct(path: str, writable: bool) -> int:
        try:
            return os.open(path, (os.O_RDWR if writable else os.O_RDONLY)
                           | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:  # a file system without O_DIRECT (tmpfs): buffered only
            return -1

    @classmethod
    def open(cls, path: str, writable: bool = False) -> "RawImage":
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, cls._open_direct(path, False))

    @classmethod
    def from_fd(cls, path: str, fd: int) -> "RawImage":
        """The raw image open read-only on `fd` (taken over: closed with the
        image), named `path` in messages; the file is never opened by name
        again, so a file renamed over `path` meanwhile changes nothing."""
        size = os.lseek(fd, 0, os.SEEK_END)
        return cls(path, fd, size, cls._open_direct(f"/proc/self/fd/{fd}", False))

    @classmethod
    def create(cls, path: str, size: int, overwrite: bool = False) -> "RawImage":
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_TRUNC if overwrite else os.O_EXCL
        fd = os.open(path, flags, 0o644)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, fd, size, cls._open_direct(path, True), direct_writes=True)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a short read only happens at EOF or on a signal
            data += self._read_rest(offset + len(data), length - len(data))
        return data

    def readinto(self, offset: int, buffer: memoryview) -> None:
        fd = self.fd
        if (self._direct_fd >= 0 and len(buffer) >= DIRECT_MIN
                and not (offset | len(buffer)) % DIRECT_ALIGN and _is_aligned(buffer)):
            fd = self._direct_fd
        while buffer:
            done = os.preadv(fd, [buffer], offset)
            if done == 0:  # the file shrank under us: treat the rest as zeroes
                buffer[:] = bytes(len(buffer))
                return
            buffer = buffer[done:]
            offset += done

    def _read_rest(self, offset: int, length: int) -> bytes:
        parts = []
        while length:
            chunk = os.pread(self.fd, length, offset)
            if not chunk:  # the file shrank under us: treat the rest as zeroes
                chunk = bytes(length)
            parts.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(parts)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if (self._direct_writes and len(data) >= DIRECT_MIN
                and not (offset | len(data)) % DIRECT_ALIGN):
            self._write_direct(offset, data)
            return
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done

    def _write_direct(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if not _is_aligned(view):  # copy into an aligned buffer of this thread
            buffer = getattr(self._bounce, "buffer", None)
            if buffer is None or len(buffer) < len(data):
                buffer = self._bounce.buffer = mmap.mmap(-1, len(data))
            view = memoryview(buffer)[:len(data)]
            view[:] = data
        while view:
            done = os.pwritev(self._direct_fd, [view], offset)
            view = view[done:]
            offset += done

    def write_zeroes(self, offset: int, length: int) -> None:
        if not punch_hole(self.fd, offset, length):
            for start in range(offset, offset + length, 1 << 20):
                self.write(start, bytes(min(1 << 20, offset + length - start)))

    def clone_from(self, source: Image, offset: int, length: int) -> bool:
        """Clone with FICLONERANGE, when `source` is a raw file on the same
        file system as this one and the range fits its blocks: offset and
        length multiples of the block size, except a range that ends at the
        end of both files. The kernel writes back the source's dirty pages
        of the range first."""
        if type(source) is not RawImage or not length:
            return False
        end = offset + length
        if end > self.size or end > source.size:
            return False
        try:
            block = os.fstatvfs(self.fd).f_bsize
            if offset % block or (length % block and not end == self.size == source.size):
                return False
            fcntl.ioctl(self.fd, FICLONERANGE,
                        struct.pack("qQQQ", source.fd, offset, length, offset))
        except OSError as e:
            if e.errno in _CLONE_UNSUPPORTED:
                return False
            raise
        return True

    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    return
                if e.errno == errno.EINVAL:  # file system without SEEK_DATA: all data
                    yield pos, end
                    return
                raise
            if start >= end:
                return
            stop = min(os.lseek(self.fd, start, os.SEEK_HOLE), end)
            yield start, stop
            pos = stop

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        for fd in (self.fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._direct_fd = -1
