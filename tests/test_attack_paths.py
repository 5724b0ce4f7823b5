"""Hostile tests: odd paths, and SOURCE's state directory renamed while
mounted. Guards (they pass now)."""

from __future__ import annotations

import os
import signal
import subprocess

from conftest import alive, assert_nothing_left_beside, is_mounted, random_bytes, wait_until
from test_attack_common import MiB, env, snapfs, status, write_at  # noqa: F401


def test_names_with_dashes_newlines_tabs_escapes_and_bad_bytes(env):
    """SOURCE `-d x.img`, LIVE `-l ive\\n\\040x` (a newline, and what looks
    like a mountinfo escape), SNAPSHOT `-s nap\\t\\xff`, TARGET `-t.img`:
    mount, snapshot, busy release refused in one line, release, umount."""
    data = random_bytes(2 * MiB, seed=51)
    root = os.fsencode(env.root)
    source = root + b"/-d x.img"
    with open(source, "wb") as f:
        f.write(data)
    live = root + b"/-l ive\n\\040x"
    snap = root + b"/-s nap\t\xff"
    target = root + b"/-t.img"
    os.mkdir(live)
    os.mkdir(snap)
    s = os.fsdecode
    assert snapfs("mount", "--", s(source), s(live)).returncode == 0
    result = snapfs("snapshot", "--target", s(target), "--", s(live), s(snap))
    assert result.returncode == 0, result
    write_at(s(live + b"/-d x.img"), 0, b"NEW")
    with open(snap + b"/-d x.img", "rb") as f:
        assert f.read() == data
    sitter = subprocess.Popen(["sleep", "60"], cwd=snap)
    try:
        busy = snapfs("release", "--", s(snap))
        assert busy.one_line_error and str(sitter.pid) in busy.stderr, busy
    finally:
        sitter.kill()
        sitter.wait()
    assert snapfs("release", "--", s(snap)).returncode == 0
    assert snapfs("umount", "--", s(live)).returncode == 0
    assert not is_mounted(s(live)) and not is_mounted(s(snap))
    with open(target, "rb") as f:
        assert f.read() == data
    assert_nothing_left_beside(source, tracking=True)


def test_state_dir_renamed_while_mounted_then_kill_9(env):
    """The state directory renamed away while mounted: the next snapshot
    writes a new one; after kill -9 both snapshots come back exact."""
    source = env.image("d.img", 2 * MiB, seed=52)
    live, s1, s2 = env.dirs("live", "s1", "s2")
    o1 = source.read_bytes()
    assert snapfs("mount", source, live, s1, "--target", env.root / "t1.img",
                  "--sync", "none").returncode == 0
    os.rename(env.root / "d.img.snapfs-live", env.root / "moved")
    write_at(live / "d.img", 0, b"NEW1")
    o2 = (live / "d.img").read_bytes()
    assert snapfs("snapshot", live, s2, "--target", env.root / "t2.img",
                  "--sync", "none").returncode == 0
    write_at(live / "d.img", 0, b"NEW2")
    pid = status(live)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    snapfs("umount", live)
    again = snapfs("mount", source, live)
    assert again.returncode == 0, again
    assert (s1 / "d.img").read_bytes() == o1
    assert (s2 / "d.img").read_bytes() == o2
    assert snapfs("umount", live).returncode == 0
