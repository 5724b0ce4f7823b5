"""Each workflow page in docs/workflows/ is a sequence of commands; this runs
them as they are written (every ```sh block of a page, in order, in one bash
with -e), in an empty directory, with the snapfs being tested on PATH. A page
whose commands stop working fails here."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import force_unmount, need
from snapfs import mounts

PAGES = sorted((Path(__file__).resolve().parent.parent / "docs" / "workflows").glob("*.md"))


def commands_of(page: Path) -> str:
    return "\n".join(re.findall(r"^```sh\n(.*?)^```", page.read_text(), re.S | re.M))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_workflow_page_runs(tmp_path, page):
    for tool in ("qemu-img", "nbdkit", "nbdcopy", "nbdfuse", "mkfs.ext4"):
        need(tool)
    script = commands_of(page)
    assert script.strip(), f"{page.name} has no commands"
    bin_dir = os.path.dirname(shutil.which("snapfs") or sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PORT=str(free_port()),
               HOST="127.0.0.1")
    try:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{page.name}:\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
    finally:
        left = [m.point for m in mounts.mount_table() if mounts.inside(m.point, str(tmp_path))]
        for point in reversed(left):
            subprocess.run([sys.executable, "-m", "snapfs", "umount", point],
                           capture_output=True, timeout=120)
            if mounts.find_mount(point):
                force_unmount(point)
    assert not left, f"{page.name} left {left} mounted"
