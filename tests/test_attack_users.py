"""Hostile tests: another user on the same machine (nobody, uid 65534)
against root's live disks and snapshots."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import AS_NOBODY, alive, is_mounted, random_bytes, wait_until
from snapfs import mounts
from test_attack_common import MiB, Env, snapfs, status, write_at


@pytest.fixture
def pub(public_tmp):
    made = Env(public_tmp)
    try:
        yield made
    finally:
        made.cleanup()


def as_nobody(*args, **kwargs):
    return snapfs(*args, prefix=AS_NOBODY, **kwargs)


def nobody_can(op: str, path) -> bool:
    code = {"read": f"open({str(path)!r}, 'rb').read(1)",
            "write": f"open({str(path)!r}, 'r+b').write(b'x')"}[op]
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", code], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def root_disk(pub):
    """A root-owned 0600 disk mounted by root in a world-enterable directory,
    with one snapshot."""
    pub.root.chmod(0o755)
    data = random_bytes(4 * MiB, seed=21)
    source = pub.root / "private.img"
    source.write_bytes(data)
    source.chmod(0o600)
    live, snap = pub.dirs("live", "snap")
    result = snapfs("mount", source, live, snap, "--target", pub.root / "backup.img")
    assert result.returncode == 0, result
    return source, live, snap, data


@pytest.mark.parametrize("command", [["status", "LIVE"], ["status", "SNAP"], ["wait", "SNAP"],
                                     ["cancel", "SNAP"], ["release", "SNAP"],
                                     ["snapshot", "LIVE", "OTHER", "--target", "/tmp/x.img"],
                                     ["umount", "LIVE"]])
def test_another_user_is_refused_plainly_and_nothing_changes(pub, root_disk, command):
    """FAILS: nobody's commands on root's mounts get no answer from the
    daemon (right), but the command then either tells a falsehood (`the
    snapfs daemon stopped before it answered`; `umount` even says `the daemon
    had died; unmounted what was left` while everything stays mounted), or,
    when the daemon closed the connection before the request was sent, gets
    EPIPE, which main() takes for "stdout closed" (`snapfs status | head`):
    exit 1 with NO message at all (seen about every other run). The line
    should say that this user may not control root's live disk."""
    source, live, snap, data = root_disk
    other = pub.root / "other"
    other.mkdir(exist_ok=True)
    other.chmod(0o777)
    words = {"LIVE": live, "SNAP": snap, "OTHER": other}
    result = as_nobody(*[words.get(w, w) for w in command])
    assert result.one_line_error, result
    for lie in ("died", "stopped before it answered", "unmounted what was left"):
        assert lie not in result.stderr, result
    assert is_mounted(live) and is_mounted(snap) and not is_mounted(other)
    info = status(live)
    assert len(info["snapshots"]) == 1
    assert (snap / "private.img").read_bytes() == data


def test_backup_target_of_a_private_disk_is_private(pub, root_disk):
    """FAILS: the TARGET (and its copy map) of a 0600 disk are created 0644
    (umask 022): once the background copy is done, any user reads the whole
    private disk from the backup. The target must be no more accessible than
    SOURCE (or at least not readable by others when SOURCE is not)."""
    source, live, snap, data = root_disk
    assert not nobody_can("read", source)
    assert not nobody_can("read", snap / "private.img")
    assert not nobody_can("read", live / "private.img")
    assert snapfs("wait", snap).returncode == 0
    target = pub.root / "backup.img"
    assert not nobody_can("read", target), \
        f"another user reads the private disk from its backup (mode {oct(target.stat().st_mode)})"


def test_permissions_follow_source(pub):
    """Guard: a 0644 disk: nobody reads the live disk and the snapshot, may
    not write the live disk; a chmod 0600 of SOURCE while mounted reaches the
    mounts (attributes are cached for one second); a 0666 disk's live disk is
    writable by nobody, its snapshot never."""
    pub.root.chmod(0o755)
    data = random_bytes(MiB, seed=22)
    source = pub.root / "shared.img"
    source.write_bytes(data)
    source.chmod(0o644)
    live, snap = pub.dirs("live", "snap")
    assert snapfs("mount", source, live, snap, "--target", pub.root / "t.img").returncode == 0
    assert nobody_can("read", live / "shared.img") and nobody_can("read", snap / "shared.img")
    assert not nobody_can("write", live / "shared.img")
    source.chmod(0o600)
    assert wait_until(lambda: not nobody_can("read", live / "shared.img"), timeout=5)
    assert wait_until(lambda: not nobody_can("read", snap / "shared.img"), timeout=5)
    source.chmod(0o666)
    assert wait_until(lambda: nobody_can("write", live / "shared.img"), timeout=5)
    assert not nobody_can("write", snap / "shared.img")
    assert (snap / "shared.img").read_bytes() == data
    assert snapfs("umount", live).returncode == 0


def test_a_squatter_on_the_control_socket_cannot_block_cleanup_after_a_crash(pub, root_disk):
    """FAILS: after kill -9 of root's daemon, the instance id is public (the
    mount table shows fsname=snapfs:<id>) and its abstract socket
    @snapfs/<id> is free: nobody binds it, and root's `snapfs umount LIVE`,
    the documented way to clean up after a crash, then refuses for as long as
    the squatter lives ("not a snapfs daemon of root or of this user: not
    talking to it"), leaving the dead mounts in place (and `snapfs mount
    SOURCE LIVE` cannot bring the snapshot back)."""
    source, live, snap, data = root_disk
    instance = mounts.find_mount(str(live)).source.removeprefix("snapfs:")
    pid = status(live)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    squat = ("import socket, time\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             f"s.bind({chr(0) + 'snapfs/' + instance!r})\n"
             "s.listen(8)\nprint('bound', flush=True)\ntime.sleep(60)\n")
    squatter = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", squat],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline().strip() == "bound"
        result = snapfs("umount", live)
        assert not is_mounted(live) and not is_mounted(snap), \
            f"a squatter kept root from cleaning up after the crash: {result.stderr}"
        again = snapfs("mount", source, live)
        assert again.returncode == 0, again
        assert is_mounted(snap), again
        assert (snap / "private.img").read_bytes() == data
        assert snapfs("umount", live).returncode == 0
    finally:
        squatter.kill()
        squatter.wait()
