"""Incremental backups end to end: a live disk that stays mounted, a FULL
backup, then incrementals into qcow2 targets chained on it, checked with
qemu-img against plain copies of the disk taken at each backup's moment; what
each incremental holds against what was written; cancels, offline changes,
kill -9 and restarts."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import alive, need, random_bytes, run_snapfs, wait_until, write_at
from test_snapshots_on_demand import LiveDisk, status

MiB = 1 << 20
CLUSTER = 64 << 10
SIZE = 8 * MiB


def qemu_img(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([need("qemu-img"), *map(str, args)], capture_output=True, text=True,
                          check=check)


def same_image(chain, copy) -> bool:
    result = qemu_img("compare", "-f", "qcow2", "-F", "raw", chain, copy, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def own_clusters(image) -> set[int]:
    """The clusters the top layer of a qcow2 image holds itself."""
    mapped = json.loads(qemu_img("map", "--output=json", image).stdout)
    return {c for e in mapped if e["depth"] == 0 and (e["data"] or e["zero"])
            for c in range(e["start"] // CLUSTER, -(-(e["start"] + e["length"]) // CLUSTER))}


class Backups:
    """Backups of a live disk, each checked against a copy of the disk taken
    at its moment; `written` holds the clusters written since the last
    completed backup, `during` those written while a backup runs."""

    def __init__(self, disk: LiveDisk):
        self.disk = disk
        self.root = disk.root
        self.count = 0
        self.written: set[int] = set()
        self.active: dict | None = None  # the backup being taken
        self.last = None  # the last completed backup's target

    def write(self, cluster: int, seed: int) -> None:
        write_at(self.disk.live, cluster * CLUSTER, random_bytes(CLUSTER, seed=seed))
        self.written.add(cluster)
        if self.active is not None:
            self.active["during"].add(cluster)

    def start(self, sync: str, *extra) -> dict:
        self.count += 1
        name = f"b{self.count}"
        copy = self.root / f"{name}.copy"
        copy.write_bytes(self.disk.live.read_bytes())  # nothing writes meanwhile
        target = self.root / f"{name}.qcow2"
        self.disk.snapshot(name, "--sync", sync, "--target-format", "qcow2", *extra,
                           target=target)
        self.active = {"name": name, "target": target, "copy": copy, "sync": sync,
                       "changed": set(self.written), "during": set()}
        return self.active

    def finish(self, cancel: bool = False) -> dict:
        backup, self.active = self.active, None
        point = self.root / backup["name"]
        if cancel:
            result = run_snapfs("cancel", point, check=False)
            if "has completed" in result.stderr:  # nothing to copy: done already
                cancel = False
            else:
                assert result.returncode == 0, result.stderr
        else:
            run_snapfs("wait", point)
        if backup["sync"] == "incremental" and not cancel:
            listed = json.loads(run_snapfs("changes", point, "--json").stdout)
            changed = {c for e in listed if e["changed"]
                       for c in range(e["start"] // CLUSTER, -(-(e["start"] + e["length"]) // CLUSTER))}
            assert backup["changed"] <= changed, "a change since the base is missing"
            assert changed <= backup["changed"], "listed more than was written"
        run_snapfs("release", point)
        if not cancel:
            assert same_image(backup["target"], backup["copy"]), \
                f"{backup['name']}: the chain is not the image at its moment"
            if backup["sync"] == "incremental":
                held = own_clusters(backup["target"])
                assert held <= backup["changed"] | backup["during"], \
                    f"{backup['name']} holds clusters nobody changed: " \
                    f"{sorted(held - backup['changed'] - backup['during'])[:5]}"
            self.written -= backup["changed"]
            self.last = backup["target"]
        return backup


@pytest.fixture
def live(tmp_path):
    disk = LiveDisk(tmp_path, tmp_path / "disk.img")
    disk.source.write_bytes(random_bytes(SIZE, seed=1))
    disk.mount()
    try:
        yield Backups(disk)
    finally:
        disk.cleanup()


def test_full_then_incrementals_read_as_each_moment(live):
    need("qemu-img")
    live.start("full")
    live.write(3, seed=10)  # during the FULL: not its business, the next one's
    live.finish()
    for round_ in range(2):
        for cluster in (10, 20 + round_ * 2, 41):
            live.write(cluster, seed=100 * round_ + cluster)
        info = status(live.disk.live_dir)
        assert info["bytes_changed"] == len(live.written) * CLUSTER
        live.start("incremental")
        live.write(50, seed=7 + round_)  # copied before write into this one
        live.finish()
    chain = qemu_img("info", "--output=json", "--backing-chain", live.last).stdout
    layers = json.loads(chain)
    assert [os.path.basename(layer["filename"]) for layer in layers] == \
        ["b3.qcow2", "b2.qcow2", "b1.qcow2"]
    assert layers[0]["backing-filename"] == "b2.qcow2"  # relative: same directory
    assert layers[0]["backing-filename-format"] == "qcow2"
    assert qemu_img("check", live.last).returncode == 0


def test_refusals(live, tmp_path):
    def refused(*args, expect):
        result = run_snapfs("snapshot", live.disk.live_dir, tmp_path / "s", "--target",
                            tmp_path / "x.qcow2", *args, check=False)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert expect in result.stderr, result.stderr
        assert not (tmp_path / "x.qcow2").exists()
    (tmp_path / "s").mkdir()
    refused("--sync", "incremental", "--target-format", "qcow2", expect="no completed backup")
    refused("--sync", "incremental", "--target-format", "raw", expect="needs --target-format qcow2")
    refused("--sync", "full", "--base", live.disk.source, expect="--base goes with")
    live.start("full")
    live.finish()
    refused("--sync", "incremental", "--target-format", "qcow2", "--base", live.disk.source,
            expect="not a completed backup of this live disk")
    data = live.last.read_bytes()  # the base replaced by another file
    live.last.unlink()
    live.last.write_bytes(data)
    refused("--sync", "incremental", "--target-format", "qcow2", expect="take a full backup")


def test_differential_on_an_older_base(live):
    need("qemu-img")
    live.start("full")
    live.finish()
    full = live.last
    live.write(4, seed=1)
    live.start("incremental")
    live.finish()
    live.write(6, seed=2)
    backup = live.start("incremental", "--base", full)
    backup["changed"] = {4, 6}  # everything since the FULL
    live.finish()
    info = json.loads(qemu_img("info", "--output=json", live.last).stdout)
    assert info["backing-filename"] == full.name


def test_a_cancelled_incremental_gives_its_changes_back(live):
    need("qemu-img")
    live.start("full")
    live.finish()
    live.write(8, seed=3)
    live.start("incremental", "--speed", "1")
    live.finish(cancel=True)
    live.write(12, seed=4)
    backup = live.start("incremental")
    assert backup["changed"] == {8, 12}
    live.finish()


def test_a_change_while_unmounted_asks_for_a_full_backup(live):
    need("qemu-img")
    live.start("full")
    live.finish()
    live.disk.umount()
    with open(live.disk.source, "r+b") as f:  # another program, while nothing mounts it
        f.seek(5 * CLUSTER)
        f.write(b"offline")
    live.disk.mount()
    info = status(live.disk.live_dir)
    assert info["bytes_changed"] is None and "changed while no snapfs" in \
        info["change_tracking_reset"]
    (live.root / "s").mkdir()
    result = run_snapfs("snapshot", live.disk.live_dir, live.root / "s", "--target",
                        live.root / "x.qcow2", "--sync", "incremental", "--target-format",
                        "qcow2", check=False)
    assert result.returncode == 1 and "take a full backup" in result.stderr, result.stderr
    live.written = set()
    live.start("full")
    live.finish()
    live.write(9, seed=5)
    live.start("incremental")
    live.finish()


def test_tracking_survives_kill_9(live):
    need("qemu-img")
    live.start("full")
    live.finish()
    for cluster in (2, 30, 60):
        live.write(cluster, seed=cluster)
    pid = status(live.disk.live_dir)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    run_snapfs("umount", live.disk.live_dir, check=False)
    live.disk.mount()
    live.write(33, seed=6)
    assert status(live.disk.live_dir)["bytes_changed"] == 4 * CLUSTER
    live.start("incremental")
    live.finish()


def test_kill_9_in_the_middle_of_an_incremental(live):
    need("qemu-img")
    live.start("full")
    live.finish()
    for cluster in range(0, 100, 3):
        live.write(cluster, seed=cluster)
    backup = live.start("incremental", "--speed", "1M")
    pid = status(live.disk.live_dir)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))
    run_snapfs("umount", live.disk.live_dir, check=False)
    result = live.disk.mount()
    assert result.stderr == "", result.stderr  # the incremental came back
    assert status(live.root / backup["name"])["checkpoint"] == "pending"
    live.finish()
    assert status(live.disk.live_dir)["checkpoints"][-1]["target"] == str(backup["target"])
    live.write(1, seed=8)
    live.start("incremental")
    live.finish()


operations = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE // CLUSTER // 2 - 1), st.integers(0, 999)),
    st.just(("full",)), st.just(("incremental",)), st.just(("cancelled",)),
    st.just(("kill",)), st.just(("restart",)),
), min_size=3, max_size=9)


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_backups_against_copies(tmp_path_factory, ops):
    """Random writes (to every other cluster, so no writer looks sequential),
    FULL and incremental backups, cancels, kill -9 and clean restarts: after
    each completed backup its chain is the disk at its moment, and an
    incremental holds only what changed since its base."""
    need("qemu-img")
    root = tmp_path_factory.mktemp("model")
    disk = LiveDisk(root, root / "disk.img")
    disk.source.write_bytes(random_bytes(SIZE, seed=2))
    disk.mount()
    live = Backups(disk)
    try:
        for op in ops:
            if op[0] == "write":
                live.write(op[1] * 2, seed=op[2])
            elif op[0] == "full" or (op[0] in ("incremental", "cancelled") and live.last is None):
                live.start("full")
                live.finish()
            elif op[0] == "incremental":
                live.start("incremental")
                live.finish()
            elif op[0] == "cancelled":
                live.start("incremental", "--speed", "1")
                live.finish(cancel=True)
            elif op[0] == "kill":
                pid = status(disk.live_dir)["pid"]
                os.kill(pid, signal.SIGKILL)
                assert wait_until(lambda: not alive(pid))
                run_snapfs("umount", disk.live_dir, check=False)
                disk.mount()
            else:
                disk.umount()
                disk.mount()
        if live.last is not None:
            live.write(random.Random(len(ops)).randrange(SIZE // CLUSTER // 2) * 2, seed=1)
            live.start("incremental")
            live.finish()
    finally:
        disk.cleanup()
