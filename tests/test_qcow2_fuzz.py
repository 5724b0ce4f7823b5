"""Fuzzing the qcow2 driver (issue 10): hypothesis-made corrupt headers,
L1/L2/refcount tables and backing file names, on images made once per
module by qemu-img and patched byte by byte for each case, run in-process.

Whatever the damage, opening gives a one-line `UserError` or succeeds, and
reads, writes, zeroing, flush and close either work or fail with OSError
(EIO for bad table entries); never another exception, never a hang (a timer
per case), never a read that starts past the end of a file, and never a
change to the metadata the damaged image had (header, L1 table, L2 tables,
refcount table) other than the entries the requests legitimately change;
the file never grows absurdly.
"""

from __future__ import annotations

import array
import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from snapfs.errors import UserError
from snapfs.image.qcow2 import Qcow2Image, refcount

KiB, MiB = 1 << 10, 1 << 20
BIT63, BIT62 = 1 << 63, 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00
SCALE = float(os.environ.get("SNAPFS_FUZZ_SCALE", "1"))
CASE_SECONDS = 10                 # a case that takes longer hangs
GROWTH_LIMIT = 160 * MiB          # a few pool refills' worth at most
# errors a damaged image may give on the data path: EIO for a bad table
# entry, ENOTSUP for a shared L2 table the driver will not write, ENOSPC for
# a refcount table that would have to grow past QEMU's limit
DATA_ERRNOS = {errno.EIO, errno.ENOTSUP, errno.ENOSPC}

FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _need_qemu():
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.fail("qemu-img and qemu-io not found: install qemu-utils; these tests use "
                    "them to make the images")


def run(*args) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"


# ----------------------------------------------------------------------
# the images, and what their metadata is
# ----------------------------------------------------------------------

def words(data: bytes, offset: int, count: int) -> list[int]:
    """Big-endian 64-bit words of `data` (those inside it)."""
    count = max(0, min(count, (len(data) - offset) // 8))
    arr = array.array("Q", data[offset:offset + count * 8])
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tolist()


def changed_words(a: bytes, b: bytes, base: int = 0) -> list[int]:
    """Offsets (from `base`) of the 8-byte words that differ between a and b
    (equal lengths, multiples of 8), by bisection."""
    if a == b:
        return []
    if len(a) <= 64:
        return [base + i for i in range(0, len(a), 8) if a[i:i + 8] != b[i:i + 8]]
    half = len(a) // 16 * 8
    return (changed_words(a[:half], b[:half], base)
            + changed_words(a[half:], b[half:], base + half))


class Layout:
    """Where the metadata of a qcow2 file (as bytes) is, parsed leniently
    (None if the header is beyond parsing)."""

    def __init__(self, data: bytes):
        (magic, version, self.backing_off, self.backing_len, bits, self.size, _,
         self.l1_size, self.l1_off, self.reft_off, self.reft_clusters, _, _) = \
            struct.unpack_from(">4sIQIIQIIQQIIQ", data)
        self.version = version
        self.bits = bits
        self.cs = 1 << bits
        self.autoclear = 0
        self.header_length = 72
        if version >= 3:
            self.autoclear = struct.unpack_from(">Q", data, 88)[0]
            self.header_length = struct.unpack_from(">I", data, 100)[0]
        self.file_size = len(data)
        self.l1 = words(data, self.l1_off, self.l1_size)
        self.reftable = words(data, self.reft_off, self.reft_clusters * self.cs // 8)

    @classmethod
    def parse(cls, data: bytes) -> "Layout | None":
        try:
            layout = cls(data)
        except struct.error:
            return None
        if not 9 <= layout.bits <= 21 or layout.l1_size > 1 << 22 or \
                layout.reft_clusters > 1 << 16:
            return None
        return layout

    def in_file(self, offset: int) -> bool:
        return 0 < offset < self.file_size

    def l2_offsets(self) -> list[int]:
        return [e & OFFSET_MASK for e in self.l1 if self.in_file(e & OFFSET_MASK)]

    def block_offsets(self) -> list[int]:
        return [e & ~511 & ((1 << 64) - 1) for e in self.reftable
                if self.in_file(e & ~511 & ((1 << 63) - 1))]

    def roles(self) -> dict[int, list]:
        """{cluster: [(role, detail)]} for the clusters holding metadata."""
        cs, out = self.cs, {}

        def add(offset, length, role, detail=None):
            for c in range(offset // cs, (offset + max(length, 1) - 1) // cs + 1):
                out.setdefault(c, []).append((role, detail))
        add(0, cs, "header")
        if self.l1_size:
            add(self.l1_off, self.l1_size * 8, "l1")
        add(self.reft_off, self.reft_clusters * cs, "reftable")
        # (the driver takes an entry with an unaligned offset for none)
        for i, e in enumerate(self.l1):
            if e and self.in_file(e & OFFSET_MASK) and not e & OFFSET_MASK & (cs - 1):
                add(e & OFFSET_MASK, cs, "l2", i)
        for e in self.reftable:
            offset = e & ~511 & ((1 << 64) - 1)
            if e and self.in_file(offset) and not offset & (cs - 1):
                add(offset, cs, "block")
        return out


def check_metadata_kept(before: bytes, after: bytes, written: list[tuple[int, int]]) -> None:
    """The metadata `before` had (header, L1, L2 tables, refcount table; a
    cluster with two roles must not change at all) is the same `after`,
    but for what writes of the guest ranges `written` legitimately change."""
    lay = Layout.parse(before)
    assert lay is not None
    cs, bits = lay.cs, lay.bits
    l2_bits = bits - 3
    guest = set()
    for start, stop in written:
        guest.update(range(start >> bits, ((stop - 1) >> bits) + 1))
    l1_written = {c >> l2_bits for c in guest}
    new = Layout.parse(after)
    moved = new is None or (new.reft_off, new.reft_clusters) != (lay.reft_off, lay.reft_clusters)
    for cluster, roles in sorted(lay.roles().items()):
        lo, hi = cluster * cs, min((cluster + 1) * cs, len(before))
        if lo >= hi or before[lo:hi] == after[lo:hi]:
            continue
        kinds = {r for r, _ in roles}
        where = f"cluster {cluster} ({', '.join(sorted(kinds))})"
        # the tables the header places are what the driver keeps up to
        # date; an entry that points into them (an L2 table or refcount
        # block there) is damage that must not make the driver write them
        # otherwise; where only such entries overlap, nothing may change
        placed = [r for r in roles if r[0] in ("header", "l1", "reftable")]
        assert placed or len(roles) == 1, f"{where}: overlapping metadata changed"
        role, detail = (placed or roles)[0]
        hi8 = lo + (hi - lo) // 8 * 8
        changed = [] if role in ("header", "block") else \
            changed_words(before[lo:hi8], after[lo:hi8], lo)
        if role == "header":
            allowed = set(range(48, 60))       # a moved refcount table
            if lay.version >= 3 and lay.autoclear:
                # bitmaps dropped: the autoclear field and the extensions
                allowed |= set(range(88, 96))
                allowed |= set(range(lay.header_length,
                                     lay.backing_off if lay.backing_off else cs))
            bad = [i for i in range(lo, hi) if before[i] != after[i] and i not in allowed]
            assert not bad, f"header bytes {bad[:8]} changed"
        elif role == "l1":
            for i in changed:
                index = (i - lay.l1_off) // 8
                assert index in l1_written, f"{where}: L1 entry {index} changed"
        elif role == "l2":
            for i in changed:
                c = (detail << l2_bits) + (i - lo) // 8
                assert c in guest, f"{where}: L2 entry for guest cluster {c} changed"
        elif role == "reftable":
            if moved and not any(after[lo:hi]):
                continue                        # the old table, freed and punched
            for i in changed:     # only where there was no block (offset 0), to a block
                new_entry = int.from_bytes(after[i:i + 8], "big")
                assert new_entry & (cs - 1) == 0 and new_entry >> 56 == 0, \
                    f"{where}: refcount table entry {(i - lay.reft_off) // 8} set to " \
                    f"{new_entry:#x}"
                assert int.from_bytes(before[i:i + 8], "big") & ~511 == 0, \
                    f"{where}: refcount table entry {(i - lay.reft_off) // 8} changed"


def make_templates(tmp: Path) -> dict[str, bytes]:
    """The images the cases damage: small cluster sizes (so that metadata is
    a good part of the file), data, compressed and zero clusters, versions 2
    and 3, a raw backing file."""
    base = tmp / "base.raw"
    base.write_bytes(bytes(range(256)) * (1024))            # 256 KiB
    out = {}
    specs = {
        # name: (options, size, qemu-io commands)
        "v3-512": ("cluster_size=512,refcount_bits=16", 256 * KiB,
                   ["write -P 1 0 20k", "write -c -P 2 40k 512", "write -z 48k 4k",
                    "write -P 3 100k 30k", "write -P 4 250k 6k"]),
        "v2-4k": ("compat=0.10,cluster_size=4096", 1 * MiB,
                  ["write -P 1 0 64k", "write -c -P 2 200k 4k", "write -P 3 900k 40k"]),
        "v3-64k": ("cluster_size=65536,refcount_bits=8", 2 * MiB,
                   ["write -P 1 0 64k", "write -c -P 2 1M 64k", "write -z 1536k 64k",
                    "write -P 3 1984k 64k"]),
    }
    for name, (options, size, commands) in specs.items():
        path = tmp / f"{name}.qcow2"
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options]
        if "compat=0.10" not in options:
            args += ["-b", "base.raw", "-F", "raw"]
        run(*args, path, size)
        io = ["qemu-io", "-f", "qcow2"]
        for c in commands:
            io += ["-c", c]
        run(*io, path)
        out[name] = path.read_bytes()
    return out


class Env:
    """Where the cases run (a short repr: hypothesis shows it)."""

    def __init__(self, tmp: Path):
        self.dir = tmp / "case"
        self.dir.mkdir()
        shutil.copyfile(tmp / "base.raw", self.dir / "base.raw")
        self.path = self.dir / "x.qcow2"

        # what backing file names can lead to
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "x.qcow2", "-F", "qcow2",
            self.dir / "base.qcow2", 1 * MiB)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "x.qcow2", "-F", "raw",
            self.dir / "raw-on-top.qcow2", 1 * MiB)
        (self.dir / "adir").mkdir()
        os.mkfifo(self.dir / "afifo")
        os.symlink("loop-link", self.dir / "loop-link")
        os.symlink("nowhere", self.dir / "dangling")
        os.symlink("/dev/zero", self.dir / "zero-link")
        shutil.copyfile(tmp / "base.raw", os.fsencode(self.dir) + b"/\xff\xfe.raw")

    def __repr__(self):
        return "env"


TEMPLATES: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    TEMPLATES.update(make_templates(tmp))
    return Env(tmp)


def damaged(template: str, patches) -> bytes:
    """A template with patches [(offset, bytes)] applied."""
    data = bytearray(TEMPLATES[template])
    for offset, value in patches:
        data[offset:offset + len(value)] = value
    return bytes(data)


# ----------------------------------------------------------------------
# running a case
# ----------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case took more than {CASE_SECONDS} s")


class Watch:
    """os.pread/preadv/pwrite/pwritev/ftruncate wrapped for a case: a read
    that starts past the end of its (regular) file is a violation; the
    biggest size the image file reached is kept."""

    def __init__(self):
        self.active = False
        self.violations: list[str] = []
        self.image_ino = None
        self.max_size = 0

    def _regular_size(self, fd: int) -> int | None:
        st = os.fstat(fd)
        return st.st_size if (st.st_mode & 0o170000) == 0o100000 else None

    def read(self, fd, length, offset):
        if self.active:
            size = self._regular_size(fd)
            if size is not None and offset > size:
                self.violations.append(f"read of {length} bytes at {offset:#x}, past the end "
                                       f"of the file ({size} bytes)")

    def grew(self, fd, end):
        if self.active:
            st = os.fstat(fd)
            if st.st_ino == self.image_ino:
                self.max_size = max(self.max_size, end, st.st_size)


@pytest.fixture(scope="module")
def watch():
    w = Watch()
    real = {name: getattr(os, name) for name in
            ("pread", "preadv", "pwrite", "pwritev", "ftruncate", "fdatasync", "fsync")}

    def pread(fd, length, offset):
        w.read(fd, length, offset)
        return real["pread"](fd, length, offset)

    def preadv(fd, buffers, offset, *a):
        w.read(fd, sum(len(memoryview(b)) for b in buffers), offset)
        return real["preadv"](fd, buffers, offset, *a)

    def pwrite(fd, data, offset):
        w.grew(fd, offset + len(memoryview(data)))
        return real["pwrite"](fd, data, offset)

    def pwritev(fd, buffers, offset, *a):
        w.grew(fd, offset + sum(len(memoryview(b)) for b in buffers))
        return real["pwritev"](fd, buffers, offset, *a)

    def ftruncate(fd, length):
        w.grew(fd, length)
        return real["ftruncate"](fd, length)

    def no_sync(fd):       # durability is not what these cases are about
        if not w.active:
            return real["fdatasync"](fd)

    # a small first pool: freeing a big one cluster by cluster at close
    # would be most of the time of a case
    pool_first = refcount.POOL_FIRST_BYTES
    refcount.POOL_FIRST_BYTES = 256 * KiB
    patched = {"pread": pread, "preadv": preadv, "pwrite": pwrite, "pwritev": pwritev,
               "ftruncate": ftruncate, "fdatasync": no_sync}
    for name, fn in patched.items():
        setattr(os, name, fn)
    try:
        yield w
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
        refcount.POOL_FIRST_BYTES = pool_first


@contextmanager
def guarded(watch: Watch, path: Path):
    """Run a case: a timer against hangs, the I/O watch on."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    watch.violations = []
    watch.image_ino = os.stat(path).st_ino
    watch.max_size = os.stat(path).st_size
    watch.active = True
    try:
        yield
    finally:
        watch.active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not watch.violations, watch.violations


def expect_data_error(e: OSError) -> None:
    assert e.errno in DATA_ERRNOS, f"unexpected error {e!r}"
    assert "\n" not in str(e)


def open_image(path: Path, writable: bool):
    """Open, or None if refused (in one line)."""
    try:
        return Qcow2Image.open(str(path), writable=writable)
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return None


def attempt(fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        expect_data_error(e)
        return None


BUFFER = bytearray(1 * MiB)


def exercise_read_only(img) -> None:
    size = img.size
    view = memoryview(BUFFER)
    span = min(size, len(BUFFER))
    for offset, length in ((0, span), (max(0, size - span), min(span, 64 * KiB)),
                           (size // 3, 4096)):
        length = min(length, size - offset)
        if length > 0:
            attempt(img.readinto, offset, view[:length])
    if size:
        data = attempt(img.read, size // 2, 1)
        assert data is None or len(data) == 1
    attempt(lambda: list(img.data_extents(0, size)))
    attempt(lambda: list(img.zero_extents(0, size)))


def exercise_writes(img, ops) -> list[tuple[int, int]]:
    """Apply `ops` [(kind, fraction, length)], returning the guest ranges
    they were meant to change."""
    written = []
    size = img.size
    for kind, fraction, length in ops:
        if not size:
            break
        offset = int(fraction * size) % size
        length = max(1, min(length, size - offset))
        written.append((offset, offset + length))
        if kind == "write":
            attempt(img.write, offset, b"\xa5" * length)
        elif kind == "zero":
            attempt(img.write_zeroes, offset, length)
        else:
            attempt(img.read, offset, length)
            written.pop()
    attempt(img.flush)
    return written


def run_case(env, watch, damage, writable: bool, ops=()) -> None:
    data = damaged(*damage)
    path = env.path
    # overwritten in place, not truncated to 0 first: ext4 flushes a file
    # rewritten that way when it is closed
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    with guarded(watch, path):
        img = open_image(path, writable)
        if img is None:
            return
        written = []
        try:
            exercise_read_only(img)
            if writable:
                written = exercise_writes(img, ops)
        finally:
            attempt(img.close)
    if writable:
        after = path.read_bytes()
        check_metadata_kept(data, after, written)
        assert watch.max_size <= len(data) + GROWTH_LIMIT, \
            f"the file grew from {len(data)} to {watch.max_size} bytes"
        assert len(after) <= len(data) + GROWTH_LIMIT


# ----------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------

TEMPLATE_NAMES = ["v3-512", "v2-4k", "v3-64k"]

ops_strategy = st.lists(
    st.tuples(st.sampled_from(["write", "zero", "read"]),
              st.floats(0, 1, allow_nan=False),
              st.sampled_from([1, 512, 4096, 4097, 65536, 200000])),
    min_size=1, max_size=3)


def offsets_of(lay: Layout) -> list[int]:
    """Interesting host offsets of an image: its metadata, its end, absurd."""
    cs = lay.cs
    out = [0, cs, 2 * cs, lay.l1_off, lay.reft_off, lay.file_size, lay.file_size - cs,
           lay.file_size + cs, lay.file_size // cs * cs, 1 << 40, 1 << 55, OFFSET_MASK]
    out += lay.l2_offsets() + lay.block_offsets()
    return out


def entry_values(lay: Layout):
    """Values for an L1, L2 or refcount table entry."""
    offsets = offsets_of(lay)
    flags = st.sampled_from([0, BIT63, BIT62, 1, BIT63 | 1, BIT63 | BIT62])
    aligned = st.builds(lambda o, f: (o & OFFSET_MASK) | f, st.sampled_from(offsets), flags)
    unaligned = st.builds(lambda o, d, f: ((o + d) & ((1 << 62) - 1)) | f,
                          st.sampled_from(offsets), st.sampled_from([1, 8, 512, lay.cs // 2]),
                          flags)
    return st.one_of(aligned, unaligned, st.integers(0, (1 << 64) - 1),
                     st.sampled_from([0, 1, (1 << 64) - 1, BIT63, BIT62]))


HEADER_FIELDS = [(4, ">I"), (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"),
                 (36, ">I"), (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q"),
                 (72, ">Q"), (80, ">Q"), (88, ">Q"), (96, ">I"), (100, ">I"), (104, ">B")]


_CACHE: dict = {}


def layout_of(name: str) -> Layout:
    if ("layout", name) not in _CACHE:
        _CACHE["layout", name] = Layout.parse(TEMPLATES[name])
    return _CACHE["layout", name]


def entry_values_of(name: str):
    if ("values", name) not in _CACHE:
        _CACHE["values", name] = entry_values(layout_of(name))
    return _CACHE["values", name]


def header_values_of(name: str):
    if ("header", name) not in _CACHE:
        lay = layout_of(name)
        _CACHE["header", name] = st.sampled_from(
            offsets_of(lay) + [1, 2, 3, 9, 16, 21, 22, 63, 64, 104, 112, lay.l1_size + 1,
                               lay.l1_size - 1])
    return _CACHE["header", name]


def q(value: int) -> bytes:
    return (value % (1 << 64)).to_bytes(8, "big")


@st.composite
def damaged_header(draw):
    """(template, patches) with header fields or bytes of the first cluster
    changed."""
    name = draw(st.sampled_from(TEMPLATE_NAMES))
    data = TEMPLATES[name]
    lay = layout_of(name)
    patches = []
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["field", "field", "byte"]))
        if how == "field":
            offset, fmt = draw(st.sampled_from(HEADER_FIELDS))
            width = struct.calcsize(fmt)
            old = struct.unpack_from(fmt, data, offset)[0]
            value = draw(st.one_of(
                header_values_of(name),
                st.builds(lambda b: old ^ (1 << b), st.integers(0, width * 8 - 1)),
                st.builds(lambda d: old + d, st.integers(-70, 70)),
                st.integers(0, (1 << (8 * width)) - 1)))
            patches.append((offset, struct.pack(fmt, value % (1 << (8 * width)))))
        else:
            patches.append((draw(st.integers(0, min(lay.cs, 4096) - 1)),
                            bytes([draw(st.integers(0, 255))])))
    return name, patches


@st.composite
def damaged_tables(draw):
    """(template, patches) with entries of the L1, L2 and refcount tables,
    refcount blocks, or any 8 bytes of the file changed."""
    name = draw(st.sampled_from(TEMPLATE_NAMES))
    lay = layout_of(name)
    values = entry_values_of(name)
    patches = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["l1", "l2", "l2", "reft", "block", "word"]))
        if what == "l1":
            at = lay.l1_off + 8 * draw(st.integers(0, lay.l1_size - 1))
        elif what == "l2":
            table = draw(st.sampled_from(lay.l2_offsets()))
            at = table + 8 * draw(st.integers(0, lay.cs // 8 - 1))
        elif what == "reft":
            at = lay.reft_off + 8 * draw(st.one_of(st.integers(0, 3),
                                                   st.integers(0, lay.cs // 8 - 1)))
        elif what == "block":
            block = draw(st.sampled_from(lay.block_offsets()))
            at = block + draw(st.integers(0, lay.cs // 8 - 1)) * 8
            patches.append((at, q(draw(st.one_of(
                st.integers(0, (1 << 64) - 1),
                st.sampled_from([0, 1, 2, 1 << 56, 1 << 48, (1 << 64) - 1]))))))
            continue
        else:
            at = draw(st.integers(0, len(TEMPLATES[name]) // 8 - 1)) * 8
        patches.append((at, q(draw(values))))
    return name, patches


# ----------------------------------------------------------------------
# the fuzz tests
# ----------------------------------------------------------------------

@settings(FUZZ, max_examples=int(2500 * SCALE))
@given(damage=damaged_header(), writable=st.booleans(), ops=ops_strategy)
def test_damaged_header(env, watch, damage, writable, ops):
    run_case(env, watch, damage, writable, ops)


@settings(FUZZ, max_examples=int(2500 * SCALE))
@given(damage=damaged_tables(), ops=ops_strategy)
# an L2 entry pointing past the end of the file: was read there (now EIO)
@example(damage=("v3-512", [(2048, q(0xF600))]), ops=[])
def test_damaged_tables_read_only(env, watch, damage, ops):
    run_case(env, watch, damage, False)


@settings(FUZZ, max_examples=int(3500 * SCALE))
@given(damage=damaged_tables(), ops=ops_strategy)
# an L1 entry pointing to the refcount table: L2 entries were written into it
@example(damage=("v3-512", [(1536, q(0)), (1544, q(0x200))]), ops=[("write", 0.15, 1)])
# refcount block 0 missing: a new one counted the header and tables as free
@example(damage=("v3-512", [(512, q(1)), (1536, q(0))]), ops=[("write", 0.0, 1)])
# refcount block 0 pointing to a data cluster of 0x01 bytes: refcounts 1 up
# to 4 GiB past the end of the file pushed allocation (and the file) there
@example(damage=("v3-64k", [(0x10000, q(0x50000))]), ops=[("write", 0.3, 1)])
def test_damaged_tables_written(env, watch, damage, ops):
    run_case(env, watch, damage, True, ops)


BACKING_NAMES = [
    b"x.qcow2", b"./x.qcow2", b"../case/x.qcow2", b"base.qcow2", b"raw-on-top.qcow2",
    b"base.raw", b"../case/base.raw", b"./../case/./base.raw", b"../../../../../../dev/zero",
    b"/dev/zero", b"/dev/null", b"/dev/fuse", b"/dev/tty", b"/dev/full", b"/dev/urandom",
    b"/dev/ptmx", b"/dev/console", b"/proc/self/mem", b"/proc/self/environ",
    b"/proc/self/fd/0", b"/proc/self/cwd/base.raw", b"/sys/kernel/mm/transparent_hugepage/enabled",
    b"/", b".", b"..", b"adir", b"adir/", b"afifo", b"loop-link", b"dangling", b"zero-link",
    b"\xff\xfe.raw", b"\xff\xfe", b"\xc3(", b"base\0.raw", b"\0", b"base.raw\n",
    b"\n\r\x1b[2J", b"a" * 255, b"a" * 256, b"a/" * 511, b"x" * 1023, b"x" * 1024,
    b"x" * 5000, b"../" * 300 + b"dev/zero",
]
FORMATS = [b"raw", b"qcow2", b"vmdk", b"", b"raw\0", b"\xff\xfe", b"qcow2\n", b"r" * 15,
           b"r" * 16, b"RAW"]


@st.composite
def backing_names(draw):
    """(template, patches) giving v3-64k another backing file name and format."""
    name = draw(st.one_of(st.sampled_from(BACKING_NAMES), st.binary(min_size=1, max_size=40),
                          st.builds(lambda a, b: a + b, st.sampled_from(BACKING_NAMES),
                                    st.sampled_from(BACKING_NAMES))))
    fmt = draw(st.sampled_from(FORMATS))
    ext = struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt + bytes(-len(fmt) % 8) + bytes(8)
    at = 112 + len(ext)
    length = draw(st.sampled_from([len(name), len(name), 0, len(name) + 1, 1 << 31]))
    offset = draw(st.sampled_from([at, at, 0, 64, 65536 - len(name), 65536]))
    return "v3-64k", [(8, struct.pack(">QI", offset, length % (1 << 32))),
                      (112, ext + name[:65536 - at])]


@settings(FUZZ, max_examples=int(1500 * SCALE))
@given(damage=backing_names(), writable=st.booleans())
def test_backing_file_names(env, watch, damage, writable):
    run_case(env, watch, damage, writable, [("read", 0.5, 4096)])
