"""A file of one bit per cluster, mapped into memory: what the copy maps and
the change tracking are made of.

The file is a header (a magic line naming what kind of bitmap it is, the
header's size as 16 hex digits and a newline, then a JSON description padded
with NULs to a multiple of 4 KiB, with at least `HEADER_SLACK` bytes to spare
for what is added later; its last byte is a flag that `write_info` leaves
alone, see CopyMap.broken) followed by the bitmap, least significant bit first.
The header grows with the paths it records, so any path the file system
accepts fits. The blocks are allocated at creation, so that a store into the
mapping can never hit a full file system (that would be SIGBUS).
"""

from __future__ import annotations

import json
import mmap
import os
import re

_SIZE_FIELD = 17  # 16 hex digits and a newline
#: room in the header for what `write_info` adds after creation (the job's
#: state, figures and error, which `BackupJob` keeps short)
HEADER_SLACK = 4096
_PAGE = 4096

_NOT_ALL_SET = re.compile(rb"[^\xff]")
_NOT_ALL_CLEAR = re.compile(rb"[^\x00]")


class ClusterBitmap:
    #: the file's first line; each kind of bitmap file has its own
    MAGIC = b"SNAPFS-BITMAP\n"
    KIND = "cluster bitmap"

    def __init__(self, path: str, fd: int, mm: mmap.mmap, info: dict, header_size: int):
        self.path = path
        self._fd = fd
        self._mm = mm
        self._base = header_size  # where the bitmap starts
        self.info = info
        self.size: int = info["size"]
        self.cluster_size: int = info["cluster_size"]
        self.clusters: int = -(-self.size // self.cluster_size)

    @classmethod
    def create(cls, path: str, size: int, cluster_size: int, info: dict,
               overwrite: bool = False) -> "ClusterBitmap":
        info = dict(info, size=size, cluster_size=cluster_size)
        clusters = -(-size // cluster_size)
        needed = len(cls.MAGIC) + _SIZE_FIELD + len(_encode(info)) + HEADER_SLACK
        header_size = -(-needed // _PAGE) * _PAGE
        flags = (os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                 | (os.O_TRUNC if overwrite else os.O_EXCL))
        fd = os.open(path, flags, 0o644)
        try:
            # Allocate the blocks now: a store into a mapped page that the
            # file system cannot back (it is full) kills the process (SIGBUS).
            os.posix_fallocate(fd, 0, header_size + -(-clusters // 8))
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            copymap = cls(path, fd, mm, info, header_size)
            copymap.write_info()
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return copymap

    @classmethod
    def open(cls, path: str, writable: bool = False, follow: bool = False) -> "ClusterBitmap":
        """Open an existing bitmap file, read-only unless `writable` (to go
        on filling it after a restart). A symbolic link is refused unless
        `follow` (for /proc/self/fd/N, the descriptors a process inherited)."""
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
                     | (0 if follow else os.O_NOFOLLOW))
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, prot)
            try:
                magic = cls.MAGIC
                if mm[:len(magic)] != magic:
                    raise ValueError
                start = len(magic) + _SIZE_FIELD
                header_size = int(mm[len(magic):start], 16)
                info = json.loads(mm[start:header_size - 1].rstrip(b"\0"))
                clusters = -(-info["size"] // info["cluster_size"])
                if len(mm) < header_size + -(-clusters // 8):
                    raise ValueError
            except (ValueError, KeyError, TypeError, ZeroDivisionError):
                mm.close()
                raise ValueError(f"{path}: not a snapfs {cls.KIND}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, info, header_size)

    @property
    def fd(self) -> int:
        return self._fd

    def write_info(self, **changes) -> None:
        """Update the JSON description in the header."""
        info = dict(self.info, **changes)
        header = self.MAGIC + b"%016x\n" % self._base + _encode(info)
        room = self._base - 1  # the last byte is the flag
        if len(header) > room:
            raise ValueError(f"{self.KIND} header too large")  # a bug: HEADER_SLACK too small
        self._mm[:room] = header.ljust(room, b"\0")
        self.info = info

    def get(self, c0: int, c1: int) -> int:
        """Bit mask of the clusters [c0, c1): bit i set if cluster c0+i's is."""
        mm, base = self._mm, self._base
        value = int.from_bytes(mm[base + (c0 >> 3):base + ((c1 + 7) >> 3)], "little")
        return (value >> (c0 & 7)) & ((1 << (c1 - c0)) - 1)

    def set(self, c0: int, c1: int) -> None:
        """Set the bits of clusters [c0, c1)."""
        mm, base = self._mm, self._base
        while c0 < c1 and c0 & 7:
            mm[base + (c0 >> 3)] |= 1 << (c0 & 7)
            c0 += 1
        whole_end = c1 & ~7
        if c0 < whole_end:
            mm[base + (c0 >> 3):base + (whole_end >> 3)] = b"\xff" * ((whole_end - c0) >> 3)
            c0 = whole_end
        while c0 < c1:
            mm[base + (c0 >> 3)] |= 1 << (c0 & 7)
            c0 += 1

    def clear(self, c: int) -> None:
        """Clear the bit of cluster `c`."""
        self._mm[self._base + (c >> 3)] &= ~(1 << (c & 7)) & 0xFF

    def next_clear(self, c: int, end: int) -> int:
        """The first cluster in [c, end) whose bit is clear, or `end`."""
        return self._next(c, end, want_set=False)

    def next_set(self, c: int, end: int) -> int:
        """The first cluster in [c, end) whose bit is set, or `end`."""
        return self._next(c, end, want_set=True)

    def set_runs(self, c0: int = 0, c1: int | None = None):
        """Yield the runs (first, end) of set bits in [c0, c1)."""
        c1 = self.clusters if c1 is None else c1
        first = self.next_set(c0, c1)
        while first < c1:
            end = self.next_clear(first, c1)
            yield first, end
            first = self.next_set(end, c1)

    def bits(self) -> int:
        """All the bits, as one integer (bit i: cluster i)."""
        return int.from_bytes(self._mm[self._base:self._base + -(-self.clusters // 8)],
                              "little") & ((1 << self.clusters) - 1)

    def set_bits(self, value: int) -> None:
        """Set every bit that is set in `value` (as `bits` returns it)."""
        length = -(-self.clusters // 8)
        mm, base = self._mm, self._base
        mm[base:base + length] = (int.from_bytes(mm[base:base + length], "little")
                                  | value).to_bytes(length, "little")

    def count(self) -> int:
        """How many bits are set."""
        return self.bits().bit_count()

    def sync(self, c0: int, c1: int) -> None:
        """Make the bits of [c0, c1) durable (msync of their pages)."""
        start = (self._base + (c0 >> 3)) & ~(mmap.PAGESIZE - 1)
        end = self._base + ((c1 + 7) >> 3)
        self._mm.flush(start, end - start)

    def _next(self, c: int, end: int, want_set: bool) -> int:
        mm, base = self._mm, self._base
        while c < end and c & 7:
            if bool(mm[base + (c >> 3)] >> (c & 7) & 1) == want_set:
                return c
            c += 1
        if c >= end:
            return end
        pattern = _NOT_ALL_CLEAR if want_set else _NOT_ALL_SET
        match = pattern.search(mm, base + (c >> 3), base + ((end + 7) >> 3))
        if match is None:
            return end
        byte = mm[match.start()]
        if not want_set:
            byte = ~byte & 0xFF
        lowest = (byte & -byte).bit_length() - 1
        return min((match.start() - base) * 8 + lowest, end)

    def flush(self) -> None:
        """Make the header and every bit durable."""
        self._mm.flush()

    def close(self) -> None:
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1


def _encode(info: dict) -> bytes:
    """The header's JSON: ASCII, so that any path (non-UTF-8 bytes included,
    as surrogates) survives the round trip."""
    return json.dumps(info, sort_keys=True).encode()
