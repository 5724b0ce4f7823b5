"""`snapfs mount --foreground` as a systemd service of Type=notify: READY=1 on
$NOTIFY_SOCKET once the mounts serve, a clean stop on SIGTERM (snapshots
released, targets flushed, nothing left mounted), STOPPING=1 on the way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from conftest import SNAPFS, force_unmount, is_mounted, random_bytes, write_at, write_image

MiB = 1 << 20


def test_ready_and_stopping_on_the_notify_socket(tmp_path):
    source = write_image(tmp_path / "disk.img", random_bytes(4 * MiB, seed=1))
    original = source.read_bytes()
    live, snap = tmp_path / "live", tmp_path / "snap"
    live.mkdir()
    snap.mkdir()
    address = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(address)
    manager.settimeout(60)
    process = subprocess.Popen(
        [*SNAPFS, "mount", str(source), str(live), str(snap), "--target",
         str(tmp_path / "t.img"), "--sync", "none", "--foreground"],
        env=dict(os.environ, NOTIFY_SOCKET=address), stderr=subprocess.DEVNULL)
    try:
        message = manager.recv(4096).decode().split("\n")
        assert "READY=1" in message and f"MAINPID={process.pid}" in message, message
        assert (live / "disk.img").stat().st_size == len(original)  # serving by then
        write_at(live / "disk.img", 0, b"after")
        assert (snap / "disk.img").read_bytes() == original
        process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in manager.recv(4096).decode().split("\n")
        assert process.wait(timeout=60) == 0
        assert not is_mounted(live) and not is_mounted(snap)
        assert (tmp_path / "t.img").read_bytes()[:64 << 10] == original[:64 << 10]
        assert source.read_bytes()[:5] == b"after"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for point in (live, snap):
            if is_mounted(point):
                force_unmount(point)
        manager.close()

