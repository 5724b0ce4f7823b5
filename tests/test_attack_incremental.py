"""Hostile tests of incremental backups and change tracking
(docs/incremental.md): the chain of a completed incremental, read with
qemu-img, must be exactly the disk at the incremental's moment; a base that
is not what was backed up, a change made while nothing had SOURCE mounted, a
damaged change tracking must give a one-line refusal or a reset, never a
wrong incremental nor a traceback.

The oracle is qemu-img: `qemu-img compare` of the chain against a plain copy
of the disk taken at the backup's moment (nothing writes meanwhile), or
against what the snapshot's own mount serves (read before release)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import alive, need, random_bytes, wait_until, write_at
from test_attack_common import env, snapfs, status  # noqa: F401 (env: a fixture)

MiB = 1 << 20
CLUSTER = 64 << 10
SIZE = 8 * MiB


def qemu_img(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([need("qemu-img"), *map(str, args)], capture_output=True,
                            text=True)
    if check:
        assert result.returncode == 0, f"qemu-img {args}: {result.stderr}"
    return result


def qemu_io(image, command, fmt="qcow2"):
    result = subprocess.run([need("qemu-io"), "-f", fmt, "-c", command, str(image)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), result
    return result


def backing_of(target) -> str:
    """The backing file name recorded in qcow2 image `target`."""
    return json.loads(qemu_img("info", "--output=json", target).stdout)["backing-filename"]


def chain_is(target, expected: bytes, where: Path) -> bool:
    """Whether the qcow2 chain of `target` reads exactly `expected` (its
    virtual size too)."""
    info = json.loads(qemu_img("info", "--output=json", target).stdout)
    if info["virtual-size"] != len(expected):
        return False
    copy = where / f"expected-{os.path.basename(target)}.raw"
    copy.write_bytes(expected)
    result = qemu_img("compare", "-f", "qcow2", "-F", "raw", target, copy, check=False)
    assert result.returncode in (0, 1), result.stderr
    copy.unlink()
    return result.returncode == 0


def chain_bytes(target, where: Path) -> bytes:
    out = where / f"converted-{os.path.basename(target)}.raw"
    qemu_img("convert", "-O", "raw", target, out)
    data = out.read_bytes()
    out.unlink()
    return data


class Disk:
    """A live disk mounted by a test; snapshots by name; all cleaned up by
    the `disk` fixture (Env) whatever happens."""

    def __init__(self, root: Path, size=SIZE, seed=1, name="disk.img", data=None):
        self.root = root
        self.source = root / name
        if data is None:
            data = random_bytes(size, seed)
        self.source.write_bytes(data)
        self.live_dir = root / "live"
        self.live_dir.mkdir(exist_ok=True)

    @property
    def live(self) -> Path:
        return self.live_dir / self.source.name

    def mount(self, check=True):
        extra = ["--format", "qcow2"] if self.source.suffix == ".qcow2" else []
        result = snapfs("mount", self.source, self.live_dir, *extra)
        if check:
            assert result.returncode == 0, result
        return result

    def umount(self):
        result = snapfs("umount", self.live_dir)
        assert result.returncode == 0, result

    def read(self) -> bytes:
        with open(self.live, "rb") as f:
            return f.read()

    def write(self, offset: int, data: bytes):
        write_at(self.live, offset, data)

    def point(self, name) -> Path:
        point = self.root / name
        point.mkdir(exist_ok=True)
        return point

    def snapshot(self, name, sync, *extra, target=None, fmt="qcow2", check=True):
        target = target or self.root / f"{name}.qcow2"
        result = snapfs("snapshot", self.live_dir, self.point(name), "--sync", sync,
                        "--target-format", fmt, "--target", target, *extra)
        if check:
            assert result.returncode == 0, result
        return result

    def wait(self, name):
        result = snapfs("wait", self.root / name)
        assert result.returncode == 0, result
        return result

    def release(self, name):
        result = snapfs("release", self.root / name)
        assert result.returncode == 0, result

    def backup(self, name, sync, *extra, target=None, check_mount=True) -> tuple[Path, bytes]:
        """Take a backup with nothing writing, wait for it, check what its
        mount serves, release it. Returns (target, the disk at its moment)."""
        target = target or self.root / f"{name}.qcow2"
        moment = self.read()
        self.snapshot(name, sync, *extra, target=target)
        self.wait(name)
        if check_mount:
            with open(self.root / name / self.source.name, "rb") as f:
                assert f.read() == moment, f"{name}: its mount does not serve its moment"
        self.release(name)
        return target, moment

    def pid(self) -> int:
        return status(self.live_dir)["pid"]

    def kill9(self):
        pids = [self.pid(), *(s["pid"] for s in status(self.live_dir)["snapshots"])]
        os.kill(pids[0], signal.SIGKILL)
        assert wait_until(lambda: not alive(pids[0]))
        # what a user does after the daemon died: umount (clears the dead mount)
        snapfs("umount", self.live_dir)
        return pids


@pytest.fixture
def disk(env):
    def make(**kwargs) -> Disk:
        return Disk(env.root, **kwargs)
    return make


def refused_in_one_line(result, *words):
    assert result.one_line_error, result
    for word in words:
        assert word in result.stderr, result


# --- the base backup tampered with ------------------------------------------


def test_base_modified_in_place_with_qemu_io_is_refused(disk):
    """docs/incremental.md: an incremental is refused "with a base whose
    target ... was replaced or changed since". qemu-io writing into the FULL
    target keeps its inode, generation and copy map: an incremental built on
    it reads, through its chain, data that was never on the disk."""
    d = disk()
    d.mount()
    full, _ = d.backup("full", "full")
    qemu_io(full, "write -P 0x55 0 64k")  # the FULL changed after it completed
    d.write(5 * CLUSTER, random_bytes(CLUSTER, 2))
    moment = d.read()
    result = d.snapshot("inc", "incremental", check=False)
    if result.returncode == 0:
        d.wait("inc")
        d.release("inc")
        assert chain_is(d.root / "inc.qcow2", moment, d.root), \
            "an incremental built on a changed base: its chain is not the disk"
        pytest.fail("an incremental on a base changed since it completed was accepted")
    refused_in_one_line(result, "take a full backup")


def test_base_copy_map_deleted_is_refused(disk):
    d = disk()
    d.mount()
    full, _ = d.backup("full", "full")
    os.unlink(str(full) + ".snapfs")
    d.write(0, b"x" * 4096)
    refused_in_one_line(d.snapshot("inc", "incremental", check=False), "take a full backup")
    assert not (d.root / "inc.qcow2").exists()


def test_base_moved_is_refused_and_back_in_place_accepted(disk):
    d = disk()
    d.mount()
    full, _ = d.backup("full", "full")
    moved = d.root / "moved.qcow2"
    os.rename(full, moved)
    d.write(CLUSTER, b"y" * 100)
    refused_in_one_line(d.snapshot("inc", "incremental", check=False), "take a full backup")
    os.rename(moved, full)
    target, moment = d.backup("inc2", "incremental")
    assert chain_is(target, moment, d.root)


def test_target_forced_over_its_own_base_is_refused(disk):
    """--force replaces an existing TARGET, but an incremental whose TARGET
    is its own base would destroy the backup it builds on and name itself
    as its backing file."""
    d = disk()
    d.mount()
    full, moment_full = d.backup("full", "full")
    d.write(3 * CLUSTER, random_bytes(CLUSTER, 3))
    result = d.snapshot("inc", "incremental", "--force", target=full, check=False)
    if result.returncode == 0:
        d.wait("inc")
        d.release("inc")
        info = qemu_img("info", "--backing-chain", full, check=False)
        pytest.fail(f"the incremental replaced its own base: {info.stdout} {info.stderr}")
    assert result.one_line_error, result
    assert chain_is(full, moment_full, d.root), "the base was damaged by a refused command"


def test_base_name_with_a_colon_still_reads_as_a_chain(disk):
    """Backups named by date and time (2024-05-01T00:00.qcow2): the
    incremental names its base relative to it; a relative name with a colon
    before any slash is a protocol prefix to QEMU (`2024-05-01T00:`), so the
    chain must name it so that qemu-img follows it (./NAME)."""
    d = disk()
    d.mount()
    full, _ = d.backup("full", "full", target=d.root / "2024-05-01T00:00.qcow2")
    d.write(7 * CLUSTER, random_bytes(CLUSTER, 4))
    target, moment = d.backup("inc", "incremental", target=d.root / "2024-05-02T00:00.qcow2")
    assert chain_is(target, moment, d.root)


# --- --base ----------------------------------------------------------------


def test_base_in_the_middle_of_a_chain(disk):
    d = disk()
    d.mount()
    d.backup("full", "full")
    d.write(1 * CLUSTER, random_bytes(CLUSTER, 5))
    inc1, _ = d.backup("inc1", "incremental")
    d.write(2 * CLUSTER, random_bytes(CLUSTER, 6))
    inc2, m2 = d.backup("inc2", "incremental")
    d.write(3 * CLUSTER + 100, random_bytes(3 * CLUSTER, 7))
    inc3, m3 = d.backup("inc3", "incremental", "--base", inc1)
    assert chain_is(inc3, m3, d.root)
    assert chain_is(inc2, m2, d.root)
    assert backing_of(inc3) == "inc1.qcow2"
    # the last checkpoint is inc3 now: the next one is backed by it
    d.write(9 * CLUSTER, b"z" * 10)
    inc4, m4 = d.backup("inc4", "incremental")
    assert backing_of(inc4) == "inc3.qcow2"
    assert chain_is(inc4, m4, d.root)


@pytest.mark.parametrize("sync,fmt", [("top", "raw"), ("none", "qcow2"), ("none", "raw")])
def test_base_that_is_not_a_checkpoint_is_refused(disk, sync, fmt):
    d = disk()
    d.mount()
    d.backup("full", "full")
    target = d.root / f"other.{fmt}"
    d.snapshot("other", sync, target=target, fmt=fmt)
    if sync != "none":
        d.wait("other")
    d.release("other")
    d.write(0, b"a" * 10)
    result = d.snapshot("inc", "incremental", "--base", target, check=False)
    refused_in_one_line(result, "not a completed backup")
    # and without --base it builds on the FULL, not on that one
    target, moment = d.backup("inc2", "incremental")
    assert backing_of(target) == "full.qcow2"
    assert chain_is(target, moment, d.root)


def test_base_given_relative_or_through_a_symlink(disk):
    d = disk()
    d.mount()
    full, _ = d.backup("full", "full")
    d.write(0, b"b" * 10)
    (d.root / "linkdir").symlink_to(d.root)
    for i, base in enumerate([os.path.relpath(full), d.root / "linkdir" / "full.qcow2",
                              str(d.root) + "//full.qcow2"]):
        result = d.snapshot(f"inc{i}", "incremental", "--base", base, check=False)
        assert result.returncode == 0, result
        d.wait(f"inc{i}")
        d.release(f"inc{i}")


# --- what the chain holds ----------------------------------------------------


def test_zeroes_written_after_the_full_do_not_read_through(disk):
    d = disk()
    d.mount()
    d.backup("full", "full")
    d.write(4 * CLUSTER, bytes(CLUSTER))  # a whole cluster of zeroes
    d.write(9 * CLUSTER + 4096, bytes(8192))  # part of one
    d.write(20 * CLUSTER, bytes(3 * CLUSTER + 512))  # across clusters
    target, moment = d.backup("inc", "incremental")
    assert chain_is(target, moment, d.root)
    assert qemu_img("check", target, check=False).returncode == 0


@pytest.mark.parametrize("full_cs,inc_cs", [("64K", "4K"), ("64K", "1M"),
                                            pytest.param("64K", "2M", marks=pytest.mark.slow),
                                            ("2M", "64K"),
                                            pytest.param("4K", "2M", marks=pytest.mark.slow),
                                            ("1M", "4K")])
def test_cluster_sizes(disk, full_cs, inc_cs):
    d = disk()
    d.mount()
    d.backup("full", "full", "--cluster-size", full_cs)
    d.write(CLUSTER - 100, random_bytes(300, 8))  # across a 64K boundary
    d.write(3 * MiB + 4096 * 3, random_bytes(4096, 9))
    d.write(SIZE - 10, b"0123456789")  # the last bytes
    target, moment = d.backup("inc", "incremental", "--cluster-size", inc_cs)
    assert chain_is(target, moment, d.root)
    # writes while the incremental runs, at its cluster size
    d.write(5 * MiB + 7, random_bytes(CLUSTER, 10))
    moment = d.read()
    d.snapshot("inc2", "incremental", "--cluster-size", inc_cs, "--speed", "64K")
    d.write(5 * MiB + 7, random_bytes(2 * CLUSTER, 11))  # after its moment
    d.write(0, random_bytes(100, 12))
    d.wait("inc2")
    d.release("inc2")
    assert chain_is(d.root / "inc2.qcow2", moment, d.root)
    assert qemu_img("check", d.root / "inc2.qcow2", check=False).returncode == 0


ODD_SIZES = [8 * MiB + 512, 8 * MiB + 3 * 4096 + 1536, 100 * 1024]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_disk_size_not_a_multiple_of_the_cluster(disk, size):
    d = disk(size=size)
    d.mount()
    full, m0 = d.backup("full", "full")
    assert chain_is(full, m0, d.root)
    d.write(size - 700, random_bytes(700, 13))  # the partial last cluster
    d.write(0, b"first")
    target, moment = d.backup("inc", "incremental")
    assert chain_is(target, moment, d.root)
    assert status(d.live_dir)["bytes_changed"] == 0
    d.write(size - 1, b"!")
    d.snapshot("inc2", "incremental")
    listed = json.loads(snapfs("changes", d.root / "inc2", "--json").stdout)
    d.wait("inc2")
    d.release("inc2")
    assert listed[0]["start"] == 0 and listed[-1]["start"] + listed[-1]["length"] == size
    assert all(a["start"] + a["length"] == b["start"] for a, b in zip(listed, listed[1:]))
    last = (size - 1) // CLUSTER * CLUSTER
    assert [e for e in listed if e["changed"]] == [
        {"start": last, "length": size - last, "changed": True}]
    assert chain_is(d.root / "inc2.qcow2", d.read(), d.root)
    assert qemu_img("check", d.root / "inc2.qcow2", check=False).returncode == 0


@pytest.mark.parametrize("size", ODD_SIZES)
def test_bytes_changed_of_the_partial_last_cluster(disk, size):
    """status's bytes_changed counts the bytes of the disk that changed: the
    last cluster of a disk whose size is not a multiple of 64 KiB is shorter,
    and `snapfs changes` lists it with its true length; bytes_changed must
    agree with the extents an incremental would copy."""
    d = disk(size=size)
    d.mount()
    d.backup("full", "full")
    d.write(size - 1, b"!")
    d.write(0, b"?")
    last = (size - 1) // CLUSTER * CLUSTER
    assert status(d.live_dir)["bytes_changed"] == CLUSTER + (size - last)


# --- change tracking tampered with ---------------------------------------------


def changes_dir(d: Disk) -> Path:
    return Path(str(d.source) + ".snapfs-live") / "changes"


def tracked_setup(d: Disk, clusters=(2, 40)):
    """A FULL backup, then changes since it, then a clean umount: what
    changes/ holds is the only record of those changes."""
    d.mount()
    d.backup("full", "full")
    for i, cluster in enumerate(clusters):
        d.write(cluster * CLUSTER + 5 * i, random_bytes(CLUSTER + i * CLUSTER, 21 + i))
    d.umount()
    index = json.loads((changes_dir(d) / "index.json").read_text())
    return index


def next_backup_is_safe(d: Disk):
    """After tampering: mount works (or is refused in one line), and the next
    incremental is either refused in one line asking for a FULL or exact."""
    result = d.mount(check=False)
    if result.returncode != 0:
        assert result.one_line_error, result
        return "mount refused"
    assert "Traceback" not in result.stderr, result
    d.write(60 * CLUSTER, b"after the mount")
    moment = d.read()
    result = d.snapshot("inc", "incremental", check=False)
    if result.returncode != 0:
        refused_in_one_line(result, "full backup")
        return "refused"
    d.wait("inc")
    d.release("inc")
    assert chain_is(d.root / "inc.qcow2", moment, d.root), \
        "an incremental after tampering misses changes"
    return "exact"


@pytest.mark.parametrize("damage", [
    "delete-segment", "truncate-segment", "index-not-json", "index-empty", "index-list",
    "index-null", "index-segments-not-a-list", "index-seen-empty", "index-boundary-no-backup",
    "index-a-directory", "delete-index", "segment-a-directory", "index-granularity-string",
])
def test_damaged_change_tracking_is_a_reset_or_a_refusal(disk, damage):
    d = disk()
    index = tracked_setup(d)
    where = changes_dir(d)
    segment = where / index["segments"][-1]
    path = where / "index.json"
    if damage == "delete-segment":
        segment.unlink()
    elif damage == "truncate-segment":
        os.truncate(segment, 100)
    elif damage == "index-not-json":
        path.write_text("{ nope")
    elif damage == "index-empty":
        path.write_text("")
    elif damage == "index-list":
        path.write_text("[]")
    elif damage == "index-null":
        path.write_text("null")
    elif damage == "index-segments-not-a-list":
        path.write_text(json.dumps(dict(index, segments=7)))
    elif damage == "index-seen-empty":
        path.write_text(json.dumps(dict(index, seen={})))
    elif damage == "index-boundary-no-backup":
        path.write_text(json.dumps(dict(index, boundaries=[{"id": b["id"], "state": b["state"]}
                                                           for b in index["boundaries"]])))
    elif damage == "index-a-directory":
        path.unlink()
        path.mkdir()
    elif damage == "delete-index":
        path.unlink()
    elif damage == "segment-a-directory":
        segment.unlink()
        segment.mkdir()
    elif damage == "index-granularity-string":
        path.write_text(json.dumps(dict(index, granularity="65536")))
    next_backup_is_safe(d)


def test_segment_replaced_by_one_of_another_disk_size(disk, tmp_path):
    """A segment is a bitmap file with its own size in its header; one
    made for another (smaller) disk put in place must not be taken as the
    changes of this one (its bits cover only the start of the disk)."""
    other_root = tmp_path / "other"
    other_root.mkdir()
    o = Disk(other_root, size=4 * MiB)
    tracked_setup(o, clusters=(7,))
    o_index = json.loads((changes_dir(o) / "index.json").read_text())
    d = disk()
    index = tracked_setup(d)
    for ours, theirs in zip(index["segments"], o_index["segments"]):
        os.replace(changes_dir(o) / theirs, changes_dir(d) / ours)
    next_backup_is_safe(d)


def test_active_segment_replaced_by_a_smaller_one_then_written_high(disk, tmp_path):
    """The same, but the writes go on: a write past what the planted
    segment covers must not crash the daemon."""
    other_root = tmp_path / "other"
    other_root.mkdir()
    o = Disk(other_root, size=4 * MiB)
    tracked_setup(o)
    o_index = json.loads((changes_dir(o) / "index.json").read_text())
    d = disk()
    index = tracked_setup(d)
    os.replace(changes_dir(o) / o_index["segments"][-1], changes_dir(d) / index["segments"][-1])
    d.mount()
    d.write(SIZE - CLUSTER, random_bytes(CLUSTER, 30))
    assert status(d.live_dir)["pid"], "the daemon died on a write"
    d.umount()
    next_backup_is_safe(d)


def test_segment_replaced_by_an_empty_one(disk):
    """The active segment swapped for the spare (same disk, no bits set):
    the changes since the FULL are gone; the next incremental must not
    silently leave them out."""
    d = disk()
    index = tracked_setup(d)
    segment = changes_dir(d) / index["segments"][-1]
    data = bytearray(segment.read_bytes())
    header = int(data[len(b"SNAPFS-CHANGES\n"):len(b"SNAPFS-CHANGES\n") + 16], 16)
    assert any(data[header:]), "the segment should hold the changes"
    data[header:] = bytes(len(data) - header)
    replacement = segment.with_name("replacement")
    replacement.write_bytes(data)
    os.replace(replacement, segment)
    next_backup_is_safe(d)


def test_segment_a_symlink_to_another_file(disk, tmp_path):
    """A segment made a symbolic link: snapfs must not write bits through
    it into whatever it points at."""
    d = disk()
    index = tracked_setup(d)
    where = changes_dir(d)
    segment = where / index["segments"][-1]
    victim = tmp_path / "victim"
    victim.write_bytes(segment.read_bytes())
    before = victim.read_bytes()
    segment.unlink()
    segment.symlink_to(victim)
    outcome = next_backup_is_safe(d)
    d.umount()
    assert victim.read_bytes() == before, f"bits written through a symlink ({outcome})"


def test_changes_dir_deleted_asks_for_a_full_backup(disk):
    d = disk()
    tracked_setup(d)
    import shutil
    shutil.rmtree(changes_dir(d))
    assert next_backup_is_safe(d) == "refused"
