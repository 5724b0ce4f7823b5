"""Failed writes in the qcow2 driver: a file system that fills up (a small
tmpfs) and injected EIO. Whatever fails, the image stays consistent, every
write that completed is there, and once close() has run (and could write)
`qemu-img check` finds nothing at all: no corruption and no leaks.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from snapfs.image.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(autouse=True)
def _need_qemu():
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.fail("qemu-img and qemu-io not found: install qemu-utils; these tests use "
                    "them as the oracle")


def run(*args, ok=(0,)) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert result.returncode in ok, f"{args}: {result.stdout}{result.stderr}"
    return result


def check(path) -> subprocess.CompletedProcess:
    return run("qemu-img", "check", path, ok=(0, 1, 2, 3))


def assert_clean(path) -> None:
    result = check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout, result.stdout


def as_raw(path) -> bytes:
    """The guest view of an image, according to qemu-img."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.raw"
        run("qemu-img", "convert", "-O", "raw", path, out)
        return out.read_bytes()


class Model:
    """The guest view as it must be: bytes, and which of them a failed
    operation may or may not have changed."""

    def __init__(self, content: bytes):
        self.data = bytearray(content)
        self.unknown = bytearray(len(content))

    def apply(self, offset: int, data: bytes | None, length: int, ok: bool) -> None:
        if ok:
            self.data[offset:offset + length] = data if data is not None else bytes(length)
            self.unknown[offset:offset + length] = bytes(length)
        else:
            self.unknown[offset:offset + length] = b"\x01" * length

    def assert_matches(self, actual: bytes) -> None:
        assert len(actual) == len(self.data)
        known = self.unknown.translate(_KNOWN_MASK)        # 0xff where known
        for start in range(0, len(actual), MiB):
            mask = int.from_bytes(known[start:start + MiB], "big")
            if (int.from_bytes(actual[start:start + MiB], "big") & mask
                    != int.from_bytes(self.data[start:start + MiB], "big") & mask):
                bad = next(i for i in range(start, start + MiB) if not self.unknown[i]
                           and actual[i] != self.data[i])
                raise AssertionError(f"wrong content at byte {bad}")


_KNOWN_MASK = bytes([0xFF]) + bytes(255)


# ----------------------------------------------------------------------
# a file system that fills up
# ----------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs, unmounted afterwards whatever happens."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", mount_point],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (these tests need root): {result.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", mount_point], capture_output=True)


@pytest.mark.parametrize("cs, chunk, backing", [
    (64 * KiB, MiB, False),         # whole clusters, 16 at a time
    (64 * KiB, 100_000, True),      # partial clusters: copy-on-write from the backing file
    (4 * KiB, 100_000, False),
    (512, 3000, False),             # new refcount blocks and a moved refcount table
], ids=["64k-1M", "64k-partial-backing", "4k-partial", "512-partial"])
def test_enospc_leaves_a_clean_image(tmp_path, small_fs, cs, chunk, backing):
    size = 64 * MiB
    backing_file = backing_format = None
    content = bytes(size)
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, size)
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size // 2}", base)
        backing_file, backing_format = str(base), "qcow2"
        content = as_raw(base)
    path = small_fs / "target.qcow2"
    model = Model(content)
    rng = random.Random(cs + chunk)
    img = Qcow2Image.create(str(path), size, cluster_size=cs, backing_file=backing_file,
                            backing_format=backing_format)
    try:
        offset = 0
        failures = 0
        while failures < 20 and offset < size:
            # mostly new data at the end, now and then an earlier range again
            # (in place once allocated) or zeroes
            if rng.random() < 0.8:
                where, length = offset, min(chunk, size - offset)
                offset += length
            else:
                where = rng.randrange(0, max(1, offset))
                length = min(chunk, size - where)
            if rng.random() < 0.1:
                data = None
                try:
                    img.write_zeroes(where, length)
                    ok = True
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    ok = False
            else:
                data = rng.randbytes(length)
                try:
                    img.write(where, data)
                    ok = True
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    ok = False
            model.apply(where, data, length, ok)
            failures += not ok
            if rng.random() < 0.05:
                img.flush()
        assert failures, "the file system never filled up"
        img.flush()
    finally:
        img.close()
    assert_clean(path)
    model.assert_matches(as_raw(path))


# ----------------------------------------------------------------------
# EIO at each write, sync and truncate in turn
# ----------------------------------------------------------------------

SYSCALLS = ("pwrite", "pwritev", "fdatasync", "ftruncate")
REGIONS, REGION = 36, 100 * KiB


class Failing:
    """Make the k-th call of the write/sync/truncate system calls fail with
    EIO (the call does nothing); count and name them all."""

    def __init__(self, monkeypatch, fail_at: int = 0):
        self.calls: list[str] = []
        self.fail_at = fail_at
        for name in SYSCALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def call(*args):
            self.calls.append(name)
            if len(self.calls) == self.fail_at:
                raise OSError(errno.EIO, f"injected EIO in {name}")
            return real(*args)
        return call


def _workload(path: Path, model: Model) -> bool:
    """Writes, zeroes, rewrites and flushes over the image, each failure
    noted in the model; returns whether close() succeeded."""
    rng = random.Random(5)
    img = Qcow2Image.open(str(path), writable=True)
    try:
        for i in range(REGIONS):
            start = i * REGION + rng.randrange(0, 700)
            length = REGION - rng.randrange(0, 1400)
            if i % 7 == 3:
                data = None
                call = lambda: img.write_zeroes(start, length)   # noqa: E731
            else:
                data = bytes([i % 251 + 1]) * length
                call = lambda: img.write(start, data)           # noqa: E731
            try:
                call()
                ok = True
            except OSError as e:
                assert e.errno == errno.EIO, e
                ok = False
            model.apply(start, data, length, ok)
            if i % 5 == 4:    # and again, in place, over part of an earlier region
                again = (i - 2) * REGION + 5000
                try:
                    img.write(again, b"\xee" * 9000)
                    ok = True
                except OSError:
                    ok = False
                model.apply(again, b"\xee" * 9000, 9000, ok)
            if i % 10 == 9:
                try:
                    img.flush()
                except OSError:
                    pass
    finally:
        try:
            img.close()
        except OSError:
            return False
    return True


@pytest.mark.parametrize("cs, v2, backing, every", [
    (512, False, False, 7),          # pool refills add refcount blocks and move the table
    (64 * KiB, False, True, 1),      # copy-on-write from the backing file, compressed data
    (4 * KiB, True, True, 2),
], ids=["512-v3", "64k-v3-backing", "4k-v2-backing"])
def test_eio_anywhere_leaves_a_clean_image(tmp_path, monkeypatch, cs, v2, backing, every):
    """Fail the k-th write/sync/truncate call with EIO, for k all over a run:
    the failed operation may or may not have happened, everything else has,
    and after close the image is clean, without leaks."""
    size = REGIONS * REGION
    template = tmp_path / "template.qcow2"
    compat = "compat=0.10" if v2 else "compat=1.1"
    opts = ["-o", f"cluster_size={cs},{compat}"]
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", *opts, base, size)
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xdd 0 {size // 2}", base)
        run("qemu-img", "create", "-q", "-f", "qcow2", *opts, "-b", "base.qcow2", "-F", "qcow2",
            template, size)
        run("qemu-io", "-f", "qcow2", "-c", f"write -c -P 0xcc 0 {MiB}", template)
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", *opts, template, size)
    before = as_raw(template)

    image = tmp_path / "image.qcow2"
    shutil.copyfile(template, image)
    with monkeypatch.context() as m:
        counting = Failing(m)
        assert _workload(image, Model(before))
    total = len(counting.calls)
    assert_clean(image)

    # every call around the syncs and truncates (where pool refills, table
    # moves, frees and close put their ordered writes), every `every`-th one
    # elsewhere
    points = set(range(1, total + 1, every))
    points |= {k + d for k, name in enumerate(counting.calls, 1)
               if name in ("fdatasync", "ftruncate") for d in range(-4, 2) if 1 <= k + d <= total}
    for fail_at in sorted(points):
        shutil.copyfile(template, image)
        model = Model(before)
        with monkeypatch.context() as m:
            failing = Failing(m, fail_at)
            closed = _workload(image, model)
        where = f"EIO at call {fail_at} ({failing.calls[fail_at - 1]})"
        result = check(image)
        assert "ERROR" not in result.stdout + result.stderr, where + result.stdout
        if closed:
            assert result.returncode == 0, where + result.stdout
        else:      # close itself failed: leaks at worst
            assert result.returncode in (0, 3), where + result.stdout
        img = Qcow2Image.open(str(image))
        try:
            actual = img.read(0, img.size)
        finally:
            img.close()
        try:
            model.assert_matches(actual)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None
