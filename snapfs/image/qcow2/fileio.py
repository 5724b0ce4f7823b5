"""The image file as every part of the driver uses it: positional reads and
writes that do all they are asked, big-endian tables, and `ImageFile` (the
descriptor with the metadata lock, syncing without the lock, and the checks
on offsets read from tables).

System calls are made through the `os` module at call time (`os.pwrite`,
`os.fdatasync`...): the tests replace them there to crash, fail or block the
driver at a chosen call.
"""

from __future__ import annotations

import array
import errno
import os
import sys
import threading

_BIG = sys.byteorder == "big"
_IOV_MAX = 1024
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    pass


def be_array(raw: bytes) -> array.array:
    """An array of unsigned 64-bit ints from big-endian bytes."""
    arr = array.array("Q")
    arr.frombytes(raw)
    if not _BIG:
        arr.byteswap()
    return arr


def be_bytes(arr: array.array) -> bytes:
    """The big-endian bytes of an array of unsigned 64-bit ints."""
    if not _BIG:
        arr = array.array("Q", arr)
        arr.byteswap()
    return arr.tobytes()


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset`; past the end of the file with
    zeroes."""
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            view[:] = bytes(len(view))
            return
        view = view[n:]
        offset += n


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes of the file at `offset`; past its end, zeroes."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    buf = bytearray(length)
    view = memoryview(buf)
    view[:len(data)] = data
    pread_into(fd, view[len(data):], offset + len(data))
    return bytes(buf)


def pwritev(fd: int, bufs: list, offset: int) -> None:
    """Write all buffers, in order, at `offset`."""
    bufs = [memoryview(b) for b in bufs if len(b)]
    bufs = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in bufs]
    i = 0
    while i < len(bufs):
        chunk = bufs[i:i + _IOV_MAX]
        n = os.pwritev(fd, chunk, offset)
        offset += n
        while n:
            if n >= len(bufs[i]):
                n -= len(bufs[i])
                i += 1
            else:
                bufs[i] = bufs[i][n:]
                n = 0


def pwrite(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset`."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def fsync_dir(path: str) -> None:
    """Make a new file's directory entry durable (best effort)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ImageFile:
    """One open qcow2 file: its descriptor, the lock that protects all of
    its metadata in memory, and what the parts of the driver share about it.

    `lock` is held by whoever reads or changes metadata; `cond` (on the same
    lock) lets a thread wait for another's pool refill or first-write
    preparation. The lock is never held during a sync: see `sync_unlocked`
    and "Threads" in the package docstring."""

    def __init__(self, fd: int, path: str, cluster_bits: int, file_size: int,
                 writable: bool = False):
        self.fd = fd
        self.path = path
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.syncs = 0          # threads syncing without the lock
        self._known_size = file_size    # at most the file's size: it only grows
        # writable images: {cluster: what} for the clusters that hold metadata
        # (the header, the L1 and refcount tables, L2 tables, refcount blocks),
        # as QEMU's overlap checks: a table entry that would make the driver
        # write guest data or other metadata there, or free it, is EIO
        self.metadata: dict[int, str] | None = {0: "header"} if writable else None

    def corrupt(self, what: str) -> OSError:
        """The error for metadata that cannot be right (EIO)."""
        return OSError(errno.EIO, f"{self.path}: corrupt qcow2 image: {what}")

    def check_metadata_offset(self, offset: int, what: str) -> None:
        """Refuse (EIO) a table or block offset that a table entry gives and
        that cannot be right: not cluster aligned, or past the end of the
        file (the check that keeps a bogus entry from becoming a read or
        write at an absurd offset). Only looks at the file when the offset
        is past the size seen last: the file only grows."""
        if offset & (self.cluster_size - 1):
            raise self.corrupt(f"{what} offset {offset:#x} is not cluster aligned")
        if offset >= self._known_size:
            self._known_size = os.lseek(self.fd, 0, os.SEEK_END)
            if offset >= self._known_size:
                raise self.corrupt(f"{what} offset {offset:#x} lies past the end of the file")

    @property
    def known_size(self) -> int:
        """A size the file has at least (it only grows)."""
        return self._known_size

    def check_inside(self, offset: int, what: str) -> None:
        """Refuse (EIO) data that an entry places past the end of the file."""
        if offset >= self._known_size:
            self._known_size = os.lseek(self.fd, 0, os.SEEK_END)
            if offset >= self._known_size:
                raise self.corrupt(f"{what} offset {offset:#x} lies past the end of the file")

    def register(self, offset: int, length: int, what: str) -> None:
        """Note clusters holding metadata (writable images). A cluster that
        two structures claim is noted as overlapping: neither is used."""
        if self.metadata is None:
            return
        bits = self.cluster_bits
        for c in range(offset >> bits, ((offset + max(length, 1) - 1) >> bits) + 1):
            self.metadata[c] = "overlapping metadata" if c in self.metadata else what

    def unregister(self, offset: int, length: int) -> None:
        if self.metadata is None:
            return
        bits = self.cluster_bits
        for c in range(offset >> bits, ((offset + max(length, 1) - 1) >> bits) + 1):
            self.metadata.pop(c, None)

    def check_metadata_cluster(self, offset: int, what: str) -> None:
        """Refuse (EIO) to use the cluster at `offset` as the `what` (an L2
        table, a refcount block) when it is not noted as one: an entry that
        points to other metadata, or past the end of the file as it was
        when opened."""
        if self.metadata is not None:
            found = self.metadata.get(offset >> self.cluster_bits)
            if found != what:
                raise self.corrupt(f"{what} offset {offset:#x} points to "
                                   f"{found or 'a cluster that is no ' + what}")

    def check_data_clusters(self, first: int, count: int, what: str) -> None:
        """Refuse (EIO) to write guest data into, or free, clusters
        [first, first + count) if one holds metadata or lies past the end of
        the file."""
        metadata = self.metadata
        if metadata is not None:
            for c in range(first, first + count):
                if c in metadata:
                    raise self.corrupt(f"{what} at {c << self.cluster_bits:#x} is "
                                       f"the {metadata[c]}")
        self.check_inside((first + count - 1) << self.cluster_bits, what)

    def on_disk(self, offset: int, length: int) -> bytes | None:
        """The bytes of the file at `offset`, or None if they cannot be read:
        after a failed metadata write, what reached the file."""
        try:
            return pread_exact(self.fd, length, offset)
        except OSError:
            return None

    def sync_unlocked(self) -> None:
        """fdatasync the file with the lock released (the caller holds it,
        and has it again when this returns or raises): no request waits for
        the disk because another one syncs. Whatever the caller read under
        the lock before may have changed when this returns."""
        self.syncs += 1
        self.lock.release()
        try:
            os.fdatasync(self.fd)
        finally:
            self.lock.acquire()
            self.syncs -= 1
            if not self.syncs:
                self.cond.notify_all()
