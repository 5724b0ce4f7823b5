"""End to end: the real `snapfs` command, real FUSE mounts, dd and cmp as a
user would run them. The oracle is a plain copy of the image taken before
mounting plus a bytes model of the writes."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import SNAPFS, alive, assert_nothing_left_beside, fill, is_mounted, random_bytes, run_snapfs, tmpfs, wait_until, \
    write_image

MiB = 1 << 20
CLUSTER = 64 << 10


def dd(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["dd", "status=none", *map(str, args)], capture_output=True, text=True)


def cmp(a, b) -> bool:
    return subprocess.run(["cmp", str(a), str(b)], capture_output=True).returncode == 0


def write_through(path, offset: int, data: bytes, model: bytearray) -> None:
    """Write with dd at a byte offset, and apply the same to the model."""
    src = path.parent.parent / f"chunk-{offset}"
    src.write_bytes(data)
    result = dd(f"if={src}", f"of={path}", "bs=1", "count=0")  # open only: must not truncate
    assert result.returncode == 0, result.stderr
    result = dd(f"if={src}", f"of={path}", f"bs={len(data)}", f"seek={offset}",
                "oflag=seek_bytes", "conv=notrunc,fsync")
    assert result.returncode == 0, result.stderr
    model[offset:offset + len(data)] = data


WRITES = [  # (offset, length): unaligned, across clusters, at both ends of the disk
    (0, 512),
    (CLUSTER - 100, 300),
    (3 * MiB + 17, 200_000),
    (5 * MiB, MiB),
    (8 * MiB - 4096, 4096),
]
WRITTEN = [(offset, offset + length) for offset, length in WRITES]


def data_extents(path) -> list[tuple[int, int]]:
    from snapfs.image.raw import RawImage

    image = RawImage.open(str(path))
    try:
        return list(image.data_extents(0, image.size))
    finally:
        image.close()


def copymap_info(path) -> dict:
    """The description in a copy map's header."""
    from snapfs.backup.copymap import CopyMap

    copymap = CopyMap.open(str(path))
    try:
        return copymap.info
    finally:
        copymap.close()


def clusters_of(extents, cluster=CLUSTER) -> set[int]:
    return {c for start, end in extents for c in range(start // cluster, -(-end // cluster))}


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_snapshot_keeps_old_data_live_gets_new(tmp_path, mount, sync):
    original = random_bytes(8 * MiB, seed=1)
    source = write_image(tmp_path / "disk.img", original)
    if sync == "top":  # leave holes: only the first 2 MiB and 6-7 MiB hold data
        with open(source, "r+b") as f:
            for start, end in ((2 * MiB, 6 * MiB), (7 * MiB, 8 * MiB)):
                f.seek(start)
                f.write(bytes(end - start))
        subprocess.run(["fallocate", "--dig-holes", str(source)], check=True)
        original = source.read_bytes()
    copy = tmp_path / "before-mount.img"
    copy.write_bytes(original)
    model = bytearray(original)
    allocated = clusters_of(data_extents(source))

    inst = mount(source, sync=sync)
    assert inst.live.stat().st_size == len(original)
    assert inst.snapshot.stat().st_size == len(original)
    for offset, length in WRITES:
        write_through(inst.live, offset, random_bytes(length, seed=offset), model)
        assert cmp(inst.snapshot, copy), "snapshot changed after a write"
    assert inst.live.read_bytes() == bytes(model)
    assert cmp(inst.snapshot, copy)

    info = inst.status()
    assert info["sync"] == sync
    assert info["clusters_copied_by_writes"] <= len(clusters_of(WRITTEN))
    assert info["error"] is None
    if sync == "none":
        result = inst.wait(check=False)
        assert result.returncode != 0 and "nothing to wait for" in result.stderr
        assert info["clusters_copied_by_writes"] == len(clusters_of(WRITTEN))
    else:
        inst.wait()
        info = inst.status()
        assert info["state"] == "completed"
        assert info["bytes_done"] == info["bytes_total"]
    inst.umount()

    assert source.read_bytes() == bytes(model), "SOURCE must hold every write"
    if sync == "full":
        assert cmp(inst.target, copy), "FULL: the target alone is the point-in-time image"
        assert info["bytes_total"] == len(original)
    elif sync == "top":
        assert len(allocated) == 3 * MiB // CLUSTER
        assert info["bytes_total"] == len(allocated) * CLUSTER
        target = inst.target.read_bytes()
        for c in allocated:
            assert target[c * CLUSTER:(c + 1) * CLUSTER] == original[c * CLUSTER:(c + 1) * CLUSTER]
        stored = clusters_of(data_extents(inst.target))
        assert stored <= allocated | clusters_of(WRITTEN), "TOP copied a hole"
        assert stored, "TOP copied nothing"
    else:
        target = inst.target.read_bytes()
        stored = clusters_of(data_extents(inst.target))
        assert stored <= clusters_of(WRITTEN), "NONE stored clusters nobody wrote"
        for c in clusters_of(WRITTEN):
            assert target[c * CLUSTER:(c + 1) * CLUSTER] == original[c * CLUSTER:(c + 1) * CLUSTER]


def test_zero_clusters_stay_holes_in_target(tmp_path, mount):
    data = bytearray(random_bytes(4 * MiB, seed=2))
    data[MiB:3 * MiB] = bytes(2 * MiB)  # written zeroes, allocated in the source
    source = write_image(tmp_path / "disk.img", bytes(data))
    inst = mount(source, sync="full")
    inst.wait()
    inst.umount()
    assert inst.target.read_bytes() == bytes(data)
    stored = clusters_of(data_extents(inst.target))
    assert stored and not stored & set(range(MiB // CLUSTER, 3 * MiB // CLUSTER))


def test_live_file_behaves_like_a_file(tmp_path, mount):
    original = random_bytes(4 * MiB, seed=3)
    source = write_image(tmp_path / "disk.img", original)
    copy = tmp_path / "copy.img"
    copy.write_bytes(original)
    inst = mount(source, sync="none", cluster_size="4K")
    model = bytearray(original)

    # read-after-write, unaligned, across clusters, fsync and fdatasync
    fd = os.open(inst.live, os.O_RDWR)
    try:
        for offset, length in ((1, 1), (4095, 2), (10_000, 70_000), (4 * MiB - 3, 3)):
            data = random_bytes(length, seed=offset)
            assert os.pwrite(fd, data, offset) == length
            model[offset:offset + length] = data
            assert os.pread(fd, length, offset) == data
        os.fsync(fd)
        os.fdatasync(fd)
        # writes past the end: short up to the end, ENOSPC beyond it
        assert os.pwrite(fd, b"abcdef", 4 * MiB - 2) == 2
        model[4 * MiB - 2:] = b"ab"
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x", 4 * MiB)
        assert err.value.errno == 28  # ENOSPC
    finally:
        os.close(fd)
    assert inst.live.read_bytes() == bytes(model)

    # dd without conv=notrunc opens with O_TRUNC: size and data stay
    block = random_bytes(8192, seed=99)
    (tmp_path / "block").write_bytes(block)
    result = dd(f"if={tmp_path / 'block'}", f"of={inst.live}", "bs=8192")
    assert result.returncode == 0, result.stderr
    model[:8192] = block
    assert inst.live.stat().st_size == len(original)
    assert inst.live.read_bytes() == bytes(model)

    # size changes are refused and change nothing
    for size in (0, 100, 8 * MiB):
        result = subprocess.run(["truncate", "-s", str(size), str(inst.live)],
                                capture_output=True, text=True)
        assert result.returncode != 0
        assert "Operation not permitted" in result.stderr
    os.truncate(inst.live, len(original))  # the same size is fine
    # fallocate cannot pass through: fails cleanly, nothing changes
    for args in (["-l", str(8 * MiB)], ["--punch-hole", "-o", "0", "-l", str(MiB)],
                 ["--zero-range", "-o", "0", "-l", str(MiB)]):
        result = subprocess.run(["fallocate", *args, str(inst.live)], capture_output=True)
        assert result.returncode != 0
    assert inst.live.stat().st_size == len(original)
    assert inst.live.read_bytes() == bytes(model)
    assert inst.snapshot.read_bytes() == original
    inst.umount()
    assert source.read_bytes() == bytes(model)


def test_snapshot_is_read_only(tmp_path, mount):
    original = random_bytes(MiB, seed=4)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="none")
    snap = inst.snapshot
    with pytest.raises(OSError) as err:
        os.open(snap, os.O_WRONLY)
    assert err.value.errno == 30  # EROFS
    refusals = [["dd", "if=/dev/zero", f"of={snap}", "bs=4k", "count=1", "conv=notrunc"],
                ["truncate", "-s", "0", str(snap)],
                ["chmod", "666", str(snap)],
                ["rm", "-f", str(snap)],
                ["touch", str(snap)],
                ["mv", str(snap), str(snap) + ".x"]]
    for command in refusals:
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode != 0, command
        assert "Read-only file system" in result.stderr or "Permission" in result.stderr, result.stderr
    assert snap.read_bytes() == original
    assert snap.stat().st_mode & 0o777 == 0o444
    assert os.listdir(inst.snapshot_dir) == ["disk.img"]
    inst.umount()
    assert source.read_bytes() == original


def test_cancel_keeps_snapshot_valid(tmp_path, mount):
    original = random_bytes(32 * MiB, seed=5)
    source = write_image(tmp_path / "disk.img", original)
    copy = tmp_path / "copy.img"
    copy.write_bytes(original)
    inst = mount(source, sync="full", speed="2M")
    assert inst.status()["state"] == "running"
    run_snapfs("cancel", inst.live_dir)
    info = inst.status()
    assert info["state"] == "cancelled"
    assert info["bytes_done"] < info["bytes_total"]
    result = inst.wait(check=False)
    assert result.returncode != 0 and "cancelled" in result.stderr
    again = run_snapfs("cancel", inst.live_dir, check=False)
    assert again.returncode != 0 and "nothing to cancel" in again.stderr
    # copy-before-write goes on after a cancel
    model = bytearray(original)
    write_through(inst.live, 20 * MiB + 5, random_bytes(3 * MiB, seed=6), model)
    assert cmp(inst.snapshot, copy)
    assert inst.status()["clusters_copied_by_writes"] > 0
    inst.umount()
    assert source.read_bytes() == bytes(model)


def test_speed_limits_the_background_copy(tmp_path, mount):
    """The limit holds from the first byte: at any time t after the start the
    job has copied at most RATE * t (it used to copy 8 MiB at once)."""
    source = write_image(tmp_path / "disk.img", random_bytes(32 * MiB, seed=7))
    started = time.monotonic()
    inst = mount(source, sync="full", speed="1M")
    samples = []
    while time.monotonic() - started < 3:
        info = inst.status()
        samples.append((time.monotonic() - started, info["bytes_done"]))
        time.sleep(0.2)
    assert info["speed"] == MiB
    assert info["state"] == "running" and info["bytes_done"] < info["bytes_total"]
    for elapsed, done in samples:
        assert done <= MiB * elapsed, f"{done} bytes copied after {elapsed:.2f} s at 1 MiB/s"
    assert samples[-1][1] > 0, "the copy did not move at all"
    inst.umount()


def test_zero_length_write_copies_nothing(tmp_path, mount):
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=17))
    inst = mount(source, sync="none")
    fd = os.open(inst.live, os.O_WRONLY)
    try:
        for offset in (0, 100, CLUSTER + 7, MiB - 1):
            assert os.pwrite(fd, b"", offset) == 0
    finally:
        os.close(fd)
    assert inst.status()["clusters_copied_by_writes"] == 0
    assert data_extents(inst.target) == []
    inst.umount()


@pytest.mark.parametrize("how", ["rename", "delete"])
def test_source_renamed_or_deleted_while_mounted(tmp_path, mount, how):
    """The instance works on its open files, never on SOURCE's path: renaming
    or deleting the path changes nothing (it used to take both mounts down)."""
    original = random_bytes(4 * MiB, seed=18)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="full", speed="2M")
    keep = os.open(source, os.O_RDONLY)  # to read what a deleted SOURCE holds
    try:
        moved = tmp_path / "moved.img"
        if how == "rename":
            source.rename(moved)
        else:
            source.unlink()
        for path in (inst.live, inst.snapshot):
            assert path.stat().st_size == len(original)
            assert sorted(os.listdir(path.parent)) == ["disk.img"]
        model = bytearray(original)
        write_through(inst.live, 3 * MiB + 5, random_bytes(70_000, seed=19), model)
        os.utime(inst.live, (1_000_000, 2_000_000))
        assert inst.live.stat().st_mtime == 2_000_000
        assert inst.live.read_bytes() == bytes(model)
        assert inst.snapshot.read_bytes() == original
        assert inst.status()["error"] is None
        inst.wait()
        inst.umount()
        assert os.pread(keep, len(original) + 1, 0) == bytes(model)
        if how == "rename":
            assert moved.read_bytes() == bytes(model)
        assert inst.target.read_bytes() == original
    finally:
        os.close(keep)


def test_status_into_a_closed_pipe(tmp_path, mount):
    """`snapfs status LIVE | head -1`: a reader that went away is no error
    worth a traceback."""
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=20))
    inst = mount(source, sync="none")
    for extra in ([], ["--json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before snapfs writes a byte
        try:
            result = subprocess.run([*SNAPFS, "status", str(inst.live_dir), *extra],
                                    stdout=write_end, stderr=subprocess.PIPE, text=True)
        finally:
            os.close(write_end)
        assert result.stderr == "", result.stderr
    inst.umount()


def test_fusermount_of_the_live_mount_stops_everything(tmp_path, mount):
    original = random_bytes(4 * MiB, seed=8)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="full", speed="1M")
    with open(inst.live, "r+b") as f:
        f.write(b"new data")
    subprocess.run(["fusermount3", "-u", str(inst.live_dir)], check=True)
    assert wait_until(lambda: not is_mounted(inst.live_dir) and not is_mounted(inst.snapshot_dir))
    assert wait_until(lambda: not any(alive(pid) for pid in inst.pids)), "processes still running"
    assert source.read_bytes()[:8] == b"new data"
    target = inst.target.read_bytes()
    assert target[:CLUSTER] == original[:CLUSTER], "TARGET flushed with the old data"
    assert_nothing_left_beside(source)  # the FULL did not complete: no checkpoint


def test_fusermount_of_a_snapshot_releases_it_alone(tmp_path, mount):
    """Unmounting a snapshot by hand is a release: its target is flushed with
    the old data, its copy-before-write stops, the live disk goes on."""
    original = random_bytes(4 * MiB, seed=8)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="full", speed="1M")
    with open(inst.live, "r+b") as f:
        f.write(b"new data")
    subprocess.run(["fusermount3", "-u", str(inst.snapshot_dir)], check=True)
    assert wait_until(lambda: not alive(inst.pids[1])), "the snapshot process still runs"
    assert wait_until(lambda: inst.live_status()["snapshots"] == [])
    assert inst.target.read_bytes()[:CLUSTER] == original[:CLUSTER], "TARGET flushed"
    with open(inst.live, "r+b") as f:  # no snapshot: straight to SOURCE
        f.seek(2 * MiB)
        f.write(b"more")
    assert alive(inst.pids[0]) and is_mounted(inst.live_dir)
    assert copymap_info(inst.target.with_name("target.img.snapfs"))["state"] == "cancelled"
    inst.umount()
    data = source.read_bytes()
    assert data[:8] == b"new data" and data[2 * MiB:2 * MiB + 4] == b"more"


def test_foreground_mount(tmp_path):
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=9))
    live, snap = tmp_path / "live", tmp_path / "snap"
    live.mkdir()
    snap.mkdir()
    process = subprocess.Popen(
        [*SNAPFS, "mount", str(source), str(live), str(snap),
         "--target", str(tmp_path / "t.img"), "--foreground"],
        stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        while "serving" not in line:
            assert line, "foreground mount exited before serving"
            line = process.stderr.readline()
        assert (live / "disk.img").read_bytes() == source.read_bytes()
        run_snapfs("umount", live)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for path in (live, snap):
            if is_mounted(path):
                subprocess.run(["fusermount3", "-u", "-z", str(path)])


def test_loop_mounted_file_system(tmp_path, mount):
    """The everyday use: a file system image changed through the live disk
    while the snapshot, loop-mounted read-only, still shows the old files."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("before\n")
    source = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(source), "32M"], check=True)
    inst = mount(source, sync="full", speed="8M")
    point = tmp_path / "point"
    point.mkdir()
    mounted = False
    try:
        subprocess.run(["mount", "-o", "loop", str(inst.live), str(point)], check=True)
        mounted = True
        (point / "hello.txt").write_text("after\n")
        (point / "new.txt").write_text("new\n")
        subprocess.run(["umount", str(point)], check=True)
        mounted = False
        subprocess.run(["mount", "-o", "loop,ro", str(inst.snapshot), str(point)], check=True)
        mounted = True
        assert (point / "hello.txt").read_text() == "before\n"
        assert not (point / "new.txt").exists()
        subprocess.run(["umount", str(point)], check=True)
        mounted = False
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(point)])
    assert inst.status()["clusters_copied_by_writes"] > 0
    inst.wait()
    inst.umount()
    subprocess.run(["mount", "-o", "loop,ro", str(inst.target), str(point)], check=True)
    try:
        assert (point / "hello.txt").read_text() == "before\n"
    finally:
        subprocess.run(["umount", str(point)], check=True)
    subprocess.run(["mount", "-o", "loop,ro", str(source), str(point)], check=True)
    try:
        assert (point / "hello.txt").read_text() == "after\n"
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_qemu_img_reads_the_snapshot(tmp_path, mount):
    need_qemu = subprocess.run(["qemu-img", "--version"], capture_output=True)
    assert need_qemu.returncode == 0, "qemu-img missing (scripts/test installs qemu-utils)"
    original = random_bytes(4 * MiB, seed=10)
    source = write_image(tmp_path / "disk.img", original)
    copy = tmp_path / "copy.img"
    copy.write_bytes(original)
    inst = mount(source, sync="none")
    with open(inst.live, "r+b") as f:
        f.seek(MiB)
        f.write(random_bytes(MiB, seed=11))
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(inst.snapshot),
                             str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(inst.live),
                             str(copy)], capture_output=True, text=True)
    assert result.returncode == 1, "qemu-img sees the write on the live disk"
    inst.umount()


def test_daemon_killed(tmp_path, mount):
    """kill -9 of the daemon: the snapshot process follows, and `snapfs umount`
    clears the dead live mount and says what happened."""
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=12))
    inst = mount(source, sync="none")
    os.kill(inst.pids[0], 9)
    assert wait_until(lambda: not is_mounted(inst.snapshot_dir)), "snapshot mount left"
    assert wait_until(lambda: not any(alive(pid) for pid in inst.pids))
    result = run_snapfs("umount", inst.live_dir, check=False)
    assert result.returncode == 1
    assert "daemon had died" in result.stderr
    assert not is_mounted(inst.live_dir)


def test_chmod_chown_refused_touch_allowed(tmp_path, mount):
    source = write_image(tmp_path / "disk.img", random_bytes(MiB, seed=13))
    inst = mount(source, sync="none")
    for command in (["chmod", "600", str(inst.live)], ["chown", "1:1", str(inst.live)]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr
    subprocess.run(["touch", "-d", "2001-02-03 04:05:06", str(inst.live)], check=True)
    assert source.stat().st_mtime == inst.live.stat().st_mtime
    assert __import__("time").gmtime(source.stat().st_mtime).tm_year == 2001
    inst.umount()


def test_mounts_outlive_idle_worker_threads(tmp_path, mount):
    """trio ends idle worker threads after 10 s; the snapshot process must not
    take that for the end of the live process (regression: it used
    PR_SET_PDEATHSIG, which fires when the thread that started it ends)."""
    original = random_bytes(MiB, seed=14)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="none")
    __import__("time").sleep(13)
    assert is_mounted(inst.snapshot_dir)
    assert inst.snapshot.read_bytes() == original
    inst.umount()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB file system for targets that run out of space."""
    with tmpfs(tmp_path / "small", "2m") as point:
        yield point


def test_full_target_fails_writes_not_the_snapshot(tmp_path, mount, small_fs):
    """When the old data cannot be saved, the write fails and SOURCE keeps the
    old data; the background copy ends as failed with the reason."""
    original = random_bytes(8 * MiB, seed=15)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="none", target=small_fs / "t.img")
    model = bytearray(original)
    fd = os.open(inst.live, os.O_WRONLY)
    failed_at = None
    try:
        for offset in range(0, 8 * MiB, CLUSTER):
            data = random_bytes(CLUSTER, seed=offset)
            try:
                os.pwrite(fd, data, offset)
            except OSError as e:
                assert e.errno == 28  # ENOSPC
                failed_at = offset
                break
            model[offset:offset + CLUSTER] = data
    finally:
        os.close(fd)
    assert failed_at is not None, "the 2 MiB target never filled up"
    assert inst.live.read_bytes() == bytes(model)
    assert inst.snapshot.read_bytes() == original
    inst.umount()
    assert source.read_bytes() == bytes(model)

    for path in small_fs.iterdir():
        path.unlink()
    inst = mount(source, sync="full", target=small_fs / "t2.img", name="m2")
    result = inst.wait(check=False)
    assert result.returncode == 1 and "No space left" in result.stderr, result.stderr
    info = inst.status()
    assert info["state"] == "failed" and "No space left" in info["error"]
    assert inst.snapshot.read_bytes() == bytes(model)
    inst.umount()

    # no room even for the copy map: refused in one line, nothing left behind
    for path in small_fs.iterdir():
        path.unlink()
    fill(small_fs)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]
    (tmp_path / "m3" / "live").mkdir(parents=True)
    (tmp_path / "m3" / "snap").mkdir()
    result = run_snapfs("mount", source, tmp_path / "m3" / "live", tmp_path / "m3" / "snap",
                        "--target", small_fs / "t3.img", "--cluster-size", "4K", check=False)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "No space left" in result.stderr, result.stderr
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]
    assert not is_mounted(tmp_path / "m3" / "live") and not is_mounted(tmp_path / "m3" / "snap")


def test_sigterm_stops_cleanly(tmp_path, mount):
    """SIGTERM to the daemon is an orderly stop: both mounts gone, SOURCE
    holding the writes, the copy map recording how the job ended."""
    original = random_bytes(32 * MiB, seed=16)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="full", speed="1M")
    with open(inst.live, "r+b") as f:
        f.write(b"after")
    os.kill(inst.pids[0], 15)
    assert wait_until(lambda: not any(alive(pid) for pid in inst.pids))
    assert not is_mounted(inst.live_dir) and not is_mounted(inst.snapshot_dir)
    assert source.read_bytes()[:5] == b"after"
    assert inst.target.read_bytes()[:CLUSTER] == original[:CLUSTER]
    info = copymap_info(tmp_path / "m" / "target.img.snapfs")
    assert info["state"] == "cancelled" and info["bytes_done"] < info["bytes_total"]
