"""qcow2 sources and targets end to end: the `snapfs` command, real mounts,
and qemu-img / qemu-io as the independent oracle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import alive, is_mounted, random_bytes, run_snapfs, wait_until, write_image

MiB = 1 << 20
CLUSTER = 64 << 10


def qemu(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([*map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: {result.stdout}{result.stderr}")
    return result


def qemu_io(image, *commands, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    qemu(*args, image)


def to_raw(image, out):
    qemu("qemu-img", "convert", "-O", "raw", image, out)
    return out


def check_clean(image):
    result = qemu("qemu-img", "check", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def identical(a, b, fa="qcow2", fb="raw") -> bool:
    result = qemu("qemu-img", "compare", "-f", fa, "-F", fb, a, b, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def qemu_map(image) -> list[dict]:
    return json.loads(qemu("qemu-img", "map", "--output=json", image).stdout)


def top_layer_data(image) -> set[int]:
    """Clusters holding data stored in `image` itself (depth 0, not zero)."""
    clusters = set()
    for entry in qemu_map(image):
        if entry["depth"] == 0 and entry["data"]:
            start, end = entry["start"], entry["start"] + entry["length"]
            clusters.update(range(start // CLUSTER, -(-end // CLUSTER)))
    return clusters


@pytest.fixture
def overlay(tmp_path):
    """base.raw (random) <- top.qcow2 with data, zero and untouched areas."""
    write_image(tmp_path / "base.raw", random_bytes(32 * MiB, seed=1))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         tmp_path / "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -P 0xaa 1M 3M", "write -z 8M 1M",
            "write -P 0xbb 20M 64k", "write -P 0xcc 30M 100k")
    return tmp_path / "top.qcow2"


def write_live(path, offset, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


WRITES = [(0, 4096), (2 * MiB - 10, 20), (8 * MiB + 4096, 8192), (12 * MiB, MiB),
          (31 * MiB, 70_000)]


def test_top_on_a_qcow2_overlay(tmp_path, mount, overlay):
    pit = to_raw(overlay, tmp_path / "pit.raw")
    top_before = top_layer_data(overlay)
    inst = mount(overlay, sync="top", extra=["--format", "qcow2"],
                 target=tmp_path / "target.qcow2")
    assert inst.snapshot.read_bytes() == pit.read_bytes()
    model = bytearray(pit.read_bytes())
    for offset, length in WRITES:
        data = random_bytes(length, seed=offset)
        write_live(inst.live, offset, data)
        model[offset:offset + length] = data
    assert inst.snapshot.read_bytes() == pit.read_bytes()
    assert inst.live.read_bytes() == bytes(model)
    inst.wait()
    info = inst.status()
    inst.umount()

    target = inst.target
    check_clean(target)
    check_clean(overlay)
    details = json.loads(qemu("qemu-img", "info", "--output=json", target).stdout)
    assert details["backing-filename"] == "base.raw"
    assert details["backing-filename-format"] == "raw"
    assert identical(target, pit)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(bytes(model))
    assert identical(overlay, expected)
    # TARGET holds the top layer plus what writes forced out, never the base
    written = {c for o, n in WRITES for c in range(o // CLUSTER, -(-(o + n) // CLUSTER))}
    stored = top_layer_data(target)
    assert stored <= top_before | written
    assert top_before <= stored
    zero_map = [e for e in qemu_map(target) if e["depth"] == 0 and e["zero"]]
    assert zero_map, "the top layer's zero clusters are zero clusters in TARGET"
    assert info["bytes_total"] == (len(top_before) + 16) * CLUSTER


def test_full_with_a_qcow2_target_is_standalone(tmp_path, mount, overlay):
    pit = to_raw(overlay, tmp_path / "pit.raw")
    inst = mount(overlay, sync="full", extra=["--format", "qcow2"],
                 target=tmp_path / "full.qcow2")
    write_live(inst.live, 5 * MiB, random_bytes(2 * MiB, seed=2))
    inst.wait()
    inst.umount()
    details = json.loads(qemu("qemu-img", "info", "--output=json", inst.target).stdout)
    assert "backing-filename" not in details
    check_clean(inst.target)
    assert identical(inst.target, pit)
    # all-zero clusters are zero clusters, not data
    assert not top_layer_data(inst.target) & set(range(8 * MiB // CLUSTER, 9 * MiB // CLUSTER))


def test_raw_source_qcow2_target_and_qcow2_source_raw_target(tmp_path, mount):
    original = random_bytes(8 * MiB, seed=3)
    source = write_image(tmp_path / "disk.img", original)
    inst = mount(source, sync="full", extra=["--target-format", "qcow2"],
                 target=tmp_path / "t.qcow2", name="a")
    write_live(inst.live, 3 * MiB, random_bytes(MiB, seed=4))
    inst.wait()
    inst.umount()
    check_clean(inst.target)
    pit = write_image(tmp_path / "pit.raw", original)
    assert identical(inst.target, pit)

    qcow = tmp_path / "disk.qcow2"
    qemu("qemu-img", "convert", "-O", "qcow2", pit, qcow)
    inst = mount(qcow, sync="full", extra=["--format", "qcow2", "--target-format", "raw"],
                 target=tmp_path / "t.raw", name="b")
    write_live(inst.live, 0, random_bytes(MiB, seed=5))
    inst.wait()
    inst.umount()
    assert inst.target.read_bytes() == original
    check_clean(qcow)


def test_none_target_is_backed_by_the_source(tmp_path, mount, overlay):
    pit = to_raw(overlay, tmp_path / "pit.raw")
    inst = mount(overlay, sync="none", extra=["--format", "qcow2"],
                 target=tmp_path / "none.qcow2")
    write_live(inst.live, MiB, random_bytes(MiB, seed=6))
    assert inst.snapshot.read_bytes() == pit.read_bytes()
    inst.umount()
    details = json.loads(qemu("qemu-img", "info", "--output=json", inst.target).stdout)
    assert details["backing-filename"] == "top.qcow2"
    assert details["backing-filename-format"] == "qcow2"
    check_clean(inst.target)
    assert top_layer_data(inst.target) == set(range(MiB // CLUSTER, 2 * MiB // CLUSTER))


def test_writes_to_a_qcow2_source_match_qemu(tmp_path, mount):
    """Unaligned writes through the live disk into data, zero, compressed and
    unallocated (backing) clusters: qemu-img sees the same bytes."""
    base = write_image(tmp_path / "base.raw", random_bytes(16 * MiB, seed=7))
    plain = tmp_path / "plain.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base,
         "-F", "raw", plain)
    qemu_io(plain, "write -P 0x11 0 2M", "write -z 4M 1M")
    source = tmp_path / "src.qcow2"
    qemu("qemu-img", "convert", "-c", "-O", "qcow2", "-B", base, "-F", "raw", plain, source)
    model = bytearray(to_raw(source, tmp_path / "before.raw").read_bytes())
    inst = mount(source, sync="none", extra=["--format", "qcow2"])
    for offset, length in [(1000, 5000), (2 * MiB - 3, 7), (4 * MiB + 100, 300_000),
                           (10 * MiB, 2 * MiB + 5)]:
        data = random_bytes(length, seed=offset)
        write_live(inst.live, offset, data)
        model[offset:offset + length] = data
    assert inst.snapshot.read_bytes() == (tmp_path / "before.raw").read_bytes()
    inst.umount()
    check_clean(source)
    expected = write_image(tmp_path / "expected.raw", bytes(model))
    assert identical(source, expected)


def test_kill_9_during_writes_leaves_no_corruption(tmp_path, mount, overlay):
    inst = mount(overlay, sync="full", extra=["--format", "qcow2"], speed="4M",
                 target=tmp_path / "k.qcow2")
    stop = threading.Event()

    def writer():
        fd = os.open(inst.live, os.O_WRONLY)
        offset = 0
        try:
            while not stop.is_set():
                os.pwrite(fd, random_bytes(70_000, seed=offset), offset % (30 * MiB))
                offset += 1_234_567
        except OSError:
            pass  # the daemon is gone
        try:
            os.close(fd)
        except OSError:
            pass

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1.5)
    for pid in inst.pids:
        os.kill(pid, signal.SIGKILL)
    stop.set()
    thread.join()
    assert wait_until(lambda: not any(alive(pid) for pid in inst.pids))
    subprocess.run(["fusermount3", "-u", "-z", str(inst.live_dir)], capture_output=True)
    subprocess.run(["fusermount3", "-u", "-z", str(inst.snapshot_dir)], capture_output=True)
    for image in (overlay, inst.target):
        result = qemu("qemu-img", "check", image, check=False)
        assert result.returncode in (0, 3), f"{image}: {result.stdout}{result.stderr}"
        assert "ERROR" not in result.stdout and "corrupt" not in result.stdout.lower()


def refuse_mount(tmp_path, source, *extra, expect):
    for name in ("live", "snap"):
        (tmp_path / name).mkdir(exist_ok=True)
    before = sorted(os.listdir(tmp_path))
    content = source.read_bytes()
    result = run_snapfs("mount", source, tmp_path / "live", tmp_path / "snap", "--target",
                        tmp_path / "t.img", *extra, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapfs: ") and expect in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == before
    assert source.read_bytes() == content
    assert not is_mounted(tmp_path / "live") and not is_mounted(tmp_path / "snap")


def test_a_qcow2_file_is_never_taken_for_raw_silently(tmp_path, mount, overlay):
    refuse_mount(tmp_path, overlay, expect="starts with the qcow2 magic")
    inst = mount(overlay, sync="none", extra=["--format", "raw"])
    assert inst.live.read_bytes() == overlay.read_bytes()  # the file's own bytes
    inst.umount()


@pytest.mark.parametrize("problem, expect", [
    ("dirty", "dirty"),
    ("snapshot", "snapshot"),
    ("encrypted", "encrypt"),
    ("corrupt", "corrupt"),
])
def test_refused_qcow2_features_before_mounting(tmp_path, problem, expect):
    image = tmp_path / "bad.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", image, "4M")
    if problem == "snapshot":
        qemu("qemu-img", "snapshot", "-c", "snap1", image)
    else:
        with open(image, "r+b") as f:
            if problem == "encrypted":
                f.seek(32)  # crypt_method
                f.write((1).to_bytes(4, "big"))
            else:
                f.seek(72)  # incompatible features
                f.write((1 if problem == "dirty" else 2).to_bytes(8, "big"))
    refuse_mount(tmp_path, image, "--format", "qcow2", expect=expect)
