"""Making a new qcow2 file: a version 3 image, empty (reading as zeroes or
as its backing file), laid out as qemu-img lays it out."""

from __future__ import annotations

import array
import os

from snapfs.errors import UserError
from snapfs.image.qcow2.fileio import be_bytes, fsync_dir, pwrite
from snapfs.image.qcow2.header import (EXT_BACKING_FORMAT, MAGIC, MAX_BACKING_NAME,
                                       MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS,
                                       V2_HEADER, V3_FIELDS, V3_HEADER_LENGTH, Extension,
                                       encode_extensions)


def create_file(path: str, size: int, cluster_size: int, backing_file: str | None,
                backing_format: str | None, overwrite: bool) -> int:
    """Create the file of a version 3 image of `size` bytes (rounded up to a
    multiple of 512, as qemu-img does), durable, and return its descriptor,
    open for reading and writing. On failure nothing is left behind.

    `backing_file` is stored exactly as given (a relative name is relative
    to the directory of `path`), with `backing_format` ('raw' or 'qcow2')
    in the backing-format header extension."""
    if size < 0:
        raise ValueError("negative image size")
    if (cluster_size & (cluster_size - 1) or
            not (1 << MIN_CLUSTER_BITS) <= cluster_size <= (1 << MAX_CLUSTER_BITS)):
        raise UserError(f"{path}: cluster size {cluster_size} is not supported "
                        "(a power of two from 512 to 2097152)")
    name = b""
    extensions = []
    if backing_file is not None:
        if backing_format not in ("raw", "qcow2"):
            raise UserError(f"{path}: backing format {backing_format!r} is not supported "
                            "(give 'raw' or 'qcow2')")
        name = os.fsencode(backing_file)
        extensions.append(Extension(EXT_BACKING_FORMAT, backing_format.encode()))
        if not name:
            raise UserError(f"{path}: empty backing file name")
        if len(name) > MAX_BACKING_NAME:
            raise UserError(f"{path}: backing file name longer than {MAX_BACKING_NAME} bytes")
    elif backing_format is not None:
        raise UserError(f"{path}: backing format given without a backing file")

    size = -(-size // 512) * 512
    cs = cluster_size
    bits = cs.bit_length() - 1
    l2_span = cs * (cs // 8)
    l1_size = -(-size // l2_span)
    if l1_size * 8 > MAX_L1_BYTES:
        raise UserError(f"{path}: size {size} is too big for cluster size {cs} "
                        "(the L1 table would exceed 32 MiB)")
    l1_clusters = -(-l1_size * 8 // cs)
    block_entries = cs * 8 // 16
    reft_clusters, blocks = 1, 1
    while True:  # the refcount structures must cover themselves
        total = 1 + reft_clusters + blocks + l1_clusters
        need_blocks = -(-total // block_entries)
        need_reft = max(1, -(-need_blocks * 8 // cs))
        if (need_blocks, need_reft) == (blocks, reft_clusters):
            break
        blocks, reft_clusters = need_blocks, need_reft
    reft_off = cs
    blocks_off = reft_off + reft_clusters * cs
    l1_off = blocks_off + blocks * cs

    exts = encode_extensions(extensions)
    backing_off = V3_HEADER_LENGTH + len(exts) if name else 0
    header = V2_HEADER.pack(MAGIC, 3, backing_off, len(name), bits, size, 0, l1_size,
                            l1_off, reft_off, reft_clusters, 0, 0)
    header += V3_FIELDS.pack(0, 0, 0, 4, V3_HEADER_LENGTH)
    header += bytes(V3_HEADER_LENGTH - len(header))  # compression_type 0 (deflate), padding
    header += exts + name
    if len(header) > cs:
        raise UserError(f"{path}: the backing file name does not fit in the first "
                        f"cluster; use a bigger cluster size than {cs}")

    reftable = array.array("Q", (blocks_off + i * cs for i in range(blocks)))
    reftable.frombytes(bytes(reft_clusters * cs - blocks * 8))
    refblocks = (b"\x00\x01" * total).ljust(blocks * cs, b"\x00")

    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o644)
    try:
        pwrite(fd, header, 0)
        pwrite(fd, be_bytes(reftable), reft_off)
        pwrite(fd, refblocks, blocks_off)
        os.ftruncate(fd, total * cs)
        os.fdatasync(fd)
        fsync_dir(path)
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    return fd


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
