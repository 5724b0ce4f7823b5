"""Clones instead of copies: on a file system that shares extents (XFS with
reflink=1), with SOURCE and TARGET raw files on it, the background job of
FULL and TOP clones the clusters (FICLONERANGE); everywhere else it copies
them, with the same result.

Each test runs the real commands on a loop-mounted XFS image made in the
test's own directory. The oracle is a copy of SOURCE taken (on another file
system) before the snapshot."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SNAPFS, force_unmount, is_mounted, run_snapfs, write_at

MiB = 1 << 20
CLUSTER = 64 << 10
#: FIEMAP_EXTENT_SHARED: the extent is shared with another file (a clone)
FIEMAP_SHARED = 0x2000


@pytest.fixture
def xfs(tmp_path):
    """A freshly made XFS with reflink=1, loop-mounted at tmp_path/xfs;
    unmounted afterwards whatever happened."""
    if shutil.which("mkfs.xfs") is None or shutil.which("xfs_io") is None:
        pytest.fail("mkfs.xfs/xfs_io missing: scripts/test installs xfsprogs (SNAPFS_APT_EXTRA)")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(600 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    point = tmp_path / "xfs"
    point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        if os.path.ismount(point):
            subprocess.run(["umount", "-l", str(point)], check=False)


def make_source(path: Path, size: int, seed: int) -> None:
    """Random data with holes: every fourth 1 MiB stays a hole, plus a
    tail that ends off any block boundary."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for start in range(0, size, MiB):
            if (start // MiB) % 4 != 3:
                os.pwrite(fd, rng.randbytes(min(MiB, size - start)), start)
    finally:
        os.close(fd)


def shared_bytes(path: Path) -> int:
    """Bytes of `path` in extents the file system says are shared (fiemap)."""
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap -v", str(path)], check=True,
                         capture_output=True, text=True).stdout
    shared = 0
    for line in out.splitlines():
        m = re.match(r"\s*\d+: \[(\d+)\.\.(\d+)\]:\s+(\S+)\s+(\d+)\s+(0x[0-9a-f]+)", line)
        if m and m.group(3) != "hole" and int(m.group(5), 16) & FIEMAP_SHARED:
            shared += int(m.group(4)) * 512
    return shared


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def status(path) -> dict:
    return json.loads(run_snapfs("status", path, "--json").stdout)


def cmp(a: Path, b: Path) -> None:
    result = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class Live:
    """`snapfs mount SOURCE LIVE` and its snapshots; `cleanup` leaves nothing mounted."""

    def __init__(self, source: Path, root: Path):
        self.source = source
        self.dir = root / "live"
        self.dir.mkdir()
        self.points: list[Path] = []
        run_snapfs("mount", source, self.dir)

    @property
    def file(self) -> Path:
        return self.dir / self.source.name

    def snapshot(self, point: Path, target: Path, sync: str, *extra) -> Path:
        point.mkdir()
        self.points.append(point)
        run_snapfs("snapshot", self.dir, point, "--target", target, "--sync", sync, *extra)
        return point / self.source.name

    def cleanup(self) -> None:
        if is_mounted(self.dir):
            subprocess.run([*SNAPFS, "umount", str(self.dir)], capture_output=True, timeout=120)
        for point in [self.dir, *self.points]:
            if is_mounted(point):
                force_unmount(point)


@pytest.fixture
def live(tmp_path):
    made: list[Live] = []

    def make(source: Path) -> Live:
        made.append(Live(source, tmp_path))
        return made[-1]

    yield make
    for disk in made:
        disk.cleanup()
    for disk in made:
        assert not is_mounted(disk.dir), "a mount was left behind"


def write_some(disk: Live, model: bytearray, rng: random.Random, count: int,
               into_data: bool = False) -> None:
    """`count` writes to LIVE at random places (`into_data`: only within the
    MiBs that hold data in SOURCE, not its holes)."""
    for _ in range(count):
        data = rng.randbytes(rng.choice([512, 4096, 70_000]))
        offset = rng.randrange(len(model) - len(data))
        if into_data and (offset // MiB) % 4 == 3:
            offset -= MiB
        if into_data:
            offset = min(offset, (offset // MiB + 1) * MiB - len(data))
        write_at(disk.file, offset, data)
        model[offset:offset + len(data)] = data


def run_backup(tmp_path: Path, xfs: Path, live, sync: str, target: Path, size: int,
               speed: str | None) -> tuple[dict, int]:
    """Snapshot SOURCE (on the XFS) into `target` with writes to LIVE during
    and after the job; check SNAPSHOT and TARGET against the copy taken
    before, and LIVE against the model. Returns the status after the job and
    the bytes of TARGET in shared extents."""
    source = xfs / "disk.img"
    make_source(source, size, seed=7)
    disk = live(source)
    rng = random.Random(8)
    model = bytearray(disk.file.read_bytes())
    write_some(disk, model, rng, 5)
    oracle = tmp_path / "oracle.img"  # on another file system: shares nothing
    oracle.write_bytes(model)
    used_before = used(xfs)

    snapshot = disk.snapshot(tmp_path / "snap", target, sync, *(["--speed", speed] if speed else []))
    write_some(disk, model, rng, 20)  # during the job
    run_snapfs("wait", snapshot.parent)
    after_job = status(snapshot.parent)
    assert after_job["state"] == "completed", after_job
    after_job["shown"] = run_snapfs("status", snapshot.parent).stdout
    cmp(snapshot, oracle)
    cmp(target, oracle)
    shared = shared_bytes(target)
    grew = used(xfs) - used_before

    # after the job: TARGET unchanged, and no copy-before-write of the clusters
    # the job covered (TOP's holes are not: a write there sets their bits)
    write_some(disk, model, rng, 20, into_data=True)
    assert status(snapshot.parent)["clusters_copied_by_writes"] == \
        after_job["clusters_copied_by_writes"]
    cmp(snapshot, oracle)
    run_snapfs("release", snapshot.parent)
    cmp(target, oracle)
    assert disk.file.read_bytes() == model
    run_snapfs("umount", disk.dir)
    assert source.read_bytes() == model
    after_job["grew"] = grew
    return after_job, shared


@pytest.mark.parametrize("sync", ["full", "top"])
def test_backup_clones_on_reflink_xfs(tmp_path, xfs, live, sync):
    size = 128 * MiB + 5000  # the last cluster ends at SOURCE's end, off any block
    target = xfs / "target.img"
    # full: a speed limit, so that writes land while the job runs
    info, shared = run_backup(tmp_path, xfs, live, sync, target, size,
                              speed="128M" if sync == "full" else None)
    data = 96 * MiB  # three quarters of SOURCE hold data, the rest are holes
    # Clusters the writes copied before the job got there are not shared, nor
    # is anything the writes after the job replaced in SOURCE: the rest is.
    copied_by_writes = info["clusters_copied_by_writes"] * CLUSTER
    assert shared >= data - copied_by_writes - 45 * 128 * 1024, (shared, copied_by_writes)
    assert info["grew"] < data // 4, f"the target took {info['grew']} bytes of its own"
    assert 0 < info["bytes_cloned"] <= info["bytes_copied"], info
    assert re.search(r"^cloned: .* shared with SOURCE", info["shown"], re.M), info["shown"]
    # holes stay holes
    assert os.stat(target).st_blocks * 512 <= os.stat(xfs / "disk.img").st_blocks * 512 + 8 * MiB


def test_backup_copies_to_another_file_system(tmp_path, xfs, live):
    """SOURCE on the XFS, TARGET beside the test (another file system): the
    clone fails with EXDEV, and the job copies instead, with the same result."""
    target = tmp_path / "target.img"
    info, _ = run_backup(tmp_path, xfs, live, "full", target, 64 * MiB + 5000, speed=None)
    assert info["bytes_copied"] + info["clusters_copied_by_writes"] * CLUSTER >= 64 * MiB
    assert info["grew"] < 4 * MiB, "nothing was written on SOURCE's file system"
    assert info["bytes_cloned"] == 0, info
    assert "cloned:" not in info["shown"]
    # the holes of SOURCE stay holes in the copy
    assert os.stat(target).st_blocks * 512 <= 50 * MiB
