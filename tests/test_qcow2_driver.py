"""The qcow2 driver (snapfs/image/qcow2/), with qemu-img and qemu-io as the oracle.

Images are made by qemu-img/qemu-io (or by the driver), read and written
through `Qcow2Image`, and judged by `qemu-img convert/compare/check/map/info`.
Refused features are tested with images crafted from qemu-img-made ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.errors import UserError
from snapfs.image.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(autouse=True)
def _need_qemu():
    missing = [tool for tool in ("qemu-img", "qemu-io") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install qemu-utils; these tests "
                    "use it as the oracle")


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------

def run(*args, ok=(0,)) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if result.returncode not in ok:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


def qemu_io(path, *commands, fmt="qcow2") -> None:
    args = []
    for command in commands:
        args += ["-c", command]
    run("qemu-io", "-f", fmt, *args, path)


def qemu_create(path, size, cs=64 * KiB, v2=False, backing=None, backing_fmt=None,
                options=()) -> None:
    opts = [f"cluster_size={cs}", "compat=0.10" if v2 else "compat=1.1", *options]
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    run(*args, path, size)


def as_raw(path) -> bytes:
    """The guest view of an image, according to qemu-img."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.raw"
        run("qemu-img", "convert", "-O", "raw", path, out)
        return out.read_bytes()


def check(path) -> subprocess.CompletedProcess:
    return run("qemu-img", "check", path, ok=(0, 1, 2, 3))


def assert_clean(path) -> None:
    result = check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def assert_identical(path, model) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "model.raw"
        ref.write_bytes(model)
        result = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, ref, ok=(0, 1))
        assert result.returncode == 0, result.stdout + result.stderr


def top_extents(path) -> list[tuple[int, int]]:
    """What qemu-img map says the top layer holds (data or zero clusters)."""
    out = json.loads(run("qemu-img", "map", "--output=json", path).stdout)
    ranges: list = []
    for e in out:
        if e["depth"] == 0 and e.get("present", True) and (e["data"] or e["zero"]):
            start, end = e["start"], e["start"] + e["length"]
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def merge(ranges):
    out: list = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def clip(ranges, start, end):
    out = []
    for a, b in ranges:
        a, b = max(a, start), min(b, end)
        if a < b:
            out.append((a, b))
    return out


def info(path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", path).stdout)


def header_field(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def patch(path, offset, fmt, value) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def set_incompat_bits(path, bits) -> None:
    patch(path, 72, ">Q", header_field(path, 72, ">Q") | bits)


def header_extensions(path) -> list[tuple[int, int, int]]:
    """(position, type, length) of each header extension."""
    version = header_field(path, 4, ">I")
    pos = header_field(path, 100, ">I") if version >= 3 else 72
    out = []
    with open(path, "rb") as f:
        while True:
            f.seek(pos)
            ext_type, length = struct.unpack(">II", f.read(8))
            if ext_type == 0:
                return out
            out.append((pos, ext_type, length))
            pos += 8 + length + (-length % 8)


def random_ops(rng, img, model, count, cs, zero_share=0.3, max_len=None):
    """Random writes and write_zeroes (unaligned, cross-cluster) on `img` and a
    bytes model."""
    size = img.size
    max_len = max_len or 3 * cs
    for _ in range(count):
        if rng.random() < 0.5:   # near a cluster boundary
            offset = rng.randrange(0, size, cs) + rng.choice((0, 0, 1, 511, cs // 2, cs - 1))
            offset = min(offset, size - 1)
        else:
            offset = rng.randrange(size)
        length = rng.randint(1, min(max_len, size - offset))
        if rng.random() < zero_share:
            img.write_zeroes(offset, length)
            model[offset:offset + length] = bytes(length)
        else:
            data = rng.randbytes(length)
            img.write(offset, data)
            model[offset:offset + length] = data


def fill_layers(tmp: Path, cs: int, v2: bool, backing: str | None):
    """A top image (and its backing file) full of interesting clusters, made
    by qemu: partial data, compressed, zero (preallocated and not), data over
    and beyond a shorter backing file, a partial last cluster."""
    clusters = 150 if cs <= 4 * KiB else 20
    size = clusters * cs + 1536
    base_size = 10 * cs + 512          # shorter than the top, not cluster aligned
    c = cs
    backing_name = None
    if backing == "raw":
        backing_name = "base.raw"
        run("qemu-img", "create", "-q", "-f", "raw", tmp / backing_name, base_size)
        qemu_io(tmp / backing_name, f"write -P 0x11 0 {base_size}",
                f"write -P 0x12 {c + 100} {c}", fmt="raw")
    elif backing == "qcow2":
        backing_name = "base.qcow2"
        qemu_create(tmp / backing_name, base_size, cs=cs, v2=v2)
        qemu_io(tmp / backing_name, f"write -c -P 0x13 {2 * c} {c}",
                f"write -P 0x11 0 {2 * c}", f"write -P 0x11 {3 * c} {5 * c}",
                f"write -z {5 * c} {c}",
                f"write -P 0x14 {10 * c} 512")
    top = tmp / "top.qcow2"
    qemu_create(top, size, cs=cs, v2=v2, backing=backing_name, backing_fmt=backing)
    qemu_io(top,
            f"write -P 0x22 {c // 2} {2 * c}",
            f"write -c -P 0x33 {4 * c} {2 * c}",
            f"write -z {7 * c} {c}",
            f"write -P 0x44 {9 * c} {c}",
            f"write -z {9 * c} {c}",
            f"write -z -u {11 * c} {c}",
            f"write -P 0x55 {12 * c + 7} {c}",
            f"write -P 0x66 {size - 700} 700")
    return top


# ----------------------------------------------------------------------
# reading, block status and writing images made by qemu
# ----------------------------------------------------------------------

@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
@pytest.mark.parametrize("v2", [False, True], ids=["v3", "v2"])
@pytest.mark.parametrize("cs", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_qemu_images_read_extents_write(tmp_path, cs, v2, backing):
    top = fill_layers(tmp_path, cs, v2, backing)
    expected = as_raw(top)
    rng = random.Random(f"{cs}{v2}{backing}")

    img = Qcow2Image.open(str(top))
    try:
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        for _ in range(60):
            offset = rng.randrange(img.size)
            length = rng.randint(1, min(5 * cs, img.size - offset))
            assert img.read(offset, length) == expected[offset:offset + length]
            buf = bytearray(b"\xff" * length)       # readinto fills it all, zeroes too
            img.readinto(offset, memoryview(buf))
            assert buf == expected[offset:offset + length]
        buf = bytearray(b"\xff" * img.size)
        img.readinto(0, buf)
        assert buf == expected
        extents = top_extents(top)
        assert list(img.data_extents(0, img.size)) == extents
        for _ in range(10):
            start = rng.randrange(img.size)
            end = rng.randint(start + 1, img.size)
            assert list(img.data_extents(start, end - start)) == clip(extents, start, end)
        with pytest.raises(OSError):
            img.write(0, b"x")
    finally:
        img.close()

    model = bytearray(expected)
    img = Qcow2Image.open(str(top), writable=True)
    try:
        c = cs
        targeted = [
            (4 * c + 100, 50),            # into a compressed cluster
            (5 * c - 10, 20),             # across the end of a compressed cluster
            (7 * c + 3, 10),              # into a zero cluster over backing data
            (9 * c + c // 2, 7),          # into a preallocated zero cluster
            (11 * c + 1, 1),              # into an unmapped zero cluster
            (3 * c + 17, 33),             # into an unallocated cluster over the backing
            (10 * c + 300, 600),          # across the end of the backing file
            (img.size - 100, 100),        # the partial last cluster
            (c - 5, 3 * c + 11),          # across several kinds at once
        ]
        for offset, length in targeted:
            data = rng.randbytes(length)
            img.write(offset, data)
            model[offset:offset + length] = data
        random_ops(rng, img, model, 60, cs)
        assert img.read(0, img.size) == model
    finally:
        img.close()
    assert_clean(top)
    assert_identical(top, model)

    img = Qcow2Image.open(str(top))
    try:
        assert img.read(0, img.size) == model
        assert list(img.data_extents(0, img.size)) == top_extents(top)
    finally:
        img.close()


@pytest.mark.parametrize("cs", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_compressed_image_from_convert(tmp_path, cs):
    source = tmp_path / "source.raw"
    rng = random.Random(cs)
    content = bytearray(3 * MiB + 4 * KiB)
    for _ in range(20):   # compressible runs and incompressible noise
        offset = rng.randrange(len(content) - 64 * KiB)
        length = rng.randint(1, 64 * KiB)
        content[offset:offset + length] = (bytes([rng.randrange(256)]) * length
                                           if rng.random() < 0.5 else rng.randbytes(length))
    source.write_bytes(content)
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cs}", source, image)

    img = Qcow2Image.open(str(image))
    try:
        assert img.read(0, img.size) == content
    finally:
        img.close()
    img = Qcow2Image.open(str(image), writable=True)
    try:
        random_ops(rng, img, content, 40, cs)
    finally:
        img.close()
    assert_clean(image)
    assert_identical(image, content)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 32, 64])
def test_refcount_widths(tmp_path, refcount_bits):
    image = tmp_path / "r.qcow2"
    qemu_create(image, 2 * MiB, cs=4 * KiB, options=[f"refcount_bits={refcount_bits}"])
    model = bytearray(2 * MiB)
    img = Qcow2Image.open(str(image), writable=True)
    try:
        random_ops(random.Random(refcount_bits), img, model, 80, 4 * KiB)
    finally:
        img.close()
    assert_clean(image)
    assert_identical(image, model)


def test_zero_flag_and_freed_clusters(tmp_path):
    """v3 write_zeroes sets the zero flag on whole clusters (never showing the
    backing data again), writes partial clusters as data, and frees the
    clusters of compressed data it drops."""
    cs = 64 * KiB
    qemu_create(tmp_path / "base.qcow2", 1 * MiB, cs=cs)
    qemu_io(tmp_path / "base.qcow2", f"write -P 0x77 0 {1 * MiB}")
    top = tmp_path / "top.qcow2"
    qemu_create(top, 1 * MiB, cs=cs, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, f"write -c -P 0x21 0 {4 * cs}", f"write -P 0x22 {4 * cs} {cs}")
    model = bytearray(as_raw(top))
    img = Qcow2Image.open(str(top), writable=True)
    try:
        img.write_zeroes(100, 6 * cs)           # compressed, data, backing; partial edges
        model[100:100 + 6 * cs] = bytes(6 * cs)
        img.write_zeroes(8 * cs, 2 * cs)        # unallocated over backing data
        model[8 * cs:10 * cs] = bytes(2 * cs)
        assert img.read(0, img.size) == model
    finally:
        img.close()
    assert_clean(top)
    assert_identical(top, model)
    status = json.loads(run("qemu-img", "map", "--output=json", top).stdout)
    zero = merge([(e["start"], e["start"] + e["length"]) for e in status
                  if e["depth"] == 0 and e["zero"] and not e["data"]])
    assert clip(zero, cs, 6 * cs) == [(cs, 6 * cs)]
    assert clip(zero, 8 * cs, 10 * cs) == [(8 * cs, 10 * cs)]
    # the compressed clusters were freed: only the two partial edge clusters
    # (data), the L2 table and the preallocated-zero cluster hold space
    result = check(top)
    assert "0.00% compressed clusters" in result.stdout


# ----------------------------------------------------------------------
# random operations against a bytes model (hypothesis)
# ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("templates")
    out = {}
    for name, cs, v2 in (("v3-4k", 4 * KiB, False), ("v2-512", 512, True)):
        d = tmp / name
        d.mkdir()
        top = fill_layers(d, cs, v2, "qcow2")
        out[name] = (top, cs, as_raw(top))
    return out


_op = st.tuples(st.sampled_from(["write", "write", "zero"]),
                st.floats(0, 1), st.integers(-600, 600), st.integers(1, 20_000))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(["v3-4k", "v2-512"]), ops=st.lists(_op, min_size=1, max_size=25),
       seed=st.integers(0, 2**32))
def test_random_operations_against_model(templates, template, ops, seed):
    top, cs, content = templates[template]
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "top.qcow2"
        shutil.copyfile(top, image)
        patch_backing = top.parent / "base.qcow2"
        run("qemu-img", "rebase", "-u", "-b", patch_backing, "-F", "qcow2", image)
        model = bytearray(content)
        rng = random.Random(seed)
        img = Qcow2Image.open(str(image), writable=True)
        try:
            for kind, where, shift, length in ops:
                offset = min(max(0, int(where * img.size) // cs * cs + shift), img.size - 1)
                length = min(length, img.size - offset)
                if kind == "zero":
                    img.write_zeroes(offset, length)
                    model[offset:offset + length] = bytes(length)
                else:
                    data = rng.randbytes(length)
                    img.write(offset, data)
                    model[offset:offset + length] = data
                probe = rng.randrange(img.size)
                n = min(3 * cs, img.size - probe)
                assert img.read(probe, n) == model[probe:probe + n]
                buf = bytearray(b"\xff" * n)
                img.readinto(probe, buf)
                assert buf == model[probe:probe + n]
        finally:
            img.close()
        assert_clean(image)
        assert_identical(image, model)


# ----------------------------------------------------------------------
# creating
# ----------------------------------------------------------------------

@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
@pytest.mark.parametrize("cs", [512, 64 * KiB])
def test_create(tmp_path, monkeypatch, cs, backing):
    sub = tmp_path / "sub"
    sub.mkdir()
    size = 3 * MiB + 512
    model = bytearray(size)
    name = None
    if backing == "raw":
        name = "base.raw"
        (sub / name).write_bytes(random.Random(1).randbytes(2 * MiB + 100))
        model[:2 * MiB + 100] = (sub / name).read_bytes()
    elif backing == "qcow2":
        name = "base.qcow2"
        qemu_create(sub / name, 4 * MiB, cs=4 * KiB)
        qemu_io(sub / name, f"write -c -P 0x32 {1 * MiB} 64k", f"write -P 0x31 0 {1 * MiB}",
                f"write -P 0x31 {1 * MiB + 64 * KiB} {2 * MiB}")
        model[:] = as_raw(sub / name)[:size]
    path = sub / "new.qcow2"
    img = Qcow2Image.create(str(path), size, cluster_size=cs, backing_file=name,
                            backing_format=backing)
    try:
        assert img.size == size
        assert img.backing_file == name and img.backing_format == backing
        assert img.read(0, size) == model
        assert list(img.data_extents(0, size)) == []
        random_ops(random.Random(cs), img, model, 40, cs, max_len=200 * KiB)
    finally:
        img.close()

    data = info(path)
    assert data["virtual-size"] == size
    assert data["cluster-size"] == cs
    assert data["format-specific"]["data"]["compat"] == "1.1"
    assert data["format-specific"]["data"]["refcount-bits"] == 16
    assert data.get("backing-filename") == name
    assert data.get("backing-filename-format") == backing
    assert_clean(path)
    assert_identical(path, model)

    monkeypatch.chdir(tmp_path)   # a relative image path: its backing is found next to it
    img = Qcow2Image.open("sub/new.qcow2")
    try:
        assert img.read(0, size) == model
        assert list(img.data_extents(0, size)) == top_extents(path)
    finally:
        img.close()


def test_create_rules(tmp_path):
    path = tmp_path / "x.qcow2"
    img = Qcow2Image.create(str(path), 1000)       # rounded up to 512 bytes, like qemu-img
    img.close()
    assert info(path)["virtual-size"] == 1024
    assert_clean(path)
    with pytest.raises(FileExistsError):
        Qcow2Image.create(str(path), 1 * MiB)
    Qcow2Image.create(str(path), 2 * MiB, overwrite=True).close()
    assert info(path)["virtual-size"] == 2 * MiB
    for bad in (1000, 256, 4 * MiB):
        with pytest.raises(UserError, match="cluster size"):
            Qcow2Image.create(str(tmp_path / "y.qcow2"), 1 * MiB, cluster_size=bad)
    with pytest.raises(UserError, match="backing format"):
        Qcow2Image.create(str(tmp_path / "y.qcow2"), 1 * MiB, backing_file="x.qcow2")
    with pytest.raises(UserError, match="does not fit"):
        Qcow2Image.create(str(tmp_path / "y.qcow2"), 1 * MiB, cluster_size=512,
                          backing_file="b" * 900, backing_format="raw")
    with pytest.raises(UserError, match="cannot open backing file"):
        Qcow2Image.create(str(tmp_path / "y.qcow2"), 1 * MiB, backing_file="missing.raw",
                          backing_format="raw")
    assert not (tmp_path / "y.qcow2").exists()
    # an empty image is valid too
    Qcow2Image.create(str(tmp_path / "empty.qcow2"), 0).close()
    assert_clean(tmp_path / "empty.qcow2")


@pytest.mark.parametrize("made_by", ["snapfs", "qemu-img"])
def test_refcount_table_growth(tmp_path, made_by):
    path = tmp_path / "g.qcow2"
    size = 48 * MiB
    if made_by == "snapfs":
        Qcow2Image.create(str(path), size, cluster_size=512).close()
    else:
        qemu_create(path, size, cs=512)
    table_offset = header_field(path, 48, ">Q")
    table_clusters = header_field(path, 56, ">I")
    model = bytearray(size)
    rng = random.Random(7)
    img = Qcow2Image.open(str(path), writable=True)
    try:
        # 512-byte clusters: a refcount block covers 128 KiB of file, one
        # refcount table cluster 8 MiB; write about 20 MiB of data
        for i in range(20):
            offset = i * 2 * MiB + 1234
            data = rng.randbytes(MiB - 99)
            img.write(offset, data)
            model[offset:offset + len(data)] = data
        random_ops(rng, img, model, 200, 512, max_len=20 * KiB)
        img.flush()
    finally:
        img.close()
    assert header_field(path, 56, ">I") > table_clusters
    assert header_field(path, 48, ">Q") != table_offset
    assert_clean(path)
    assert_identical(path, model)


# ----------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------

def test_two_threads_on_distinct_ranges_of_shared_clusters(tmp_path):
    """Two threads write and read interleaved 4 KiB blocks: every 64 KiB
    cluster is allocated (and copied from the backing file) by whichever
    thread comes first, while the other writes another part of it."""
    cs = 64 * KiB
    qemu_create(tmp_path / "base.qcow2", 4 * MiB, cs=cs)
    qemu_io(tmp_path / "base.qcow2", f"write -P 0x5a 0 {3 * MiB}",
            f"write -c -P 0x5b {3 * MiB} {cs}")
    top = tmp_path / "top.qcow2"
    qemu_create(top, 4 * MiB, cs=cs, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, f"write -c -P 0x5c {1 * MiB} {4 * cs}")
    model = bytearray(as_raw(top))
    img = Qcow2Image.open(str(top), writable=True)
    block = 4 * KiB
    blocks = img.size // block
    errors = []

    def worker(parity):
        rng = random.Random(parity)
        try:
            for _ in range(400):
                i = rng.randrange(parity, blocks, 2)
                offset = i * block
                r = rng.random()
                if r < 0.5:
                    data = rng.randbytes(block)
                    img.write(offset, data)
                    model[offset:offset + block] = data
                elif r < 0.6:
                    img.write_zeroes(offset, block)
                    model[offset:offset + block] = bytes(block)
                else:
                    assert img.read(offset, block) == model[offset:offset + block]
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert img.read(0, img.size) == model
    finally:
        img.close()
    assert_clean(top)
    assert_identical(top, model)


def test_reader_follows_a_writer(tmp_path):
    """A read-only instance opened (and its caches filled) before another
    instance writes, as snapfs's snapshot process reads the target the live
    process fills, sees every completed write: new L2 tables, new entries in
    cached tables, zero flags."""
    cs = 4 * KiB
    qemu_create(tmp_path / "base.qcow2", 8 * MiB, cs=cs)
    qemu_io(tmp_path / "base.qcow2", f"write -P 0x42 0 {8 * MiB}")
    path = tmp_path / "target.qcow2"
    writer = Qcow2Image.create(str(path), 8 * MiB, cluster_size=cs,
                               backing_file="base.qcow2", backing_format="qcow2")
    model = bytearray(b"\x42" * (8 * MiB))
    writer.write(0, b"\x01" * cs)
    model[0:cs] = b"\x01" * cs
    reader = Qcow2Image.open(str(path))
    try:
        rng = random.Random(3)
        assert reader.read(0, reader.size) == model      # fills the reader's caches
        for _ in range(300):
            cluster = rng.randrange(reader.size // cs)
            offset = cluster * cs
            if rng.random() < 0.2:
                writer.write_zeroes(offset, cs)
                model[offset:offset + cs] = bytes(cs)
            else:
                data = rng.randbytes(cs)
                writer.write(offset, data)
                model[offset:offset + cs] = data
            assert reader.read(offset, cs) == model[offset:offset + cs]
            probe = rng.randrange(reader.size - 3 * cs)
            assert reader.read(probe, 3 * cs) == model[probe:probe + 3 * cs]
        assert reader.read(0, reader.size) == model
        assert list(reader.data_extents(0, reader.size)) == \
            list(writer.data_extents(0, writer.size))
    finally:
        reader.close()
        writer.close()
    assert_clean(path)
    assert_identical(path, model)


def test_reader_survives_compressed_cluster_freed_under_it(tmp_path):
    """The reader looks a compressed cluster up; before it reads the data the
    writer rewrites the cluster and frees (punches) the old compressed data:
    the reader looks again instead of failing to decompress."""
    path = tmp_path / "c.qcow2"
    qemu_create(path, MiB)
    qemu_io(path, "write -c -P 0x61 0 64k")
    reader = Qcow2Image.open(str(path))
    writer = Qcow2Image.open(str(path), writable=True)
    original = reader._read_compressed
    raced = []

    def racing(entry):
        if not raced:
            raced.append(entry)
            writer.write(0, b"\x62" * 64 * KiB)
            writer.flush()                  # frees and punches the compressed data
        return original(entry)

    reader._read_compressed = racing
    try:
        assert reader.read(0, 64 * KiB) == b"\x62" * 64 * KiB
        assert raced
    finally:
        reader.close()
        writer.close()
    assert_clean(path)


# ----------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------

def _bad_magic(tmp):
    path = tmp / "x.qcow2"
    path.write_bytes(b"QFI\xfa" + bytes(4000))
    return path


def _empty_file(tmp):
    path = tmp / "x.qcow2"
    path.write_bytes(b"")
    return path


def _version(n):
    def make(tmp):
        path = tmp / "x.qcow2"
        qemu_create(path, MiB)
        patch(path, 4, ">I", n)
        return path
    return make


def _aes(tmp):
    path = tmp / "x.qcow2"
    qemu_create(path, MiB)
    patch(path, 32, ">I", 1)
    return path


def _luks(tmp):
    path = tmp / "x.qcow2"
    for _ in range(3):   # qemu-img's PBKDF benchmark fails now and then in containers
        result = run("qemu-img", "create", "-q", "-f", "qcow2", "--object",
                     "secret,id=s0,data=123456", "-o",
                     "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                     path, MiB, ok=(0, 1))
        if result.returncode == 0:
            break
    else:                # a crafted one then: crypt_method 2 (LUKS)
        qemu_create(path, MiB)
        patch(path, 32, ">I", 2)
    assert header_field(path, 32, ">I") == 2
    return path


def _data_file(tmp):
    path = tmp / "x.qcow2"
    qemu_create(path, MiB, options=[f"data_file={tmp / 'x.data'}"])
    return path


def _extended_l2(tmp):
    path = tmp / "x.qcow2"
    qemu_create(path, MiB, options=["extended_l2=on"])
    return path


def _zstd(tmp):
    path = tmp / "x.qcow2"
    try:
        qemu_create(path, MiB, options=["compression_type=zstd"])
    except AssertionError:   # a qemu-img without zstd: set the field by hand
        qemu_create(path, MiB)
        set_incompat_bits(path, 1 << 3)
        patch(path, 104, ">B", 1)
    assert header_field(path, 104, ">B") == 1
    return path


def _incompat_bits(bits):
    def make(tmp):
        path = tmp / "x.qcow2"
        qemu_create(path, MiB)
        qemu_io(path, "write -P 9 0 64k")
        set_incompat_bits(path, bits)
        return path
    return make


def _snapshot(tmp):
    path = tmp / "x.qcow2"
    qemu_create(path, MiB)
    qemu_io(path, "write -P 1 0 128k")
    run("qemu-img", "snapshot", "-c", "snap1", path)
    qemu_io(path, "write -P 2 64k 128k")
    return path


def _no_backing_format(tmp):
    qemu_create(tmp / "base.qcow2", MiB)
    path = tmp / "x.qcow2"
    qemu_create(path, MiB, backing="base.qcow2", backing_fmt="qcow2")
    [(pos, _, _)] = [e for e in header_extensions(path) if e[1] == 0xE2792ACA]
    patch(path, pos, ">I", 0x12345678)    # an unknown extension, ignored
    return path


def _vmdk_backing(tmp):
    run("qemu-img", "create", "-q", "-f", "vmdk", tmp / "base.vmdk", MiB)
    path = tmp / "x.qcow2"
    qemu_create(path, MiB, backing="base.vmdk", backing_fmt="vmdk")
    return path


def _missing_backing(tmp):
    qemu_create(tmp / "base.qcow2", MiB)
    path = tmp / "x.qcow2"
    qemu_create(path, MiB, backing="base.qcow2", backing_fmt="qcow2")
    (tmp / "base.qcow2").unlink()
    return path


def _loop(tmp):
    qemu_create(tmp / "b.qcow2", MiB)
    path = tmp / "x.qcow2"
    qemu_create(path, MiB, backing="b.qcow2", backing_fmt="qcow2")
    run("qemu-img", "rebase", "-u", "-b", "x.qcow2", "-F", "qcow2", tmp / "b.qcow2")
    return path


def _deep_chain(tmp):
    from snapfs.image.qcow2.image import MAX_CHAIN_DEPTH

    qemu_create(tmp / "l0.qcow2", MiB)
    for i in range(1, MAX_CHAIN_DEPTH):     # as deep as we go (made quickly by us)
        Qcow2Image.create(str(tmp / f"l{i}.qcow2"), MiB, backing_file=f"l{i - 1}.qcow2",
                          backing_format="qcow2").close()
    top = tmp / f"l{MAX_CHAIN_DEPTH}.qcow2"     # one too many: qemu-img, without opening it
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", f"l{MAX_CHAIN_DEPTH - 1}.qcow2",
        "-F", "qcow2", top, "1M")
    return top


REFUSALS = [
    # (name, maker, words in the message, refused read-only too)
    ("bad magic", _bad_magic, "not a qcow2 image", True),
    ("empty file", _empty_file, "not a qcow2 image", True),
    ("version 1", _version(1), "version 1 is not supported", True),
    ("version 4", _version(4), "version 4 is not supported", True),
    ("aes", _aes, "encrypted images are not supported", True),
    ("luks", _luks, "encrypted images are not supported", True),
    ("data file", _data_file, "external data file", True),
    ("extended l2", _extended_l2, "extended L2 entries", True),
    ("zstd", _zstd, "compression type zstd is not supported", True),
    ("unknown bit", _incompat_bits(1 << 9), "unknown incompatible features are set: bit 9", True),
    ("corrupt bit", _incompat_bits(1 << 1), "marked corrupt", True),
    ("dirty bit", _incompat_bits(1 << 0), "dirty", False),
    ("snapshots", _snapshot, "internal snapshot", False),
    ("no backing format", _no_backing_format, "no backing format", True),
    ("vmdk backing", _vmdk_backing, "backing format 'vmdk'", True),
    ("missing backing", _missing_backing, "cannot open backing file base.qcow2", True),
    ("backing loop", _loop, "backing chain loop", True),
    ("deep chain", _deep_chain, "deeper than 256", True),
]


@pytest.mark.parametrize("maker, words, read_only_too",
                         [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals(tmp_path, maker, words, read_only_too):
    path = maker(tmp_path)
    modes = [True, False] if read_only_too else [True]
    for writable in modes:
        with pytest.raises(UserError) as caught:
            Qcow2Image.open(str(path), writable=writable)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: "), message
        assert words in message, message
    if not read_only_too:   # read-only still works and shows what qemu shows
        img = Qcow2Image.open(str(path))
        try:
            assert img.read(0, img.size) == as_raw(path)
        finally:
            img.close()


def test_chain_of_sixteen_is_fine(tmp_path):
    qemu_create(tmp_path / "l0.qcow2", MiB)
    qemu_io(tmp_path / "l0.qcow2", "write -P 1 0 4k")
    for i in range(1, 16):
        qemu_create(tmp_path / f"l{i}.qcow2", MiB, backing=f"l{i - 1}.qcow2", backing_fmt="qcow2")
        qemu_io(tmp_path / f"l{i}.qcow2", f"write -P {i + 1} {i * 4096} 4k")
    img = Qcow2Image.open(str(tmp_path / "l15.qcow2"))
    try:
        assert img.read(0, img.size) == as_raw(tmp_path / "l15.qcow2")
        assert list(img.data_extents(0, img.size)) == [(0, 64 * KiB)]
    finally:
        img.close()


def test_bitmaps_are_dropped_cleanly_on_first_write(tmp_path):
    path = tmp_path / "b.qcow2"
    qemu_create(path, MiB)
    run("qemu-img", "bitmap", "--add", path, "bm0")
    qemu_io(path, "write -P 1 0 512k")     # the bitmap gets data clusters
    img = Qcow2Image.open(str(path), writable=True)   # opening alone changes nothing
    img.close()
    assert "bitmaps" in info(path)["format-specific"]["data"]
    model = bytearray(as_raw(path))
    img = Qcow2Image.open(str(path), writable=True)
    try:
        img.write(100, b"x" * 70000)
        model[100:70100] = b"x" * 70000
    finally:
        img.close()
    assert "bitmaps" not in info(path)["format-specific"]["data"]
    assert_clean(path)
    assert_identical(path, model)


# ----------------------------------------------------------------------
# crashes
# ----------------------------------------------------------------------

# about 4 MiB: at 512 B clusters the first pool reservation grows the refcount
# table, at 4 KiB it adds a refcount block
REGIONS, REGION = 40, 100 * KiB
SYSCALLS = ("pwrite", "pwritev", "fdatasync", "ftruncate")


def _workload(path, progress, kill_at=0, trace=None):
    """Write REGIONS distinct regions (some zeroed, a flush now and then),
    reporting each completed one on the `progress` fd. With `kill_at`, SIGKILL
    this process just before its kill_at-th write/sync/truncate call."""
    calls = 0

    def crashing(name, fn):
        def call(*args):
            nonlocal calls
            calls += 1
            if trace is not None:
                trace.append(name)
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args)
        return call

    saved = {name: getattr(os, name) for name in SYSCALLS}
    for name in SYSCALLS:
        setattr(os, name, crashing(name, saved[name]))
    try:
        rng = random.Random(1)
        img = Qcow2Image.open(str(path), writable=True)
        for i in range(REGIONS):
            start = i * REGION
            length = REGION - rng.randrange(0, 700)
            if i % 7 == 3:
                img.write_zeroes(start, length)
            else:
                img.write(start, bytes([i % 251 + 1]) * length)
            if i % 10 == 9:
                img.flush()
            os.write(progress, f"{i} {length}\n".encode())
        img.close()
    finally:
        for name in SYSCALLS:
            setattr(os, name, saved[name])


def _fork_workload(path, kill_at=0, kill_after_regions=None) -> tuple[int, str]:
    """Run the workload in a forked child; return its wait status and progress."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            _workload(path, write_end, kill_at)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    output = b""
    with os.fdopen(read_end, "rb") as progress:
        for line in progress:
            output += line
            if kill_after_regions is not None and output.count(b"\n") == kill_after_regions:
                os.kill(pid, signal.SIGKILL)    # kill -9 from outside, mid-way
                kill_after_regions = None
    _, status = os.waitpid(pid, 0)
    return status, output.decode()


def _verify_after_crash(path, output, before):
    result = check(path)
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr
    done = {}
    for line in output.splitlines():
        i, length = map(int, line.split())
        done[i] = length
    img = Qcow2Image.open(str(path))
    try:
        data = img.read(0, img.size)
    finally:
        img.close()
    for i in range(REGIONS):
        start = i * REGION
        if i in done:       # completed before the crash: there for good
            fill = bytes(done[i]) if i % 7 == 3 else bytes([i % 251 + 1]) * done[i]
            assert data[start:start + done[i]] == fill, i
        elif i > len(done):  # never started: untouched
            assert data[start:start + REGION] == before[start:start + REGION], i


@pytest.mark.parametrize("cs, v2, backing", [(512, False, False), (64 * KiB, False, True),
                                             (4 * KiB, True, True)],
                         ids=["512-v3", "64k-v3-backing", "4k-v2-backing"])
def test_crash_leaves_no_corruption(tmp_path, cs, v2, backing):
    """Kill the writer (SIGKILL) just before its k-th write/sync/truncate
    system call, for k all over the ordering-sensitive parts of the run and
    at random, and once from outside at an arbitrary moment: qemu-img check
    must find leaks at worst, and every completed write must be there."""
    size = REGIONS * REGION
    template = tmp_path / "template.qcow2"
    if backing:
        qemu_create(tmp_path / "base.qcow2", size, cs=cs, v2=v2)
        qemu_io(tmp_path / "base.qcow2", f"write -P 0xee 0 {size // 2}")
        qemu_create(template, size, cs=cs, v2=v2, backing="base.qcow2", backing_fmt="qcow2")
        qemu_io(template, f"write -c -P 0xcc 0 {2 * MiB}")
    else:
        qemu_create(template, size, cs=cs, v2=v2)
    before = as_raw(template)

    # a whole run, tracing the system calls
    full = tmp_path / "full.qcow2"
    shutil.copyfile(template, full)
    calls: list = []
    read_end, write_end = os.pipe()
    try:
        _workload(full, write_end, trace=calls)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert_clean(full)
    if cs == 512:   # the run moved the refcount table
        assert header_field(full, 48, ">Q") != header_field(template, 48, ">Q")

    # every call in a window before each sync or truncate (where pool
    # reservations, refcount table moves, deferred frees and close put their
    # ordered writes) and just after it, plus random ones
    syncs = [k for k, name in enumerate(calls, 1) if name in ("fdatasync", "ftruncate")]
    points = {k + d for k in syncs for d in range(-4, 2) if 1 <= k + d <= len(calls)}
    rng = random.Random(cs)
    points |= set(rng.sample(range(1, len(calls) + 1), 10))
    image = tmp_path / "crash.qcow2"
    for kill_at in sorted(points):
        shutil.copyfile(template, image)
        status, output = _fork_workload(image, kill_at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, kill_at
        _verify_after_crash(image, output, before)

    shutil.copyfile(template, image)
    status, output = _fork_workload(image, kill_after_regions=REGIONS // 2)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    _verify_after_crash(image, output, before)
