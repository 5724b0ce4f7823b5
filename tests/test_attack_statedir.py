"""Hostile tests: the live disk's state directory `SOURCE.snapfs-live/`.

snapfs keeps its log and state.json there and removes the whole directory at
a clean umount; nothing stops a user from pointing a TARGET or a SNAPSHOT
into it, from having a file where it should be, or from planting one.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import AS_NOBODY, is_mounted, random_bytes
from test_attack_common import MiB, env, files_below, snapfs, status, write_at  # noqa: F401


def test_state_dir_name_taken_by_a_file_is_one_line_error(env):
    """FAILS: `snapfs mount` dies with a FileExistsError traceback."""
    source = env.image()
    (live,) = env.dirs("live")
    blocker = source.with_name(source.name + ".snapfs-live")
    blocker.write_bytes(b"not a directory")
    before = files_below(env.root)
    result = snapfs("mount", source, live)
    assert result.one_line_error, result
    assert not is_mounted(live)
    assert files_below(env.root) == before
    assert blocker.read_bytes() == b"not a directory"


@pytest.mark.parametrize("name", ["t.img", "log", "state.json"])
def test_target_inside_the_state_dir(env, name):
    """FAILS (all three): a TARGET inside SOURCE.snapfs-live/ is accepted.
    t.img: the clean umount deletes the finished backup with the directory.
    log (--force): the daemon's open log is truncated and its log lines are
    appended into the target. state.json (--force): the next state save
    replaces the target with JSON.
    Either refuse it (one line, nothing created) or keep the target intact."""
    original = random_bytes(4 * MiB, seed=7)
    source = env.root / "disk.img"
    source.write_bytes(original)
    live, snap = env.dirs("live", "snap")
    assert snapfs("mount", source, live).returncode == 0
    state_dir = source.with_name("disk.img.snapfs-live")
    target = state_dir / name
    before = {p: p.read_bytes() for p in state_dir.iterdir() if p.is_file()}
    result = snapfs("snapshot", live, snap, "--target", target, "--force")
    if result.returncode != 0:
        assert result.one_line_error, result
        assert not is_mounted(snap)
        assert {p: p.read_bytes() for p in state_dir.iterdir()
                if p.name != "log" and p.is_file()} == \
            {p: d for p, d in before.items() if p.name != "log"}
        if name == "log":
            assert target.read_bytes().startswith(before[target]), "the daemon's log was truncated"
        assert snapfs("umount", live).returncode == 0
        return
    write_at(live / "disk.img", 0, b"after the snapshot" * 100)
    assert (snap / "disk.img").read_bytes() == original
    assert snapfs("wait", snap).returncode == 0
    assert snapfs("release", snap).returncode == 0
    assert snapfs("umount", live).returncode == 0
    assert target.exists(), "the clean umount deleted the TARGET with the state directory"
    assert target.read_bytes() == original, "the TARGET is not the point-in-time image"


@pytest.mark.parametrize("how", ["state-dir", "dir-of-a-symlinked-source"])
def test_snapshot_mounted_over_the_state_dir(env, how):
    """FAILS: a SNAPSHOT over the state directory (directly, or over the
    directory of a SOURCE given as a symbolic link, which the "around SOURCE"
    check misses since it resolves the link) is mounted, then the state save
    fails with EROFS: the command says `snapfs: internal error: OSError(30,
    ...)` and exits 1, yet the snapshot stays mounted; and `umount` then
    refuses for ever (the daemon's own processes hold the log below the
    mount)."""
    real_dir, link_dir, live = env.dirs("real", "links", "live")
    original = random_bytes(4 * MiB, seed=8)
    (real_dir / "disk.img").write_bytes(original)
    if how == "state-dir":
        source = real_dir / "disk.img"
    else:
        source = link_dir / "disk.img"
        source.symlink_to(real_dir / "disk.img")
    assert snapfs("mount", source, live).returncode == 0
    state_dir = source.with_name("disk.img.snapfs-live")
    snap = state_dir if how == "state-dir" else link_dir
    result = snapfs("snapshot", live, snap, "--target", env.root / "t.img")
    if result.returncode != 0:
        assert result.one_line_error, result
        assert not is_mounted(snap), "refused, yet the snapshot is mounted"
        assert not (env.root / "t.img").exists(), "refused, yet the target was created"
    else:
        write_at(live / "disk.img", 0, b"new")
        assert (snap / "disk.img").read_bytes() == original
        assert snapfs("release", snap).returncode == 0
    umount = snapfs("umount", live)
    assert umount.returncode == 0, umount
    assert not is_mounted(live) and not is_mounted(snap)
    assert not state_dir.exists()


def test_symlinked_source_inside_live_does_not_hang_the_daemon(env):
    """FAILS: SOURCE given as a symbolic link that lies in LIVE (the image
    itself elsewhere) passes the "inside LIVE" check, which resolves the link;
    the state directory SOURCE.snapfs-live then lies under the live mount, and
    the first `snapfs snapshot` makes the daemon write state.json into its own
    FUSE mount: it deadlocks (status, snapshot, umount hang for ever)."""
    real_dir, live, snap = env.dirs("real", "live", "snap")
    (real_dir / "disk.img").write_bytes(random_bytes(4 * MiB, seed=9))
    link = live / "disk.img"
    link.symlink_to(real_dir / "disk.img")
    mounted = snapfs("mount", link, live)
    if mounted.returncode != 0:  # refused: fine, if in one line and nothing left
        assert mounted.one_line_error, mounted
        assert not is_mounted(live)
        assert sorted(os.listdir(live)) == ["disk.img"]
        return
    result = snapfs("snapshot", live, snap, "--target", env.root / "t.img", timeout=20)
    if result.returncode is None:
        env.kill_all()
        pytest.fail("snapfs snapshot hung: the daemon deadlocked on its own mount")
    assert result.returncode == 0 or result.one_line_error, result
    assert snapfs("status", live, timeout=20).returncode == 0, "the daemon hangs"
    umount = snapfs("umount", live, timeout=20)
    assert umount.returncode == 0, umount


@pytest.mark.parametrize("content", ['{"snapshots": 5}',
                                     '{"snapshots": [{"request": {"snapshot": "/nowhere"}}]}',
                                     '[]'])
def test_malformed_state_file_is_reported_in_plain_words(env, content):
    """FAILS (the first two): a state.json of the wrong shape (a crash, a
    careless edit) makes `mount` print `snapfs: internal error:
    ExceptionGroup(...TypeError...)` instead of saying which file is wrong."""
    source = env.image()
    (live,) = env.dirs("live")
    state_dir = source.with_name(source.name + ".snapfs-live")
    state_dir.mkdir()
    (state_dir / "state.json").write_text(content)
    result = snapfs("mount", source, live)
    if result.returncode == 0:
        assert snapfs("umount", live).returncode == 0
        return
    assert result.one_line_error, result
    assert "state.json" in result.stderr, result
    assert not is_mounted(live)


def test_planted_state_file_cannot_unmount_another_instance(public_tmp, env):
    """FAILS (security): a user who owns the directory of a disk image that
    root mounts can plant SOURCE.snapfs-live/state.json naming another
    instance's id (world-readable in /proc/self/mountinfo) and its mount
    point; root's `snapfs mount` then "clears the dead mount" of that id:
    it detaches root's other, healthy live disk (whose daemon then stops).
    State written by another user must not be trusted (or a dead mount must
    be proven dead before it is detached)."""
    live_a, = env.dirs("live-a")
    source_a = env.image("a.img")
    assert snapfs("mount", source_a, live_a).returncode == 0
    from snapfs import mounts
    instance = mounts.find_mount(str(live_a)).source.removeprefix("snapfs:")

    user_dir = public_tmp / "user"
    user_dir.mkdir()
    os.chown(user_dir, 65534, 65534)
    planted = json.dumps({"instance": instance, "snapshots": [
        {"request": {"snapshot": str(live_a), "target": str(user_dir / "x.img")}}]})
    script = (f"cd {user_dir} && truncate -s 1M b.img && mkdir b.img.snapfs-live && "
              f"printf '%s' '{planted}' > b.img.snapfs-live/state.json")
    subprocess.run([*AS_NOBODY, "sh", "-c", script], check=True)

    env.roots.append(public_tmp)
    live_b = public_tmp / "live-b"
    live_b.mkdir()
    snapfs("mount", user_dir / "b.img", live_b)
    try:
        assert is_mounted(live_a), "root's other live disk was unmounted by a planted state file"
        assert status(live_a)["source"] == str(source_a)
    finally:
        if is_mounted(live_b):
            snapfs("umount", live_b)
