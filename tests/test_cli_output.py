"""What the commands print for people: the version, the progress of a copy
on a terminal (and nothing when stdout is not one)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import tomllib
from pathlib import Path

from conftest import SNAPFS, random_bytes, run_snapfs, write_image

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def test_version():
    shown = run_snapfs("--version").stdout.strip()
    with open(ROOT / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert shown == f"snapfs {version}"


def on_a_terminal(*args) -> str:
    """Run snapfs with stdout on a pseudo-terminal; what it wrote there."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([*SNAPFS, *map(str, args)], stdout=follower,
                                   stderr=subprocess.PIPE)
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the other end is closed
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=120) == 0, process.stderr.read()
    finally:
        os.close(leader)
    return output.decode()


def test_wait_shows_progress_on_a_terminal_only(tmp_path, mount):
    source = write_image(tmp_path / "disk.img", random_bytes(12 * MiB, seed=1))
    inst = mount(source, sync="full", speed="4M")
    shown = on_a_terminal("wait", inst.snapshot_dir)
    updates = [u for u in re.split(r"\r\x1b\[K", shown) if u]
    assert len(updates) >= 3, shown  # updated in place while the copy runs
    for update in updates[:-1]:
        assert re.fullmatch(r" *\d+% [\d.]+ \w?i?B of 12\.0 MiB(, [\d.]+ \w?i?B/s)?"
                            r"(, \d+ s left)?", update), update
    assert updates[-1].startswith("100% 12.0 MiB of 12.0 MiB") and updates[-1].endswith("\r\n")
    assert any("/s" in u and "left" in u for u in updates), "rate and time left never shown"
    inst.umount()

    inst = mount(source, sync="full", speed="8M", name="m2")
    assert on_a_terminal("wait", "--quiet", inst.snapshot_dir) == ""
    inst.umount()
    inst = mount(source, sync="full", speed="8M", name="m3")
    assert run_snapfs("wait", inst.snapshot_dir).stdout == ""  # not a terminal
    status = run_snapfs("status", inst.snapshot_dir).stdout
    assert re.search(r"copied: +\d+% .* of 12\.0 MiB", status), status
    inst.umount()


def test_commands_import_no_daemon_and_no_qcow2_driver():
    """A command's start-up is most of what `snapfs snapshot` and `snapfs
    wait` cost (docs/performance.md): the command line imports neither trio,
    pyfuse3, nor the qcow2 driver, which is loaded when a qcow2 image is opened."""
    probe = ("import sys, snapfs.cli.main, snapfs.image as image; "
             "heavy = [m for m in ('trio', 'pyfuse3', 'snapfs.image.qcow2') if m in sys.modules]; "
             "image._driver('qcow2'); "
             "print(heavy, 'snapfs.image.qcow2' in sys.modules)")
    out = subprocess.run([SNAPFS[0], "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    assert " ".join(out) == "[] True"
