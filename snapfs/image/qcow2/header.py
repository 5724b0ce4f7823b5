"""The qcow2 header: the on-disk constants, and reading (with every offset,
size and name checked), writing and laying out the header and its
extensions (the part of QEMU's block/qcow2.c that parses the header).

A malformed header is refused with one line (`UserError` naming the file),
never a traceback, whatever its bytes: the checks are QEMU's
(qcow2_do_open), plus tables that must lie inside the file and not on the
header or on each other.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from snapfs.errors import UserError
from snapfs.image.qcow2.fileio import pread_exact

MAGIC = b"QFI\xfb"

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875

# feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
AUTOCLEAR_BITMAPS = 1 << 0

# L1, L2 and refcount table entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# limits
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20          # QEMU's limit
MAX_REFTABLE_BYTES = 8 << 20     # QEMU's limit
MAX_BACKING_NAME = 1023
MAX_FORMAT_NAME = 15             # QEMU's limit (a 16-byte buffer)
MAX_SNAPSHOTS = 65536            # QEMU's limit
SNAPSHOT_ENTRY_MIN = 40          # the fixed part of a snapshot table entry
MAX_BITMAPS = 65535              # QEMU's limit
MAX_BITMAP_DIRECTORY_BYTES = 64 << 20

# layout
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")   # the 72 bytes of a version 2 header
V3_FIELDS = struct.Struct(">QQQII")            # bytes 72..103 of version 3
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 112           # what create writes: up to compression_type + padding
REFTABLE_FIELDS = struct.Struct(">QI")         # refcount table offset and clusters ...
REFTABLE_FIELDS_AT = 48                        # ... at this offset
AUTOCLEAR_AT = 88                # the autoclear features (version 3)

_COMPRESSION_NAMES = {1: "zstd"}


class Extension(NamedTuple):
    """A header extension as read: its type and its data (without padding)."""
    type: int
    data: bytes


@dataclass
class Header:
    """What the driver keeps of a header it has read and checked. The
    refcount table's place is as read at open: `Refcounts` keeps it from
    then on (it moves when the table grows)."""

    version: int
    cluster_bits: int
    size: int                    # the guest-visible size in bytes
    l1_size: int                 # entries
    l1_offset: int
    reftable_offset: int
    reftable_clusters: int
    nb_snapshots: int
    incompat: int
    compat: int
    autoclear: int
    refcount_order: int
    header_length: int
    extensions: list[Extension]
    backing_name: bytes | None   # as stored; None without a backing file
    backing_format: str | None   # from the backing format extension

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def printable(text: str) -> str:
    """`text` for a one-line message: control characters (and undecodable
    bytes) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def read_header(fd: int, path: str, file_size: int, writable: bool) -> Header:
    """Read and check the header of the qcow2 file open as `fd` (`file_size`
    bytes long), its extensions and its backing file name; refuse (UserError)
    what this driver cannot read, or write if `writable`."""

    def refuse(problem: str) -> UserError:
        return UserError(f"{path}: {problem}")

    def check_table(what: str, offset: int, length: int) -> None:
        """A (cluster aligned) table must not overlap the header and must
        lie inside the file."""
        if offset < cs:
            raise refuse(f"the {what} offset {offset:#x} overlaps the header")
        if offset + length > file_size:
            raise refuse(f"the {what} ({length} bytes at offset {offset:#x}) lies past "
                         f"the end of the file ({file_size} bytes)")

    head = os.pread(fd, 4096, 0)
    if len(head) < 4 or head[:4] != MAGIC:
        raise refuse("not a qcow2 image")
    if len(head) < V2_HEADER.size:
        raise refuse("truncated qcow2 header")
    (_, version, backing_off, backing_len, bits, size, crypt, l1_size, l1_off,
     reft_off, reft_clusters, nb_snapshots, snapshots_off) = V2_HEADER.unpack_from(head)
    if version not in (2, 3):
        raise refuse(f"qcow2 version {version} is not supported")
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise refuse(f"cluster size 2^{bits} is not supported (512 B to 2 MiB)")
    cs = 1 << bits
    first = pread_exact(fd, cs, 0) if cs > len(head) else head[:cs].ljust(cs, b"\0")
    incompat = compat = autoclear = 0
    refcount_order = 4
    header_length = V2_HEADER_LENGTH
    compression_type = 0
    if version >= 3:
        if len(head) < 104:
            raise refuse("truncated qcow2 header")
        incompat, compat, autoclear, refcount_order, header_length = \
            V3_FIELDS.unpack_from(first, 72)
        if header_length < 104 or header_length % 8 or header_length > cs:
            raise refuse(f"invalid header length {header_length}")
        if header_length > 104:
            compression_type = first[104]

    # the backing file name: in the first cluster, after the header; the
    # header extensions end where it starts
    ext_end = cs
    if backing_off:
        if backing_len > MAX_BACKING_NAME:
            raise refuse(f"backing file name longer than {MAX_BACKING_NAME} bytes")
        if not header_length <= backing_off <= cs - backing_len:
            raise refuse(f"invalid backing file name location ({backing_len} bytes "
                         f"at offset {backing_off:#x}): it must lie in the first "
                         "cluster, after the header")
        ext_end = backing_off

    # header extensions
    backing_format = None
    feature_names = {}
    extensions = []
    pos = header_length
    while pos + 8 <= ext_end:
        ext_type, ext_len = struct.unpack_from(">II", first, pos)
        if ext_type == EXT_END:
            break
        if ext_len > ext_end - pos - 8:
            raise refuse(f"invalid header extension {ext_type:#x}: its length "
                         f"{ext_len} runs past the end of the header")
        data = first[pos + 8:pos + 8 + ext_len]
        extensions.append(Extension(ext_type, data))
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len > MAX_FORMAT_NAME:
                raise refuse(f"invalid backing format header extension ({ext_len} "
                             f"bytes; a format name has at most {MAX_FORMAT_NAME})")
            backing_format = data.decode("utf-8", "replace")
        elif ext_type == EXT_FEATURE_NAMES:
            for i in range(0, ext_len - 47, 48):
                kind, bit = data[i], data[i + 1]
                feature_names[kind, bit] = data[i + 2:i + 48].rstrip(b"\0").decode(
                    "utf-8", "replace")
        elif ext_type == EXT_BITMAPS and autoclear & AUTOCLEAR_BITMAPS:
            # (its directory is read at the first write, to free the bitmaps)
            if len(data) < 24:
                raise refuse(f"invalid bitmaps header extension ({len(data)} bytes)")
            count, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", data)
            if not 0 < count <= MAX_BITMAPS:
                raise refuse(f"invalid bitmaps header extension ({count} bitmaps)")
            if not 0 < dir_size <= MAX_BITMAP_DIRECTORY_BYTES or dir_offset % cs:
                raise refuse(f"invalid bitmaps header extension (a directory of {dir_size} "
                             f"bytes at offset {dir_offset:#x})")
            check_table("bitmap directory", dir_offset, dir_size)
        pos += 8 + ext_len + (-ext_len % 8)

    # refusals, most fundamental first
    if crypt != 0:
        raise refuse("encrypted images are not supported")
    if incompat & INCOMPAT_CORRUPT:
        raise refuse("the image is marked corrupt; repair it with "
                     "'qemu-img check -r all' first")
    if incompat & INCOMPAT_DATA_FILE:
        raise refuse("images with an external data file are not supported")
    if incompat & INCOMPAT_EXTL2:
        raise refuse("images with extended L2 entries (subclusters) are not supported")
    if incompat & INCOMPAT_COMPRESSION or compression_type != 0:
        if compression_type == 0:
            raise refuse("the compression type bit is set but no compression "
                         "type is given")
        name = _COMPRESSION_NAMES.get(compression_type, f"#{compression_type}")
        raise refuse(f"compression type {name} is not supported (only deflate)")
    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        bits_set = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(f"bit {b}" + (f" ({printable(feature_names[0, b])})"
                                        if feature_names.get((0, b)) else "")
                          for b in bits_set)
        raise refuse(f"unknown incompatible features are set: {names}")
    if writable and nb_snapshots:
        raise refuse(f"the image has {nb_snapshots} internal snapshot(s); "
                     "it can only be opened read-only")
    if writable and incompat & INCOMPAT_DIRTY:
        raise refuse("the image is dirty (refcounts may be wrong); repair it "
                     "with 'qemu-img check -r all' first")
    if refcount_order > 6:
        raise refuse(f"invalid refcount order {refcount_order}")

    # the tables: sizes within QEMU's limits, cluster aligned, inside the
    # file, not on the header nor on each other
    l2_span = 1 << (2 * bits - 3)
    if size > MAX_L1_BYTES // 8 * l2_span:
        raise refuse(f"image size {size} is too large for cluster size {cs}")
    if l1_size * 8 > MAX_L1_BYTES:
        raise refuse(f"L1 table too large ({l1_size} entries)")
    if l1_size < -(-size // l2_span):
        raise refuse("L1 table is too small for the image size")
    if l1_off % cs:
        raise refuse("L1 table offset is not cluster aligned")
    if l1_size:
        check_table("L1 table", l1_off, l1_size * 8)
    if reft_off % cs:
        raise refuse("refcount table offset is not cluster aligned")
    if not 0 < reft_clusters <= MAX_REFTABLE_BYTES // cs:
        raise refuse(f"invalid refcount table size ({reft_clusters} clusters)")
    check_table("refcount table", reft_off, reft_clusters * cs)
    if l1_size and l1_off < reft_off + reft_clusters * cs and reft_off < l1_off + l1_size * 8:
        raise refuse("the L1 table and the refcount table overlap")
    if nb_snapshots > MAX_SNAPSHOTS:
        raise refuse(f"too many internal snapshots ({nb_snapshots})")
    if snapshots_off % cs:
        raise refuse("snapshot table offset is not cluster aligned")
    if nb_snapshots:
        check_table("snapshot table", snapshots_off, nb_snapshots * SNAPSHOT_ENTRY_MIN)

    backing_name = None
    if backing_off and backing_len:   # an empty name is no backing file, as in QEMU
        backing_name = first[backing_off:backing_off + backing_len]
        if b"\0" in backing_name:
            raise refuse(f"the backing file name {printable(os.fsdecode(backing_name))} "
                         "contains a NUL byte")

    return Header(version=version, cluster_bits=bits, size=size, l1_size=l1_size,
                  l1_offset=l1_off, reftable_offset=reft_off, reftable_clusters=reft_clusters,
                  nb_snapshots=nb_snapshots, incompat=incompat, compat=compat,
                  autoclear=autoclear, refcount_order=refcount_order,
                  header_length=header_length, extensions=extensions,
                  backing_name=backing_name, backing_format=backing_format)


def encode_extensions(extensions: list[Extension]) -> bytes:
    """Header extensions as stored, each padded to 8 bytes, with the end
    marker."""
    out = bytearray()
    for ext_type, data in extensions:
        out += struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
    out += struct.pack(">II", EXT_END, 0)
    return bytes(out)
