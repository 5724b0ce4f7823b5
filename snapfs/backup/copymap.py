"""The copy map: which clusters the backup target holds.

It lives in a small state file beside the target: a header (a magic line, the
header's size as 16 hex digits and a newline, then a JSON description padded
with NULs to a multiple of 4 KiB, with at least `HEADER_SLACK` bytes to spare
for the figures added later) followed by a bitmap with one bit per cluster,
least significant bit first. The header grows with the paths it records, so
any path the file system accepts fits. Bit i set means cluster i of the point-in-time image is
in the target, and the target's bytes for it are final.

Both daemon processes map the file with MAP_SHARED: the live process is the only
writer (and sets bits from one thread only); the snapshot's process maps it
read-only. A bit is set only after the cluster's data has been written to the
target, and never cleared while mounted; docs/design.md explains why that lets
the snapshot process read without locks.
"""

from __future__ import annotations

import json
import mmap
import os
import re

MAGIC = b"SNAPFS-COPYMAP\n"
_SIZE_FIELD = 17  # 16 hex digits and a newline
#: room in the header for what `write_info` adds after creation (the job's
#: state, figures and error, which `BackupJob` keeps short)
HEADER_SLACK = 4096
_PAGE = 4096

_NOT_ALL_SET = re.compile(rb"[^\xff]")
_NOT_ALL_CLEAR = re.compile(rb"[^\x00]")


class CopyMap:
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
               overwrite: bool = False) -> "CopyMap":
        info = dict(info, size=size, cluster_size=cluster_size)
        clusters = -(-size // cluster_size)
        needed = len(MAGIC) + _SIZE_FIELD + len(_encode(info)) + HEADER_SLACK
        header_size = -(-needed // _PAGE) * _PAGE
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
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
    def open(cls, path: str, writable: bool = False) -> "CopyMap":
        """Open an existing copy map, read-only unless `writable` (to go on
        filling it after a restart)."""
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, prot)
            try:
                if mm[:len(MAGIC)] != MAGIC:
                    raise ValueError
                start = len(MAGIC) + _SIZE_FIELD
                header_size = int(mm[len(MAGIC):start], 16)
                info = json.loads(mm[start:header_size].rstrip(b"\0"))
                clusters = -(-info["size"] // info["cluster_size"])
                if len(mm) < header_size + -(-clusters // 8):
                    raise ValueError
            except (ValueError, KeyError, TypeError, ZeroDivisionError):
                mm.close()
                raise ValueError(f"{path}: not a snapfs copy map") from None
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
        header = MAGIC + b"%016x\n" % self._base + _encode(info)
        if len(header) > self._base:
            raise ValueError("copy map header too large")  # a bug: HEADER_SLACK too small
        self._mm[:self._base] = header.ljust(self._base, b"\0")
        self.info = info

    def copied(self, c0: int, c1: int) -> int:
        """Bit mask of the clusters [c0, c1): bit i set if cluster c0+i is copied."""
        mm, base = self._mm, self._base
        value = int.from_bytes(mm[base + (c0 >> 3):base + ((c1 + 7) >> 3)], "little")
        return (value >> (c0 & 7)) & ((1 << (c1 - c0)) - 1)

    def mark(self, c0: int, c1: int) -> None:
        """Record the clusters [c0, c1) as copied. Only the live process's trio
        thread calls this, after the clusters' data is in the target."""
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

    def next_uncopied(self, c: int, end: int) -> int:
        """The first cluster in [c, end) not yet copied, or `end`."""
        return self._next(c, end, want_set=False)

    def next_copied(self, c: int, end: int) -> int:
        """The first cluster in [c, end) already copied, or `end`."""
        return self._next(c, end, want_set=True)

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
