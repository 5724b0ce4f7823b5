"""Raw images: the file's bytes are the guest view."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterator

from snapfs.image import Image

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


class RawImage(Image):
    def __init__(self, path: str, fd: int, size: int):
        self.path = path
        self.fd = fd
        self.size = size

    @classmethod
    def open(cls, path: str, writable: bool = False) -> "RawImage":
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size)

    @classmethod
    def create(cls, path: str, size: int, overwrite: bool = False) -> "RawImage":
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_TRUNC if overwrite else os.O_EXCL
        fd = os.open(path, flags, 0o644)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a short read only happens at EOF or on a signal
            data += self._read_rest(offset + len(data), length - len(data))
        return data

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
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done

    def write_zeroes(self, offset: int, length: int) -> None:
        if not punch_hole(self.fd, offset, length):
            for start in range(offset, offset + length, 1 << 20):
                self.write(start, bytes(min(1 << 20, offset + length - start)))

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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
