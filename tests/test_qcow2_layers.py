"""Opening a qcow2 image as the snapshot process does: through
/proc/self/fd/N (its backing file found in a directory given apart), and
one layer alone, without its backing file."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from snapfs.image import open_image
from snapfs.image.qcow2 import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(autouse=True)
def _need_qemu():
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.fail("qemu-img and qemu-io not found: install qemu-utils")


def run(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@pytest.fixture
def chain(tmp_path):
    """base.qcow2 (0x11 everywhere) under top.qcow2 (0x22 in its second 64 KiB)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", MiB)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {MiB}", tmp_path / "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        tmp_path / "top.qcow2", MiB)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 64k 64k", "-c", "write -z 128k 64k",
        tmp_path / "top.qcow2")
    return tmp_path / "top.qcow2"


def test_backing_dir_for_an_image_opened_by_descriptor(chain):
    fd = os.open(chain, os.O_RDONLY)
    try:
        by_fd = f"/proc/self/fd/{fd}"
        with pytest.raises(Exception, match="cannot open backing file base.qcow2"):
            Qcow2Image.open(by_fd)           # looked for in /proc/self/fd
        for img in (Qcow2Image.open(by_fd, backing_dir=str(chain.parent)),
                    open_image(by_fd, "qcow2", backing_dir=str(chain.parent))):
            try:
                assert img.read(0, 4096) == b"\x11" * 4096
                assert img.read(64 * KiB, 4096) == b"\x22" * 4096
                assert img.backing is not None
            finally:
                img.close()
    finally:
        os.close(fd)


def test_one_layer_without_its_backing_file(chain):
    (chain.parent / "base.qcow2").rename(chain.parent / "elsewhere.qcow2")   # not needed
    for img in (Qcow2Image.open(str(chain), with_backing=False),
                open_image(str(chain), "qcow2", with_backing=False)):
        try:
            assert img.backing is None and img.backing_file == "base.qcow2"
            assert img.read(64 * KiB, 64 * KiB) == b"\x22" * 64 * KiB    # its own data
            assert img.read(128 * KiB, 64 * KiB) == bytes(64 * KiB)      # its zero cluster
            assert list(img.data_extents(0, MiB)) == [(64 * KiB, 192 * KiB)]
            for offset, length in ((0, 4096), (60 * KiB, 8 * KiB), (300 * KiB, 1)):
                with pytest.raises(OSError) as caught:        # from the backing file
                    img.read(offset, length)
                assert caught.value.errno == errno.EIO
        finally:
            img.close()
    with pytest.raises(ValueError):
        Qcow2Image.open(str(chain), writable=True, with_backing=False)


def test_one_layer_without_backing_file_name_reads_zeroes(tmp_path):
    """An image without a backing file reads as before without it."""
    path = tmp_path / "x.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, MiB)
    img = Qcow2Image.open(str(path), with_backing=False)
    try:
        assert img.read(0, MiB) == bytes(MiB)
    finally:
        img.close()


def test_a_raw_backing_file_is_the_file_that_was_checked(tmp_path, monkeypatch):
    """The raw backing file is read through the descriptor opened and checked
    while the chain is opened: a file renamed over its name right after that
    check (a race, played here from inside the check) is not what the image
    reads."""
    (tmp_path / "base.raw").write_bytes(b"\x11" * MiB)
    (tmp_path / "other.raw").write_bytes(b"\x99" * MiB)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
        tmp_path / "top.qcow2", MiB)
    from snapfs.image.qcow2 import image as qcow2_image

    real_fstat = os.fstat
    swapped = []

    def fstat_then_swap(fd):
        st = real_fstat(fd)
        if not swapped and os.path.samestat(st, os.stat(tmp_path / "base.raw")):
            os.replace(tmp_path / "other.raw", tmp_path / "base.raw")
            swapped.append(True)
        return st

    monkeypatch.setattr(qcow2_image.os, "fstat", fstat_then_swap)
    image = open_image(str(tmp_path / "top.qcow2"), "qcow2")
    monkeypatch.undo()
    try:
        assert swapped, "the race was not played"
        assert image.read(0, 64 * KiB) == b"\x11" * (64 * KiB)
    finally:
        image.close()
