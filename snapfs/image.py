"""The disk image interface that every format driver implements.

An image is a fixed-size array of bytes (the guest view). The rest of snapfs
only ever talks to images through this interface, so a new format (qcow2, say)
is one new class plus one entry in `open_image` / `create_image`.

All methods are synchronous and thread-safe for distinct byte ranges: the
background copy calls them from a worker thread while the FUSE handlers call
them from the trio thread.
"""

from __future__ import annotations

import abc
from typing import Iterator


class Image(abc.ABC):
    """A disk image of a fixed size."""

    #: the guest-visible size in bytes
    size: int
    #: the path the image was opened from
    path: str

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

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the image; no other method may be called afterwards."""


FORMATS = ("raw", "qcow2")


def _driver(fmt: str):
    if fmt == "raw":
        from snapfs.raw import RawImage

        return RawImage
    if fmt == "qcow2":
        from snapfs.qcow2 import Qcow2Image

        return Qcow2Image
    raise ValueError(f"unknown image format {fmt!r}")


def open_image(path: str, fmt: str = "raw", writable: bool = False) -> Image:
    """Open an existing image of format `fmt`."""
    return _driver(fmt).open(path, writable=writable)


def create_image(path: str, size: int, fmt: str = "raw", overwrite: bool = False,
                 cluster_size: int = 65536, backing_file: str | None = None,
                 backing_format: str | None = None) -> Image:
    """Create a new image of `size` bytes, open for writing. Where it has no
    backing file it reads as zeroes; a qcow2 image may have one (`backing_file`
    as it is to be stored, relative to `path`'s directory, and its format)."""
    if fmt == "raw":
        if backing_file is not None:
            raise ValueError("a raw image has no backing file")
        return _driver(fmt).create(path, size, overwrite=overwrite)
    return _driver(fmt).create(path, size, cluster_size=cluster_size, backing_file=backing_file,
                               backing_format=backing_format, overwrite=overwrite)
