"""The fault-injection layer itself (tests/faultfs.py, tests/faults.py):
a faithful pass-through, faults exactly when commanded and none after
`clear`, delays that hold up nobody else, nothing left mounted."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

import pytest

from conftest import is_mounted, random_bytes, read_at
from faults import FailingImage, faulty_dir
from snapfs.image.raw import RawImage

KiB = 1024
MiB = 1 << 20


@pytest.fixture
def fs(tmp_path):
    with faulty_dir(tmp_path) as faulty:
        yield faulty
    assert not is_mounted(faulty.path)
    assert faulty.process.poll() is not None


def pwrite(path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def expect_errno(code: int, call, *args):
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == code, info.value
    return info.value


def test_pass_through_matches_a_plain_file(fs, tmp_path):
    reference = tmp_path / "reference.img"
    reference.write_bytes(random_bytes(3 * MiB + 12345, seed=1))
    image = fs.path / "disk.img"
    subprocess.run(["dd", f"if={reference}", f"of={image}", "bs=1M", "status=none"], check=True)
    subprocess.run(["cmp", reference, image], check=True)
    subprocess.run(["cmp", reference, fs.backing / "disk.img"], check=True)
    # overwrite in place, at odd offsets, both ways
    patch = random_bytes(70_000, seed=2)
    for offset in (0, 4095, MiB + 1, 3 * MiB + 12345 - 70_000):
        for target in (reference, image):
            pwrite(target, patch, offset)
    subprocess.run(["dd", f"if={reference}", f"of={image}", "bs=64k", "skip=3", "seek=3",
                    "count=5", "conv=notrunc", "status=none"], check=True)
    subprocess.run(["cmp", reference, image], check=True)
    subprocess.run(["cmp", reference, fs.backing / "disk.img"], check=True)
    assert read_at(image, 3 * MiB + 12345 - 50, 100) == reference.read_bytes()[-50:]

    # setattr: truncate, mode, times
    os.truncate(image, MiB)
    assert os.stat(image).st_size == MiB == os.stat(fs.backing / "disk.img").st_size
    os.chmod(image, 0o600)
    assert os.stat(fs.backing / "disk.img").st_mode & 0o777 == 0o600
    os.utime(image, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(image).st_mtime_ns == 2_000_000_000
    with open(image, "r+b") as f:
        f.truncate(10)
    assert (fs.backing / "disk.img").read_bytes() == reference.read_bytes()[:10]

    # names: create, rename over, unlink, directories, readdir, statfs
    (fs.path / "other").write_bytes(b"other")
    os.rename(fs.path / "other", fs.path / "disk.img")
    assert (fs.path / "disk.img").read_bytes() == b"other"
    os.mkdir(fs.path / "dir")
    (fs.path / "dir" / "f").write_bytes(b"inside")
    os.rename(fs.path / "dir", fs.path / "dir2")
    assert (fs.path / "dir2" / "f").read_bytes() == b"inside"
    assert sorted(os.listdir(fs.path)) == ["dir2", "disk.img"]
    os.unlink(fs.path / "dir2" / "f")
    os.rmdir(fs.path / "dir2")
    assert os.listdir(fs.backing) == ["disk.img"]
    with open(fs.path / "disk.img", "rb+") as f:
        os.fsync(f.fileno())
        os.fdatasync(f.fileno())
    assert os.statvfs(fs.path).f_blocks == os.statvfs(fs.backing).f_blocks
    # an open file stays usable after unlink
    fd = os.open(fs.path / "disk.img", os.O_RDWR)
    try:
        os.unlink(fs.path / "disk.img")
        os.pwrite(fd, b"!", 0)
        assert os.pread(fd, 5, 0) == b"!ther"
        assert os.fstat(fd).st_size == 5
    finally:
        os.close(fd)
    assert os.listdir(fs.path) == []
    assert "faultfs" in subprocess.run(["mount"], capture_output=True, text=True).stdout


def test_write_fails_with_the_errno_until_clear(fs):
    f = fs.path / "a.img"
    f.write_bytes(bytes(8192))
    fs.fail("write", errno.EIO)
    expect_errno(errno.EIO, pwrite, f, b"x" * 4096, 0)
    expect_errno(errno.EIO, pwrite, f, b"x", 8000)
    assert (fs.backing / "a.img").read_bytes() == bytes(8192), "a failed write wrote nothing"
    fs.clear()
    pwrite(f, b"y" * 4096, 0)
    assert (fs.backing / "a.img").read_bytes()[:4097] == b"y" * 4096 + b"\0"
    stats = fs.stats()["write"]
    assert stats["failed"] == 2 and stats["calls"] >= 3
    assert fs.rules() == []


def test_write_fails_after_n_calls_and_at_most_count_times(fs):
    f = fs.path / "a.img"
    f.write_bytes(b"")
    fs.fail("write", "ENOSPC", after=3, count=2)
    fd = os.open(f, os.O_WRONLY)
    try:
        results = []
        for i in range(7):
            try:
                os.pwrite(fd, b"%d" % i * 4096, i * 4096)
                results.append("ok")
            except OSError as e:
                results.append(errno.errorcode[e.errno])
    finally:
        os.close(fd)
    assert results == ["ok"] * 3 + ["ENOSPC"] * 2 + ["ok"] * 2
    data = (fs.backing / "a.img").read_bytes()
    assert data[3 * 4096:5 * 4096] == bytes(8192) and data[5 * 4096:] == b"5" * 4096 + b"6" * 4096
    assert fs.rules()[0]["hits"] == 2


def test_write_fails_only_at_offsets_reached(fs):
    f = fs.path / "a.img"
    f.write_bytes(bytes(64 * KiB))
    fs.fail("write", errno.EIO, offset=32 * KiB)
    pwrite(f, b"a" * 4096, 0)
    pwrite(f, b"b" * 4096, 28 * KiB)  # ends exactly at the offset: passes
    expect_errno(errno.EIO, pwrite, f, b"d", 60 * KiB)
    # one that crosses it: the kernel splits it at the page; the part that
    # reaches the offset fails (a short write, or EIO if nothing was written)
    fd = os.open(f, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"c" * 4096, 30 * KiB) == 2048
    except OSError as e:
        assert e.errno == errno.EIO
        os.pwrite(fd, b"c" * 2048, 30 * KiB)
    finally:
        os.close(fd)
    data = (fs.backing / "a.img").read_bytes()
    assert data[:4096] == b"a" * 4096 and data[28 * KiB:30 * KiB] == b"b" * 2048
    assert data[30 * KiB:32 * KiB] == b"c" * 2048
    assert data[32 * KiB:] == bytes(32 * KiB)


def test_faults_match_names_only(fs):
    for name in ("target.img", "target.img.snapfs", "disk.img"):
        (fs.path / name).write_bytes(bytes(4096))
    fs.fail("write", errno.EIO, name="target.img")
    fs.fail("fsync", errno.EIO, name="disk.*")
    expect_errno(errno.EIO, pwrite, fs.path / "target.img", b"x", 0)
    pwrite(fs.path / "target.img.snapfs", b"x", 0)
    pwrite(fs.path / "disk.img", b"x", 0)
    fd = os.open(fs.path / "disk.img", os.O_RDWR)
    try:
        expect_errno(errno.EIO, os.fsync, fd)
        expect_errno(errno.EIO, os.fdatasync, fd)
    finally:
        os.close(fd)
    with open(fs.path / "target.img", "rb+") as f:
        os.fsync(f.fileno())
    fs.clear()
    fd = os.open(fs.path / "disk.img", os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_read_fails_even_when_cached(fs):
    f = fs.path / "disk.img"
    data = random_bytes(256 * KiB, seed=3)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 0) == data  # now in the page cache
        fs.fail("read", errno.EIO, name="disk.img", offset=128 * KiB)
        assert os.pread(fd, 4096, 0) == data[:4096]
        expect_errno(errno.EIO, os.pread, fd, 4096, 200 * KiB)
        fs.clear()
        assert os.pread(fd, 4096, 200 * KiB) == data[200 * KiB:204 * KiB]
        fs.fail("read", errno.EIO)
        expect_errno(errno.EIO, os.pread, fd, 10, 0)
    finally:
        os.close(fd)
    assert fs.stats()["read"]["failed"] >= 2


def test_other_ops_fail_on_command(fs):
    (fs.path / "f").write_bytes(b"data")
    fs.fail("open", errno.EACCES, name="f")
    expect_errno(errno.EACCES, open, fs.path / "f", "rb")
    fs.clear()
    fs.fail("create", errno.ENOSPC)
    expect_errno(errno.ENOSPC, open, fs.path / "g", "wb")
    fs.fail(["unlink", "rename"], errno.EROFS)
    expect_errno(errno.EROFS, os.unlink, fs.path / "f")
    expect_errno(errno.EROFS, os.rename, fs.path / "f", fs.path / "h")
    fs.fail("statfs", errno.EIO)
    expect_errno(errno.EIO, os.statvfs, fs.path)
    fs.fail("setattr", errno.EPERM, name="f")
    expect_errno(errno.EPERM, os.truncate, fs.path / "f", 0)
    fs.fail("flush", errno.EIO, name="f")
    f = open(fs.path / "f", "rb")
    expect_errno(errno.EIO, f.close)
    fs.clear()
    assert (fs.path / "f").read_bytes() == b"data"
    with pytest.raises(ValueError, match="bad op"):
        fs.fail("nonsense", errno.EIO)
    with pytest.raises(ValueError, match="offset"):
        fs.fail("fsync", errno.EIO, offset=5)


def test_a_delayed_call_holds_up_nobody_else(fs):
    (fs.path / "slow").write_bytes(bytes(4096))
    (fs.path / "fast").write_bytes(bytes(4096))
    fs.delay("write", 0.6, name="slow")
    times = {}

    def slow_writer():
        start = time.monotonic()
        pwrite(fs.path / "slow", b"s" * 4096, 0)
        times["slow"] = time.monotonic() - start

    thread = threading.Thread(target=slow_writer)
    thread.start()
    time.sleep(0.1)
    start = time.monotonic()
    for i in range(20):
        pwrite(fs.path / "fast", b"f" * 4096, 0)
        assert read_at(fs.path / "fast", 0, 4096) == b"f" * 4096
        os.stat(fs.path / "slow")
        os.listdir(fs.path)
    assert time.monotonic() - start < 0.4, "others waited for the delayed write"
    assert (fs.backing / "slow").read_bytes() == bytes(4096), "delayed: not written yet"
    thread.join(5)
    assert 0.55 <= times["slow"] < 3
    assert (fs.backing / "slow").read_bytes() == b"s" * 4096
    assert fs.stats()["write"]["delayed"] == 1


def test_a_hung_call_goes_on_at_clear(fs):
    (fs.path / "disk.img").write_bytes(bytes(4096))
    fs.hang("fsync", name="disk.img")
    done = threading.Event()

    def syncer():
        fd = os.open(fs.path / "disk.img", os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        done.set()

    thread = threading.Thread(target=syncer)
    thread.start()
    assert not done.wait(0.3), "a hung fsync returned"
    fs.clear()
    assert done.wait(3)
    thread.join()


def test_delay_then_fail(fs):
    (fs.path / "a").write_bytes(bytes(4096))
    fs.delay("write", 0.2, count=1)
    fs.fail("write", errno.EIO, count=1)
    start = time.monotonic()
    expect_errno(errno.EIO, pwrite, fs.path / "a", b"x", 0)
    assert time.monotonic() - start >= 0.2
    pwrite(fs.path / "a", b"x", 0)


def test_teardown_with_a_hung_reader_leaves_nothing(tmp_path):
    with faulty_dir(tmp_path, name="hung") as faulty:
        (faulty.path / "f").write_bytes(b"data")
        faulty.hang("read")
        results = []

        def reader():
            try:
                results.append(read_at(faulty.path / "f", 0, 4))
            except OSError as e:
                results.append(e.errno)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        time.sleep(0.2)
        assert not results
    thread.join(5)
    assert results and not thread.is_alive()
    assert not is_mounted(faulty.path)
    assert faulty.process.returncode is not None


def test_teardown_after_the_test_failed_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with faulty_dir(tmp_path) as faulty:
            fd = os.open(faulty.path / "f", os.O_CREAT | os.O_RDWR)
            1 / 0
    # still held when it ended: after a second, the process was stopped
    expect_errno(errno.ENOTCONN, os.close, fd)
    assert not is_mounted(faulty.path) and faulty.process.poll() is not None


# --- FailingImage -----------------------------------------------------------

def test_failing_image_fails_the_nth_call(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(random_bytes(64 * KiB, seed=4))
    inner = RawImage.open(str(path), writable=True)
    image = FailingImage(inner, "write", nth=2, errno="ENOSPC", count=2)
    try:
        assert image.size == 64 * KiB and image.fd == inner.fd
        image.write(0, b"1")
        for _ in range(2):
            expect_errno(errno.ENOSPC, image.write, 1, b"2")
        image.write(2, b"3")
        assert image.read(0, 3) == b"1" + path.read_bytes()[1:2] + b"3"
        assert image.calls["write"] == 4 and image.failures == 2
        forever = FailingImage(inner, "flush", count=None)
        for _ in range(3):
            expect_errno(errno.EIO, forever.flush)
        reads = FailingImage(inner, "readinto", nth=1)
        expect_errno(errno.EIO, reads.readinto, 0, memoryview(bytearray(10)))
        buffer = bytearray(10)
        reads.readinto(0, memoryview(buffer))
        assert bytes(buffer) == path.read_bytes()[:10]
    finally:
        image.close()
