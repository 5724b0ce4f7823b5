"""Malformed qcow2 images: every offset, size and name that the driver reads
from a header is checked before it is used, so that opening a bad image is
refused with one line (UserError), never a traceback; table entries that
point to absurd places give EIO on the data path.

The images are made by qemu-img and then patched byte by byte.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import is_mounted, run_snapfs
from snapfs.errors import UserError
from snapfs.image.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875


@pytest.fixture(autouse=True)
def _need_qemu():
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.fail("qemu-img and qemu-io not found: install qemu-utils; these tests use "
                    "them to make the images")


def run(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


def field(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def patch(path, offset, fmt, value) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def extensions(path) -> dict[int, tuple[int, int]]:
    """{type: (position, length)} of the header extensions."""
    pos = field(path, 100, ">I")
    out = {}
    while True:
        ext_type, length = field(path, pos, ">I"), field(path, pos + 4, ">I")
        if ext_type == 0:
            return out
        out[ext_type] = (pos, length)
        pos += 8 + length + (-length % 8)


def make_image(tmp: Path, cs: int = CS, backing: bool = True, data: bool = True) -> Path:
    """A version 3 image with a backing file (so a backing format extension
    and a backing file name) and some data."""
    path = tmp / "x.qcow2"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}"]
    if backing:
        if not (tmp / "base.qcow2").exists():
            run("qemu-img", "create", "-q", "-f", "qcow2", tmp / "base.qcow2", MiB)
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    run(*args, path, MiB)
    if data:
        run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 128k", path)
    return path


# ----------------------------------------------------------------------
# the header, field by field
# ----------------------------------------------------------------------

def _set(offset, fmt, value):
    """Set a header field to `value` (a callable gets the old value)."""
    def make(tmp):
        path = make_image(tmp)
        new = value(field(path, offset, fmt)) if callable(value) else value
        patch(path, offset, fmt, new)
        return path
    return make


def _set_many(*changes, cs=CS):
    def make(tmp):
        path = make_image(tmp, cs=cs)
        for offset, fmt, value in changes:
            patch(path, offset, fmt, value(path) if callable(value) else value)
        return path
    return make


def _truncated(length, version=3):
    def make(tmp):
        path = make_image(tmp, backing=False, data=False)
        head = bytearray(path.read_bytes()[:length])
        head[4:8] = struct.pack(">I", version)
        path.write_bytes(bytes(head))
        return path
    return make


def _extension_length(ext_type, length):
    def make(tmp):
        path = make_image(tmp)
        pos, _ = extensions(path)[ext_type]
        patch(path, pos + 4, ">I", length(path, pos) if callable(length) else length)
        return path
    return make


def _nul_in_backing_name(tmp):
    path = make_image(tmp)
    patch(path, field(path, 8, ">Q") + 4, ">B", 0)     # base\0qcow2
    return path


def _backing_is(kind):
    def make(tmp):
        path = tmp / "x.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2",
            path, MiB)
        if kind == "directory":
            (tmp / "base.qcow2").mkdir()
        else:
            os.mkfifo(tmp / "base.qcow2")
        return path
    return make


def _feature_name_with_newline(tmp):
    """An unknown incompatible bit whose name (from the feature name table)
    holds a newline: the message stays one line."""
    path = make_image(tmp)
    pos, _ = extensions(path)[EXT_FEATURE_NAMES]
    with open(path, "r+b") as f:
        f.seek(pos + 8)
        f.write(bytes([0, 9]) + b"evil\nname".ljust(46, b"\0"))
    patch(path, 72, ">Q", field(path, 72, ">Q") | 1 << 9)
    return path


def _bitmaps(change):
    def make(tmp):
        path = make_image(tmp, backing=False)
        run("qemu-img", "bitmap", "--add", path, "bm0")
        pos, _ = extensions(path)[EXT_BITMAPS]
        offset, fmt, value = change
        patch(path, pos + 8 + offset, fmt, value)
        return path
    return make


BIT63 = 1 << 63

MALFORMED = [
    # (name, maker, words in the message, writable)
    ("truncated v2 header", _truncated(60, 2), "truncated qcow2 header", True),
    ("truncated v3 header", _truncated(90), "truncated qcow2 header", True),
    ("cluster bits 8", _set(20, ">I", 8), "cluster size 2^8 is not supported", True),
    ("cluster bits 22", _set(20, ">I", 22), "cluster size 2^22 is not supported", True),
    ("cluster bits 2^32-1", _set(20, ">I", 0xFFFFFFFF), "cluster size", True),
    ("header length 100", _set(100, ">I", 100), "invalid header length 100", True),
    ("header length 108", _set(100, ">I", 108), "invalid header length 108", True),
    ("header length huge", _set(100, ">I", 0xFFFFFFF8), "invalid header length", True),
    ("size 2^63", _set(24, ">Q", BIT63), "image size 9223372036854775808 is too large", True),
    ("size past the L1 table", _set(24, ">Q", 600 * 1024 * MiB), "L1 table is too small", True),
    ("L1 offset bit 63", _set(40, ">Q", lambda v: v | BIT63), "past the end of the file", True),
    ("L1 offset bit 63 read-only", _set(40, ">Q", lambda v: v | BIT63),
     "the L1 table (8 bytes at offset 0x8000000000030000) lies past the end", False),
    ("L1 offset past the end", _set(40, ">Q", 1 << 40), "L1 table", True),
    ("L1 offset unaligned", _set(40, ">Q", lambda v: v + 512),
     "L1 table offset is not cluster aligned", True),
    ("L1 offset 0", _set(40, ">Q", 0), "the L1 table offset 0x0 overlaps the header", True),
    ("L1 size 2^32-1", _set(36, ">I", 0xFFFFFFFF), "L1 table too large", True),
    ("L1 size 0", _set(36, ">I", 0), "L1 table is too small", True),
    ("L1 on the refcount table", _set_many((40, ">Q", CS)),
     "the L1 table and the refcount table overlap", True),
    ("refcount table offset bit 63", _set(48, ">Q", lambda v: v | BIT63),
     "the refcount table (65536 bytes at offset 0x8000000000010000) lies past the end", False),
    ("refcount table offset unaligned", _set(48, ">Q", lambda v: v + 8),
     "refcount table offset is not cluster aligned", True),
    ("refcount table offset 0", _set(48, ">Q", 0), "refcount table offset 0x0 overlaps the header",
     True),
    ("refcount table clusters 0", _set(56, ">I", 0), "invalid refcount table size (0 clusters)",
     False),
    ("refcount table clusters 2^32-1", _set(56, ">I", 0xFFFFFFFF),
     "invalid refcount table size (4294967295 clusters)", True),
    ("refcount table past the end", _set(56, ">I", 100), "the refcount table", True),
    ("refcount order 7", _set(96, ">I", 7), "invalid refcount order 7", True),
    ("backing name offset bit 63", _set(8, ">Q", lambda v: v | BIT63),
     "invalid backing file name location", True),
    ("backing name past the first cluster", _set(8, ">Q", CS + 8),
     "invalid backing file name location", True),
    ("backing name in the header", _set(8, ">Q", 16), "after the header", True),
    ("backing name running past the first cluster", _set_many(
        (8, ">Q", 500), (16, ">I", 20), cs=512), "invalid backing file name location", True),
    ("backing name 1024 bytes", _set(16, ">I", 1024), "longer than 1023 bytes", True),
    ("backing name 2^32-1 bytes", _set(16, ">I", 0xFFFFFFFF), "longer than 1023 bytes", True),
    ("NUL in the backing name", _nul_in_backing_name,
     "the backing file name base\\x00qcow2 contains a NUL byte", True),
    ("backing file a directory", _backing_is("directory"),
     "the backing file base.qcow2 is not a regular file", False),
    ("backing file a FIFO", _backing_is("fifo"),
     "the backing file base.qcow2 is not a regular file", False),
    ("extension length 2^32-1", _extension_length(EXT_FEATURE_NAMES, 0xFFFFFFFF),
     "invalid header extension 0x6803f857", True),
    ("extension into the backing name", _extension_length(
        EXT_FEATURE_NAMES, lambda path, pos: field(path, 8, ">Q") - (pos + 8) + 1),
     "invalid header extension 0x6803f857", True),
    ("backing format name 16 bytes", _extension_length(EXT_BACKING_FORMAT, 16),
     "invalid backing format header extension (16 bytes", True),
    ("feature name with a newline", _feature_name_with_newline,
     "unknown incompatible features are set: bit 9 (evil\\nname)", False),
    ("snapshot table unaligned", _set(64, ">Q", 512),
     "snapshot table offset is not cluster aligned", False),
    ("snapshot table past the end", _set_many((60, ">I", 1), (64, ">Q", 1 << 40)),
     "the snapshot table (40 bytes at offset 0x10000000000) lies past the end", False),
    ("snapshot table offset 0", _set_many((60, ">I", 1), (64, ">Q", 0)),
     "the snapshot table offset 0x0 overlaps the header", False),
    ("too many snapshots", _set(60, ">I", 0x10000001), "too many internal snapshots", False),
    ("no bitmaps", _bitmaps((0, ">I", 0)), "invalid bitmaps header extension (0 bitmaps)", True),
    ("bitmap directory too large", _bitmaps((8, ">Q", 1 << 40)),
     "invalid bitmaps header extension (a directory of 1099511627776 bytes", True),
    ("bitmap directory unaligned", _bitmaps((16, ">Q", CS + 8)),
     "invalid bitmaps header extension", True),
    ("bitmap directory past the end", _bitmaps((16, ">Q", 1 << 40)),
     "the bitmap directory", True),
]


@pytest.mark.parametrize("maker, words, writable", [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_header_is_refused(tmp_path, maker, words, writable):
    path = maker(tmp_path)
    with pytest.raises(UserError) as caught:
        Qcow2Image.open(str(path), writable=writable)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert words in message, message


def test_empty_backing_name_is_no_backing_file(tmp_path):
    """A backing file offset with a name of length 0: no backing file, as
    QEMU has it."""
    path = make_image(tmp_path)
    patch(path, 16, ">I", 0)
    img = Qcow2Image.open(str(path))
    try:
        assert img.backing_file is None
        assert img.read(0, 128 * KiB) == b"\x07" * 128 * KiB
        assert img.read(128 * KiB, 4096) == bytes(4096)
    finally:
        img.close()


def test_stale_bitmaps_extension_is_dropped_without_freeing(tmp_path):
    """A bitmaps extension without the bitmaps autoclear bit is stale (QEMU
    ignores it, and its clusters may be in use by now): the first write drops
    the extension and frees nothing."""
    path = make_image(tmp_path, backing=False)
    run("qemu-img", "bitmap", "--add", path, "bm0")
    patch(path, 88, ">Q", 0)                                  # no autoclear bits
    before = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    img = Qcow2Image.open(str(path), writable=True)
    try:
        img.write(0, b"x" * 4096)
    finally:
        img.close()
    assert EXT_BITMAPS not in extensions(path)
    after = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert "ERROR" not in after.stdout + after.stderr
    assert after.returncode == before.returncode   # the same leaks (the stale bitmap's), no more


# ----------------------------------------------------------------------
# table entries pointing to absurd places: EIO on the data path
# ----------------------------------------------------------------------

def _l1_entry(path) -> int:
    return field(path, 40, ">Q")


@pytest.mark.parametrize("entry, words", [
    ((1 << 40) | BIT63, "L2 table offset 0x10000000000 lies past the end of the file"),
    (3 * CS + 512 | BIT63, "L2 table offset 0x30200 is not cluster aligned"),
], ids=["past the end", "unaligned"])
def test_bad_l1_entry_gives_eio(tmp_path, entry, words):
    path = make_image(tmp_path, backing=False)
    patch(path, _l1_entry(path), ">Q", entry)
    for writable in (False, True):
        img = Qcow2Image.open(str(path), writable=writable)
        try:
            for call in (lambda: img.read(0, 4096), lambda: list(img.data_extents(0, MiB))):
                with pytest.raises(OSError) as caught:
                    call()
                assert caught.value.errno == errno.EIO
                assert words in str(caught.value)
            if writable:
                with pytest.raises(OSError) as caught:
                    img.write(0, b"y" * 4096)
                assert caught.value.errno == errno.EIO
        finally:
            img.close()


def test_refcount_table_entry_with_bit_63_gives_eio(tmp_path):
    path = make_image(tmp_path, backing=False)
    table = field(path, 48, ">Q")
    patch(path, table, ">Q", field(path, table, ">Q") | BIT63)
    img = Qcow2Image.open(str(path), writable=True)
    try:
        assert img.read(0, 4096) == b"\x07" * 4096
        with pytest.raises(OSError) as caught:
            img.write(512 * KiB, b"y" * 4096)          # needs a new cluster
        assert caught.value.errno == errno.EIO
        assert "refcount block offset 0x8000000000020000 lies past the end" in str(caught.value)
    finally:
        img.close()


# ----------------------------------------------------------------------
# random damage (hypothesis)
# ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An image with everything a header can have that the driver accepts
    for writing: a backing file, the feature name table, a persistent bitmap
    with data, compressed and zero clusters."""
    tmp = tmp_path_factory.mktemp("template")
    path = make_image(tmp)
    run("qemu-img", "bitmap", "--add", path, "bm0")
    run("qemu-io", "-f", "qcow2", "-c", "write -c -P 8 128k 64k", "-c", "write -z 192k 64k",
        "-c", "write -P 9 256k 64k", path)
    return path


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), min_size=1,
                       max_size=4),
       writable=st.booleans())
def test_random_header_damage(tmp_path, template, damage, writable):
    """Whatever bytes of the first 512 change, open() succeeds or raises
    UserError; an image that opens reads and writes or fails with OSError."""
    path = tmp_path / "damaged" / "x.qcow2"
    path.parent.mkdir(exist_ok=True)
    shutil.copyfile(template.parent / "base.qcow2", path.parent / "base.qcow2")
    shutil.copyfile(template, path)
    with open(path, "r+b") as f:
        for offset, value in damage:
            f.seek(offset)
            f.write(bytes([value]))
    try:
        img = Qcow2Image.open(str(path), writable=writable)
    except UserError as e:
        assert "\n" not in str(e)
        return
    try:
        for offset in (0, img.size // 2, max(0, img.size - 4096)):
            try:
                img.read(offset, min(4096, img.size - offset))
            except OSError:
                pass
        if writable and img.size:
            try:
                img.write(0, b"z" * min(4096, img.size))
                img.write_zeroes(img.size // 2, min(CS, img.size - img.size // 2))
                img.flush()
            except OSError:
                pass
    finally:
        try:
            img.close()
        except OSError:
            pass


# ----------------------------------------------------------------------
# through the real command
# ----------------------------------------------------------------------

def _tree(path: Path) -> list:
    return sorted((str(p.relative_to(path)), p.is_dir()) for p in path.rglob("*"))


@pytest.mark.parametrize("maker", [_set(40, ">Q", lambda v: v | BIT63), _nul_in_backing_name,
                                   _extension_length(EXT_FEATURE_NAMES, 0xFFFFFFFF)],
                         ids=["L1 offset bit 63", "NUL in the backing name",
                              "extension length"])
def test_mount_refuses_a_malformed_image_in_one_line(tmp_path, maker):
    source = maker(tmp_path)
    live, snap = tmp_path / "live", tmp_path / "snap"
    live.mkdir()
    snap.mkdir()
    before = _tree(tmp_path)
    result = run_snapfs("mount", source, live, snap, "--target", tmp_path / "t.qcow2",
                        "--format", "qcow2", check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("snapfs: "), result.stderr
    assert "Traceback" not in result.stderr
    assert str(source) in lines[0]
    assert result.stdout == ""
    assert _tree(tmp_path) == before            # no target, log or state file
    assert not is_mounted(live) and not is_mounted(snap)
