"""Persistent dirty bitmaps: this driver does not keep them up to date, so
it drops them at the first write; here, finding the clusters they use."""

from __future__ import annotations

import struct
from collections import Counter

from snapfs.image.qcow2.fileio import ImageFile, be_array, pread_exact
from snapfs.image.qcow2.header import L2E_OFFSET_MASK, MAX_BITMAP_DIRECTORY_BYTES, printable

_ENTRY = struct.Struct(">QIIBBHI")     # the fixed part of a bitmap directory entry


def bitmap_clusters(file: ImageFile, extension: bytes, clusters: Counter) -> list[str]:
    """Count the clusters of the bitmaps of a bitmaps header extension (one
    `read_header` checked) into `clusters`: the directory, the bitmap tables
    and their data. Returns the bitmaps' names. A directory or table that
    cannot be right is EIO."""
    cs = file.cluster_size
    count, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", extension)
    directory = pread_exact(file.fd, dir_size, dir_offset)
    for c in range(dir_offset // cs, (dir_offset + dir_size + cs - 1) // cs):
        clusters[c] += 1
    names = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > dir_size:
            raise file.corrupt("the bitmap directory is truncated")
        table_offset, table_size, _, _, _, name_size, extra_size = \
            _ENTRY.unpack_from(directory, pos)
        name_at = pos + _ENTRY.size + extra_size
        if name_at + name_size > dir_size:
            raise file.corrupt("the bitmap directory is truncated")
        names.append(printable(directory[name_at:name_at + name_size].decode(
            "utf-8", "replace")))
        pos = name_at + name_size
        pos += -pos % 8
        if not table_size:
            continue
        if table_size > MAX_BITMAP_DIRECTORY_BYTES // 8:
            raise file.corrupt(f"bitmap table too large ({table_size} entries)")
        file.check_metadata_offset(table_offset, "bitmap table")
        file.check_metadata_offset(table_offset + (table_size * 8 - 1) // cs * cs,
                                   "bitmap table")
        for c in range(table_offset // cs, (table_offset + table_size * 8 + cs - 1) // cs):
            clusters[c] += 1
        table = be_array(pread_exact(file.fd, table_size * 8, table_offset))
        for entry in table:
            offset = entry & L2E_OFFSET_MASK
            if offset:
                file.check_metadata_offset(offset, "bitmap data cluster")
                clusters[offset // cs] += 1
    return names
