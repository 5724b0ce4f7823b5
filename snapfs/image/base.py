"""The disk image interface that every format driver implements.

An image is a fixed-size array of bytes (the guest view). The rest of snapfs
only ever talks to images through this interface, so a new format (qcow2, say)
is one new class plus one entry (its module and class name) in
`snapfs.image.DRIVERS`.

All methods are synchronous and thread-safe for distinct byte ranges: the
background copy calls them from a worker thread while the FUSE handlers call
them from the trio thread.
"""

from __future__ import annotations

import abc
import os
from typing import Iterator


class Image(abc.ABC):
    """A disk image of a fixed size."""

    #: the guest-visible size in bytes
    size: int
    #: the path the image was opened from (the file may have been renamed
    #: or deleted since: use `fd`)
    path: str
    #: the open descriptor of the file that holds the image (its top layer)
    fd: int

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Return `length` bytes at `offset`; the range lies within the image."""

    def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes at `offset` (the range lies within the
        image). Drivers override this to read without an extra copy."""
        buffer[:] = self.read(offset, len(buffer))

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of `data` at `offset`; the range lies within the image."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeroes, without storing data where possible."""

    @abc.abstractmethod
    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Yield (start, end) byte ranges within [offset, offset+length) that
        hold data in the topmost layer of the image (its block status).

        Ranges outside them read as zeroes or come from a lower layer. A driver
        may report more than is allocated (never less): TOP copies what is
        reported."""

    def zero_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Ranges within those `data_extents` reports that surely read as
        zeroes (a format's zero clusters). A driver may report fewer."""
        return iter(())

    def clone_from(self, source: "Image", offset: int, length: int) -> bool:
        """Make bytes [offset, offset+length) read as `source`'s same bytes by
        sharing its extents (a reflink clone) instead of copying them; False,
        having changed nothing, where that cannot be done (another format, a
        file system that cannot share extents, another file system, ranges
        its blocks do not fit). I/O errors raise. Later writes to either
        image leave the other unchanged (the file system copies on write)."""
        return False

    def stat(self) -> os.stat_result:
        """The file's status (owner, permissions, times), from its descriptor."""
        return os.fstat(self.fd)

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the image; no other method may be called afterwards."""
