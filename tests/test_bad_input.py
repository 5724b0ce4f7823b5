"""Bad input: one line on stderr naming the problem, a non-zero exit, no
traceback, nothing mounted, no file created, the source untouched."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from conftest import alive, is_mounted, mounts, random_bytes, run_snapfs, wait_until, write_image


def tree(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content (files) or its kind."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.join(dirpath, name)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                found[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                found[path] = "other"
    return found


@pytest.fixture
def setup(tmp_path):
    source = write_image(tmp_path / "disk.img", random_bytes(1 << 20, seed=1))
    for name in ("live", "snap"):
        (tmp_path / name).mkdir()
    (tmp_path / "plain-file").write_text("x")
    return tmp_path, source


def mounts_under(root: Path) -> list:
    return [m for m in mounts.mount_table() if m.point.startswith(str(root))]


def refuse(root: Path, *args, expect: str) -> str:
    before = tree(root)
    mounts_before = mounts_under(root)
    result = run_snapfs(*args, check=False)
    assert result.returncode != 0, f"accepted: snapfs {args}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("snapfs: "), lines[0]
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    assert mounts_under(root) == mounts_before, "something was mounted"
    assert tree(root) == before, "files changed"
    return lines[0]


def mount_args(root, source=None, live=None, snap=None, target=None, extra=()):
    return ("mount", source or root / "disk.img", live or root / "live", snap or root / "snap",
            "--target", target or root / "target.img", *extra)


def test_missing_source(setup):
    root, _ = setup
    refuse(root, *mount_args(root, source=root / "nope.img"), expect="No such file")


def test_source_is_a_directory(setup):
    root, _ = setup
    refuse(root, *mount_args(root, source=root / "live"), expect="not a regular file")


def test_empty_source(setup):
    root, _ = setup
    (root / "empty.img").touch()
    refuse(root, *mount_args(root, source=root / "empty.img"), expect="empty")


def test_source_not_readable(setup):
    root, _ = setup
    (root / "dangling").symlink_to(root / "gone")
    refuse(root, *mount_args(root, source=root / "dangling"), expect="No such file")


@pytest.mark.parametrize("which", ["live", "snap"])
def test_mount_point_missing(setup, which):
    root, _ = setup
    kwargs = {which: root / "missing"}
    refuse(root, *mount_args(root, **kwargs), expect="no such directory")


@pytest.mark.parametrize("which", ["live", "snap"])
def test_mount_point_neither_directory_nor_file(setup, which):
    """A regular file is a valid mount point (the image appears at that path);
    anything else (here a FIFO) is refused."""
    root, _ = setup
    os.mkfifo(root / "fifo")
    refuse(root, *mount_args(root, **{which: root / "fifo"}),
           expect="neither a directory nor a regular file")


def test_same_mount_points(setup):
    root, _ = setup
    refuse(root, *mount_args(root, snap=root / "live"), expect="LIVE and SNAPSHOT are the same")


def test_nested_mount_points(setup):
    root, _ = setup
    (root / "live" / "inner").mkdir()
    refuse(root, *mount_args(root, snap=root / "live" / "inner"), expect="inside each other")


def test_target_is_source(setup):
    root, source = setup
    refuse(root, *mount_args(root, target=source), expect="is the source")
    refuse(root, *mount_args(root, target=source, extra=["--force"]), expect="is the source")
    os.link(source, root / "hardlink.img")
    refuse(root, *mount_args(root, target=root / "hardlink.img", extra=["--force"]),
           expect="is the source")


def test_target_directory_missing(setup):
    root, _ = setup
    refuse(root, *mount_args(root, target=root / "no-dir" / "t.img"), expect="does not exist")


def test_target_inside_mount_point(setup):
    root, _ = setup
    refuse(root, *mount_args(root, target=root / "live" / "t.img"), expect="inside the mount point")


def test_existing_target_needs_force(setup):
    root, source = setup
    (root / "target.img").write_text("keep me")
    refuse(root, *mount_args(root), expect="already exists (use --force")
    assert (root / "target.img").read_text() == "keep me"


def test_force_replaces_target(setup, mount):
    root, source = setup
    target = root / "old-target.img"
    target.write_text("old")
    inst = mount(source, target=target, extra=["--force"])
    inst.wait()
    inst.umount()
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("args, expect", [
    (["--sync", "sometimes"], "invalid choice"),
    (["--cluster-size", "3K"], "power of two"),
    (["--cluster-size", "4M"], "power of two"),
    (["--cluster-size", "2K"], "power of two"),
    (["--cluster-size", "lots"], "bad cluster size"),
    (["--speed", "0"], "more than 0"),
    (["--speed", "-5"], "bad speed"),
    (["--speed", "fast"], "bad speed"),
])
def test_bad_options(setup, args, expect):
    root, _ = setup
    refuse(root, *mount_args(root), *args, expect=expect)


def test_busy_mount_point_and_target_in_other_mount_and_source_in_use(setup, mount, tmp_path):
    root, source = setup
    inst = mount(source, sync="none", name="first")
    other = write_image(root / "other.img", random_bytes(1 << 20, seed=2))
    refuse(root, *mount_args(root, source=other, live=inst.live_dir), expect="busy")
    refuse(root, *mount_args(root, source=other, snap=inst.snapshot_dir), expect="busy")
    refuse(root, *mount_args(root, source=other, target=inst.live_dir / "t.img"),
           expect="inside the snapfs mount")
    refuse(root, *mount_args(root), expect="in use by another snapfs instance")
    refuse(root, *mount_args(root, source=inst.snapshot),  # on a read-only file system
           expect="cannot open for reading and writing: Read-only file system")
    inst.umount()


@pytest.mark.parametrize("command", ["status", "wait", "cancel", "umount", "snapshot",
                                     "release"])
def test_commands_on_something_else(setup, mount, command):
    root, source = setup
    args = ["--target", root / "t.img"] if command == "snapshot" else []
    operand = [root / "snap"] if command == "snapshot" else []
    expect = {"umount": "not a snapfs live mount", "snapshot": "not a snapfs live mount",
              "release": "not a snapfs snapshot"}.get(command, "not a snapfs mount")
    refuse(root, command, root / "live", *operand, *args, expect=expect)
    refuse(root, command, root / "nowhere", *operand, *args, expect=expect)
    inst = mount(source, sync="none")
    if command in ("umount", "snapshot"):  # these want the live disk
        refuse(root, command, inst.snapshot_dir, *operand, *args, expect=expect)
    if command == "release":  # and this a snapshot
        refuse(root, command, inst.live_dir, expect="a live disk, not a snapshot")
    assert is_mounted(inst.live_dir)
    inst.umount()


def test_cancel_and_wait_in_sync_none(setup, mount):
    root, source = setup
    inst = mount(source, sync="none")
    for command, expect in (("wait", "nothing to wait for"), ("cancel", "nothing to cancel")):
        result = run_snapfs(command, inst.live_dir, check=False)
        assert result.returncode != 0 and expect in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    inst.umount()


@pytest.mark.parametrize("where", ["live", "snap/below"])
def test_source_inside_a_mount_point(setup, where):
    """The mount would cover SOURCE (the daemon used to hang on its own mount
    for two minutes, or crash): refused at once."""
    root, _ = setup
    folder = root / where
    folder.mkdir(exist_ok=True)
    inner = write_image(folder / "d.img", random_bytes(1 << 20, seed=3))
    started = time.monotonic()
    refuse(root, *mount_args(root, source=inner), expect="lies inside")
    assert time.monotonic() - started < 20


def test_daemon_that_does_not_come_up_in_time(setup):
    """`mount` waits for the daemon's readiness for a bounded time, then stops
    it and leaves nothing behind (a start cannot take a millisecond)."""
    root, _ = setup
    before = tree(root)
    result = run_snapfs(*mount_args(root), check=False,
                        env=dict(os.environ, SNAPFS_START_TIMEOUT="0.001"))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "did not report its mounts up" in result.stderr
    assert wait_until(lambda: not processes_mentioning(str(root)), timeout=30)
    assert not mounts_under(root)
    assert tree(root) == before


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read() and alive(int(pid)):
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64", "s390x"])
def test_refused_where_memory_ordering_is_weaker(machine):
    """The lock-free snapshot read relies on x86's total store order."""
    from snapfs.cli.checks import check_machine
    from snapfs.errors import UserError
    with pytest.raises(UserError, match="only on x86"):
        check_machine(machine)
    check_machine("x86_64")
