"""The copy map: which clusters the backup target holds.

It lives in a small state file beside the target: a 4 KiB header (magic and a
JSON description) followed by a bitmap with one bit per cluster, least
significant bit first. Bit i set means cluster i of the point-in-time image is
in the target, and the target's bytes for it are final.

Both daemon processes map the file with MAP_SHARED: the live process is the only
writer (and sets bits from one thread only); the snapshot process maps it
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
HEADER_SIZE = 4096

_NOT_ALL_SET = re.compile(rb"[^\xff]")
_NOT_ALL_CLEAR = re.compile(rb"[^\x00]")


class CopyMap:
    def __init__(self, path: str, fd: int, mm: mmap.mmap, info: dict):
        self.path = path
        self._fd = fd
        self._mm = mm
        self.info = info
        self.size: int = info["size"]
        self.cluster_size: int = info["cluster_size"]
        self.clusters: int = -(-self.size // self.cluster_size)

    @classmethod
    def create(cls, path: str, size: int, cluster_size: int, info: dict,
               overwrite: bool = False) -> "CopyMap":
        info = dict(info, size=size, cluster_size=cluster_size)
        clusters = -(-size // cluster_size)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
        fd = os.open(path, flags, 0o644)
        try:
            # Allocate the blocks now: a store into a mapped page that the
            # file system cannot back (it is full) kills the process (SIGBUS).
            os.posix_fallocate(fd, 0, HEADER_SIZE + -(-clusters // 8))
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        copymap = cls(path, fd, mm, info)
        copymap.write_info()
        return copymap

    @classmethod
    def open(cls, path: str) -> "CopyMap":
        """Open an existing state file read-only."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
            header = mm[:HEADER_SIZE]
            if not header.startswith(MAGIC):
                raise ValueError(f"{path}: not a snapfs state file")
            info = json.loads(header[len(MAGIC):].rstrip(b"\0"))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, info)

    def write_info(self, **changes) -> None:
        """Update the JSON description in the header."""
        self.info.update(changes)
        header = MAGIC + json.dumps(self.info, sort_keys=True).encode()
        if len(header) > HEADER_SIZE:
            raise ValueError("state file header too large")
        self._mm[:HEADER_SIZE] = header.ljust(HEADER_SIZE, b"\0")

    def copied(self, c0: int, c1: int) -> int:
        """Bit mask of the clusters [c0, c1): bit i set if cluster c0+i is copied."""
        mm = self._mm
        value = int.from_bytes(mm[HEADER_SIZE + (c0 >> 3):HEADER_SIZE + ((c1 + 7) >> 3)], "little")
        return (value >> (c0 & 7)) & ((1 << (c1 - c0)) - 1)

    def mark(self, c0: int, c1: int) -> None:
        """Record the clusters [c0, c1) as copied. Only the live process's trio
        thread calls this, after the clusters' data is in the target."""
        mm = self._mm
        while c0 < c1 and c0 & 7:
            mm[HEADER_SIZE + (c0 >> 3)] |= 1 << (c0 & 7)
            c0 += 1
        whole_end = c1 & ~7
        if c0 < whole_end:
            mm[HEADER_SIZE + (c0 >> 3):HEADER_SIZE + (whole_end >> 3)] = b"\xff" * ((whole_end - c0) >> 3)
            c0 = whole_end
        while c0 < c1:
            mm[HEADER_SIZE + (c0 >> 3)] |= 1 << (c0 & 7)
            c0 += 1

    def next_uncopied(self, c: int, end: int) -> int:
        """The first cluster in [c, end) not yet copied, or `end`."""
        return self._next(c, end, want_set=False)

    def next_copied(self, c: int, end: int) -> int:
        """The first cluster in [c, end) already copied, or `end`."""
        return self._next(c, end, want_set=True)

    def _next(self, c: int, end: int, want_set: bool) -> int:
        mm = self._mm
        while c < end and c & 7:
            if bool(mm[HEADER_SIZE + (c >> 3)] >> (c & 7) & 1) == want_set:
                return c
            c += 1
        if c >= end:
            return end
        pattern = _NOT_ALL_CLEAR if want_set else _NOT_ALL_SET
        match = pattern.search(mm, HEADER_SIZE + (c >> 3), HEADER_SIZE + ((end + 7) >> 3))
        if match is None:
            return end
        byte = mm[match.start()]
        if not want_set:
            byte = ~byte & 0xFF
        lowest = (byte & -byte).bit_length() - 1
        return min((match.start() - HEADER_SIZE) * 8 + lowest, end)

    def flush(self) -> None:
        self._mm.flush()

    def close(self) -> None:
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1
