"""`snapfs export`: the snapshot served read-only over NBD by nbdkit, with
holes and zero runs reported through base:allocation, read by nbdinfo,
nbdcopy and qemu-img as another machine would, while the live disk is being
written; the export ends with its snapshot."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import pytest

from conftest import alive, need, random_bytes, run_snapfs, wait_until, write_at

MiB = 1 << 20


def sparse_image(path, size, data_at) -> bytes:
    """An image of holes with random data at the given MiB offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, mib in enumerate(data_at):
            f.seek(mib * MiB)
            f.write(random_bytes(MiB, seed=i))
    return path.read_bytes()


def holes(uri) -> list[tuple[int, int]]:
    """The (start, end) runs nbdinfo --map reports as holes."""
    mapped = json.loads(subprocess.run([need("nbdinfo"), "--map", "--json", uri],
                                       capture_output=True, text=True, check=True).stdout)
    return [(e["offset"], e["offset"] + e["length"]) for e in mapped if e["type"] & 1]


def zero_runs(data: bytes, granularity: int = 64 << 10) -> set[int]:
    return {i for i in range(0, len(data), granularity) if not any(data[i:i + granularity])}


class Writer(threading.Thread):
    """Keeps writing the live disk while the snapshot is read."""

    def __init__(self, path, size):
        super().__init__(daemon=True)
        self.path, self.size = path, size
        self.stop = threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set():
            write_at(self.path, (n * 7919 * 4096) % (self.size - 4096), random_bytes(4096, n))
            n += 1


def exporters(root) -> list[int]:
    """nbdkit processes serving a snapshot below `root` (not another test's)."""
    needle = os.fsencode(str(root))
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
                if b"nbdkit_plugin.py" in cmdline and needle in cmdline:
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("sync", ["none", "full"])
def test_export_over_a_unix_socket_while_the_disk_is_written(tmp_path, mount, sync):
    need("nbdkit")
    size = 32 * MiB
    original = sparse_image(tmp_path / "disk.img", size, [1, 2, 9, 30])
    inst = mount(tmp_path / "disk.img", sync=sync)
    sock = tmp_path / "nbd.sock"
    before = set(exporters(tmp_path))
    shown = run_snapfs("export", inst.snapshot_dir, "--socket", sock).stdout.strip()
    uri = f"nbd+unix:///?socket={sock}"
    assert shown == uri
    writer = Writer(inst.live, size)
    writer.start()
    try:
        if sync == "full":
            inst.wait()
        reported = holes(uri)
        zero = zero_runs(original)
        for start, end in reported:  # a hole is never data
            assert not any(original[start:end]), f"{start}-{end} reported as a hole holds data"
        covered = {c for s, e in reported for c in range(s, e, 64 << 10)}
        assert zero <= covered, "holes of the point-in-time image reported as data"
        subprocess.run([need("nbdcopy"), uri, str(tmp_path / "copy.img")], check=True)
        assert (tmp_path / "copy.img").read_bytes() == original
        assert os.stat(tmp_path / "copy.img").st_blocks * 512 <= 4 * MiB + (1 << 20), \
            "nbdcopy did not skip the holes"
        subprocess.run([need("qemu-img"), "convert", "-f", "raw", "-O", "raw", uri,
                        str(tmp_path / "convert.img")], check=True)
        assert (tmp_path / "convert.img").read_bytes() == original
    finally:
        writer.stop.set()
        writer.join()
    mine = set(exporters(tmp_path)) - before
    assert mine, "no nbdkit serving"
    run_snapfs("release", inst.snapshot_dir)  # in use by the export: it ends first
    assert wait_until(lambda: not any(alive(pid) for pid in mine))
    assert not sock.exists()
    inst.umount()


def test_export_on_a_tcp_port_of_a_qcow2_overlay(tmp_path, mount):
    need("nbdkit")
    qemu_img = need("qemu-img")
    base = tmp_path / "base.raw"
    sparse_image(base, 16 * MiB, [0, 5])
    overlay = tmp_path / "vm.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    str(overlay)], check=True, cwd=tmp_path)
    subprocess.run([need("qemu-io"), "-c", "write -P 0x5a 8M 1M", str(overlay)], check=True,
                   capture_output=True)
    subprocess.run([qemu_img, "convert", "-O", "raw", str(overlay), str(tmp_path / "pit.raw")],
                   check=True)
    original = (tmp_path / "pit.raw").read_bytes()
    inst = mount(overlay, sync="top", extra=["--format", "qcow2", "--target-format", "qcow2"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = run_snapfs("export", inst.snapshot_dir, "--port", port).stdout.strip()
    assert uri == f"nbd://127.0.0.1:{port}/"
    write_at(inst.live, 8 * MiB, b"after" * 1000)
    write_at(inst.live, 12 * MiB, b"into a hole")
    reported = holes(uri)
    assert any(s <= 12 * MiB and 13 * MiB <= e for s, e in reported), \
        "a hole of the point-in-time image, written since, must stay a hole"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "raw", uri,
                    str(tmp_path / "copy.raw")], check=True)
    assert (tmp_path / "copy.raw").read_bytes() == original
    inst.umount()  # ends the export with everything else
    result = subprocess.run([need("nbdinfo"), uri], capture_output=True)
    assert result.returncode != 0


def test_export_refusals(tmp_path, mount):
    inst = mount(write_image_of(tmp_path), sync="none")
    for args, expect in (([inst.live_dir, "--socket", tmp_path / "a.sock"], "not a snapshot"),
                         ([inst.snapshot_dir, "--socket", tmp_path / "no" / "a.sock"],
                          "directory does not exist"),
                         ([inst.snapshot_dir, "--socket", tmp_path / "disk.img"],
                          "exists already"),
                         ([tmp_path, "--socket", tmp_path / "b.sock"], "not a snapfs mount")):
        result = run_snapfs("export", *args, check=False)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert expect in result.stderr, result.stderr
    result = run_snapfs("export", inst.snapshot_dir, "--port", "70000", check=False)
    assert result.returncode == 2 and "bad port" in result.stderr
    inst.umount()


def write_image_of(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(random_bytes(MiB, seed=3))
    return path
