"""scripts/bench --quick end to end: the harness mounts both snapfs and the QEMU
anchor, measures, cleans up and writes a table with a figure for each system
in every row. Nothing is timed: the figures of a --quick run mean nothing.

It installs QEMU and fio if they are missing (through scripts/bench), then runs
everything once on a small image: about half a minute. The other tests
here need neither root nor QEMU: the command line's errors, and the report's
rows built from made-up samples.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from snapfs.mounts import inside, mount_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_PY = os.path.join(ROOT, "scripts", "bench.py")

#: the start of every row the table must have
ROWS = [
    "First-write sequential (",
    "First-write sequential, 1 snapshot at once",
    "First-write sequential, 2 snapshots at once",
    "First-write sequential, 4 snapshots at once",
    "First-write sequential, 8 snapshots at once",
    "First-write sequential, 8 snapshots ÷ 1 snapshot",
    "Overwrite sequential",
    "First-write 4 KiB random",
    "Overwrite 4 KiB random",
    "Snapshot sequential read, cold",
    "Snapshot sequential read ÷ cold dd of the source",
    "Snapshot 4 KiB random read",
    "FULL background copy",
    "FULL copy time ÷ cold cp",
    "FULL copy, until done + fsync",
    "FULL copy until durable ÷ cold cp + fsync",
    "FULL copy on reflink XFS (SOURCE and TARGET on it), until durable",
    "FULL copy on reflink XFS until durable ÷ cp --reflink=never + fsync",
    "FULL on reflink XFS of a running disk, until durable ÷ cp --reflink=never",
    "TOP copy, sparse image",
    "TOP time ÷ FULL time",
    "Peak memory",
    "Memory in use after those writes",
    "Start-up",
    "Snapshot of a mounted live disk",
    "Change tracking on, overwrite sequential",
    "Change tracking on, overwrite 4 KiB random",
    "Change tracking on, first write since the backup, sequential",
    "Change tracking on, first write since the backup, 4 KiB random",
    "Queue depth 1, snapshot 4 KiB random read",
    "Queue depth 16, snapshot 4 KiB random read",
    "Queue depth 1, live disk 4 KiB random overwrite",
    "Queue depth 16, live disk 4 KiB random overwrite",
    "Queue depth 1, live disk 4 KiB random first write",
    "Queue depth 16, live disk 4 KiB random first write",
]


def _mounted_under(directory: str) -> list[str]:
    directory = os.path.realpath(directory)
    return [m.point for m in mount_table() if m.point != directory and inside(m.point, directory)]


def _sleeps_uninterruptibly(pid: str) -> bool:
    """A process in state D: reading its command line could hang this test
    (another test's FUSE server stuck under a loop device, on a shared machine)."""
    try:
        return any(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0] == "D"
                   for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, IndexError):
        return False


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and not _sleeps_uninterruptibly(entry):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry}: {cmdline}")
    return found


def _results_table(report: str) -> list[list[str]]:
    section = report.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["Measure", "snapfs", "QEMU"], header
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: FUSE mounts, drop_caches, apt")
def test_bench_quick_produces_a_full_table(tmp_path):
    workdir = tempfile.mkdtemp(prefix="snapfs-bench-test-", dir="/var/tmp")  # not tmpfs
    output = tmp_path / "benchmarks.md"
    try:
        result = subprocess.run(
            [os.path.join(ROOT, "scripts", "bench"), "--quick", "--workdir", workdir,
             "--output", str(output)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
        left_mounted = _mounted_under(workdir)
        left_running = _processes_mentioning(workdir)
    finally:
        for mount_point in _mounted_under(workdir):
            subprocess.run(["fusermount3", "-u", "-z", mount_point], check=False)
        shutil.rmtree(workdir, ignore_errors=True)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert not left_mounted, f"left mounted: {left_mounted}"
    assert not left_running, f"left running: {left_running}"

    report = output.read_text()
    rows = _results_table(report)
    labels = [row[0] for row in rows]
    for start in ROWS:
        assert any(label.startswith(start) for label in labels), f"no row {start!r}: {labels}"
    assert len(rows) == len(ROWS), labels
    for row in rows:
        measure, snapfs, qemu, versus, target, met = row
        assert re.search(r"\d", snapfs), f"no snapfs figure in {row}"
        assert re.search(r"\d", qemu), f"no QEMU figure in {row}"
        assert re.search(r"\d", versus), f"no ratio in {row}"
        assert met in ("met", "**NOT met**", "—"), row
    for heading in ("## Correctness checks", "## All samples", "## Machine"):
        assert heading in report
    assert "qemu-storage-daemon version" in report


def _bench_py(*args: str) -> subprocess.CompletedProcess:
    """scripts/bench.py itself, without the install step of scripts/bench."""
    return subprocess.run([sys.executable, BENCH_PY, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, error", [
    (["--size", "3X"], "argument --size: not a size: '3X'"),
    (["--memory-disk", "1.5G"], "argument --memory-disk: not a size: '1.5G'"),
    (["--size", "3M"], "--size must be a multiple of 2 MiB, at least 4 MiB"),
    (["--groups", "write,nope"], "unknown groups: nope"),
])
def test_bad_options_are_usage_errors(args, error):
    result = _bench_py(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == f"scripts/bench: error: {error}"


@pytest.fixture
def benchlib(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import benchlib.report
    return benchlib


def test_notes_from_the_command_line(benchlib):
    from benchlib.cli import parse_args

    args = parse_args(["--note", "shared machine", "--note", "second"])
    assert args.note == ["shared machine", "second"]
    assert parse_args([]).note == []


def test_report_rows_from_samples(benchlib):
    from benchlib.config import MiB, BenchConfig
    from benchlib.results import REFERENCE, Results

    config = BenchConfig(size=64 * MiB, repeat=1, workdir="/nonexistent", output="/nonexistent",
                         quick=True, groups=("write",), memory_disk=1 << 40)
    results = Results()
    for key, snapfs, qemu in [("seq_first", 400, 100), ("seq_first_1", 400, 100),
                              ("seq_first_2", 300, 90), ("seq_first_4", 200, 80),
                              ("seq_first_8", 100, 50), ("take", 0.3, 0.03),
                              ("seq_over", 300, 200),
                              ("rand_first", 1000, 1000), ("rand_over", 1, 2),
                              ("snap_seq", 900, 600), ("snap_rand", 3, 3),
                              ("full", 1.0, 4.0), ("full_sync", 1.0, 1.0),
                              ("reflink_full_sync", 0.5, 2.0), ("reflink_take_sync", 0.1, 1.0),
                              ("top", 0.2, 0.5), ("memory", 50, 40), ("memory_pss", 30, 40), ("startup", 0.3, 0.1),
                              ("untrk_seq_over", 1000, 800), ("trk_seq_over", 960, 800),
                              ("untrk_rand_over", 10000, 20000), ("trk_rand_over", 9000, 20000),
                              ("untrk_seq_first", 1000, 800), ("trk_seq_first", 800, 800),
                              ("untrk_rand_first", 20000, 30000),
                              ("trk_rand_first", 2000, 30000),
                              ("depth_read_1", 11000, 12000), ("depth_read_16", 12000, 30000),
                              ("depth_over_1", 15000, 14000), ("depth_over_16", 20000, 25000),
                              ("depth_first_1", 5000, 5000), ("depth_first_16", 6000, 5000)]:
        results.add(key, "snapfs", snapfs)
        results.add(key, "qemu", qemu)
    results.add("full_mount", "snapfs", 0.1)
    results.add("top_mount", "snapfs", 0.1)
    results.add("src_seq", REFERENCE, 1000)
    results.add("cp", REFERENCE, 2.0)
    results.add("cp_sync", REFERENCE, 2.0)
    results.add("reflink_cp_sync", REFERENCE, 2.0)
    results.sparse_allocated = 64 * MiB // 10

    rows = benchlib.report.build_rows(config, results)
    assert [row["measure"] for row in rows][:3] == [
        "First-write sequential (dd 1M, 32 MiB, fdatasync)",
        "First-write sequential, 1 snapshot at once (dd 1M, 32 MiB, fdatasync)",
        "First-write sequential, 2 snapshots at once (dd 1M, 32 MiB, fdatasync)"]
    assert len(rows) == len(ROWS)
    for start, row in zip(ROWS, rows):
        assert row["measure"].startswith(start), (start, row)
    by_start = dict(zip(ROWS, rows))
    assert by_start["First-write sequential ("]["versus"] == "4.00x faster"
    assert by_start["First-write sequential ("]["met"] == "met"
    assert by_start["First-write sequential, 8 snapshots at once"]["versus"] == "2.00x faster"
    assert by_start["First-write sequential, 8 snapshots at once"]["met"] == "—"
    eight_by_one = by_start["First-write sequential, 8 snapshots ÷ 1 snapshot"]
    assert (eight_by_one["snapfs"], eight_by_one["qemu"]) == ("0.25", "0.50")  # 100/400, 50/100
    assert eight_by_one["versus"] == "2.00x worse"
    assert by_start["Snapshot of a mounted live disk"]["snapfs"] == "0.30 s"
    assert by_start["Overwrite 4 KiB random"]["versus"] == "2.00x slower"
    assert by_start["Overwrite 4 KiB random"]["met"] == "**NOT met**"
    assert by_start["FULL background copy"]["versus"] == "4.00x faster"
    assert by_start["FULL copy time ÷ cold cp"]["snapfs"] == "0.50"
    assert by_start["TOP time ÷ FULL time"]["snapfs"] == "0.11"  # (0.2 - 0.1) / (1.0 - 0.1)
    assert by_start["Peak memory"]["versus"] == "1.25x more"
    assert by_start["Memory in use after those writes"]["versus"] == "1.33x less"
    assert by_start["FULL copy, until done + fsync"]["met"] == "—"
    durable = by_start["FULL copy until durable ÷ cold cp + fsync"]
    assert (durable["snapfs"], durable["qemu"], durable["met"]) == ("0.50", "0.50", "met")
    reflink = by_start["FULL copy on reflink XFS until durable ÷ cp --reflink=never + fsync"]
    assert (reflink["snapfs"], reflink["qemu"], reflink["met"]) == ("0.25", "1.00", "—")
    running = by_start["FULL on reflink XFS of a running disk, until durable ÷ cp --reflink=never"]
    assert (running["snapfs"], running["qemu"], running["met"]) == ("0.05", "1.00", "met")
    assert running["versus"] == "20.00x less"
    seq_over = by_start["Change tracking on, overwrite sequential"]
    assert seq_over["measure"] == ("Change tracking on, overwrite sequential (dd 1M, 32 MiB, "
                                   "fdatasync): tracked ÷ untracked")
    assert (seq_over["snapfs"], seq_over["qemu"], seq_over["met"]) == ("0.96", "1.00", "met")
    assert seq_over["versus"] == "1.04x worse"
    rand_over = by_start["Change tracking on, overwrite 4 KiB random"]
    assert (rand_over["snapfs"], rand_over["met"]) == ("0.90", "**NOT met**")
    assert by_start["Change tracking on, first write since the backup, sequential"]["snapfs"] == "0.80"
    rand_first = by_start["Change tracking on, first write since the backup, 4 KiB random"]
    assert (rand_first["snapfs"], rand_first["qemu"]) == ("0.10", "1.00")
    assert rand_first["target"] == "snapfs ≥ 0.95 (within 5%)"

    table = benchlib.report.markdown_table(rows)
    assert table.count("\n") == len(ROWS) + 2


def test_report_without_figures(benchlib):
    from benchlib.config import MiB, BenchConfig
    from benchlib.results import Results

    config = BenchConfig(size=64 * MiB, repeat=1, workdir="/nonexistent", output="/nonexistent",
                         quick=True, groups=("write",), memory_disk=1 << 40)
    rows = benchlib.report.build_rows(config, Results())
    assert len(rows) == len(ROWS)
    assert all(row["snapfs"] == "failed" and row["met"] == "no figure" for row in rows)


def test_qemu_anchor_with_one_target_is_the_one_measured(benchlib, monkeypatch):
    """qemu_cbw stacks a filter per target; with one it is the setup the
    figures in docs/benchmarks.md were taken with."""
    from benchlib import qemu_side

    created = []
    monkeypatch.setattr(qemu_side, "run", lambda cmd, **kwargs: created.append(cmd))
    daemon = qemu_side.qemu_cbw("/w", "/w/img/disk.img", ["/w/img/t.qcow2"], print)
    assert created == [["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/w/img/disk.img",
                        "-F", "raw", "/w/img/t.qcow2"]]
    assert daemon.args == [
        "--blockdev", "file,node-name=srcf,filename=/w/img/disk.img",
        "--blockdev", "raw,node-name=src,file=srcf",
        "--blockdev", "file,node-name=tgtf,filename=/w/img/t.qcow2",
        "--blockdev", "qcow2,node-name=tgt,file=tgtf,backing=src",
        "--blockdev", "copy-before-write,node-name=cbw,file=src,target=tgt",
        "--blockdev", "snapshot-access,node-name=acc,file=cbw",
        "--export", "fuse,id=e1,node-name=cbw,mountpoint=/w/qemu/live.img,writable=on",
        "--export", "fuse,id=e2,node-name=acc,mountpoint=/w/qemu/snap.img",
    ]
    assert (daemon.live, daemon.snapshot) == ("/w/qemu/live.img", "/w/qemu/snap.img")

    stacked = qemu_side.qemu_cbw("/w", "/w/img/disk.img", ["/w/a", "/w/b", "/w/c"], print)
    assert "copy-before-write,node-name=cbw3,file=cbw2,target=tgt3" in stacked.args
    assert "fuse,id=e1,node-name=cbw3,mountpoint=/w/qemu/live.img,writable=on" in stacked.args
    assert stacked.mountpoints == ["/w/qemu/live.img", "/w/qemu/snap.img",
                                   "/w/qemu/snap2.img", "/w/qemu/snap3.img"]
    assert stacked.snapshot_files == stacked.mountpoints[1:]

    alone = qemu_side.qemu_cbw("/w", "/w/img/disk.img", [], print)
    assert alone.args[-2:] == ["--export",
                               "fuse,id=e1,node-name=src,mountpoint=/w/qemu/live.img,writable=on"]
    assert (alone.mountpoints, alone.snapshot) == (["/w/qemu/live.img"], None)


def test_snapfs_processes_are_found_by_command_line(benchlib):
    """The fallback that finds an instance's processes when their pids were
    not learnt: the live process and each snapshot's process, of this work
    directory only."""
    from benchlib.snapfs_side import is_instance_process

    base = "/var/tmp/snapfs-bench/snapfs"
    live = ["/x/.venv/bin/python3", "-m", "snapfs.daemon",
            '{"source": "/var/tmp/snapfs-bench/img/disk.img", '
            '"live": "/var/tmp/snapfs-bench/snapfs/live", "format": "raw", "snapshot": null}',
            "--ready-fd", "4", ""]
    snapshot = ["/x/.venv/bin/python3", "-m", "snapfs.daemon.snapshot_server",
                '{"name": "disk.img", "mountpoint": "/var/tmp/snapfs-bench/snapfs/snap3"}', ""]
    assert is_instance_process(live, base)
    assert is_instance_process(snapshot, base)
    assert not is_instance_process(live, "/var/tmp/other/snapfs")
    assert not is_instance_process(["python3", "-m", "snapfs.cli", base + "/live"], base)
    assert not is_instance_process(["vim", base + "/live"], base)


def test_snapfs_commands_of_an_instance(benchlib, monkeypatch, tmp_path):
    """A live disk alone, then snapshots taken with `snapfs snapshot`, each in
    its own directory; the snapshot's status is asked of the snapshot, and it
    is released by its mount point."""
    from benchlib import snapfs_side

    commands, directories = [], []

    def record(cmd, kwargs):
        commands.append(cmd)
        directories.append(kwargs.get("cwd"))

    monkeypatch.setattr(snapfs_side, "timed", lambda cmd, **kwargs: record(cmd, kwargs) or 0.5)
    monkeypatch.setattr(snapfs_side, "descendants", lambda pid: [pid, pid + 1])

    class Done:
        stdout = '{"pid": 100, "snapshots": [{"pid": 101, "clusters_copied_by_writes": 3}]}'

    monkeypatch.setattr(snapfs_side, "run", lambda cmd, **kwargs: record(cmd, kwargs) or Done)
    instance = snapfs_side.SnapfsInstance(str(tmp_path), str(tmp_path / "disk.img"), print)
    instance.mount_live()
    instance.take_snapshot(str(tmp_path / "t1.img"), "none")
    instance.take_snapshot(str(tmp_path / "t2.img"), "full")
    instance.snapshot_status(1)
    instance.release(1)
    live, snapfs = str(tmp_path / "snapfs" / "live"), str(tmp_path / "snapfs")
    assert commands == [
        ["snapfs", "mount", str(tmp_path / "disk.img"), live],
        ["snapfs", "status", live, "--json"],
        ["snapfs", "snapshot", live, snapfs + "/snap", "--target", str(tmp_path / "t1.img"),
         "--sync", "none", "--force"],
        ["snapfs", "snapshot", live, snapfs + "/snap2", "--target", str(tmp_path / "t2.img"),
         "--sync", "full", "--force"],
        ["snapfs", "status", snapfs + "/snap2", "--json"],
        ["snapfs", "release", snapfs + "/snap2"],
    ]
    # never where a `snapfs` package could shadow the installed one (python -m
    # puts the current directory first on the daemon's module path)
    assert directories == [snapfs] * len(commands)
    assert instance.pids == [100, 101]
    assert instance.snapshot_seconds == [0.5, 0.5]
    assert instance.snapshot_files == [snapfs + "/snap/disk.img", snapfs + "/snap2/disk.img"]


def test_qemu_change_tracking_anchor(benchlib, monkeypatch, tmp_path):
    """QEMU's change tracking: a qcow2 image exported as it is, and a
    persistent dirty bitmap added in one transaction with a FULL backup; the
    target's nodes go once the job completed."""
    from benchlib import qemu_side

    daemon = qemu_side.qemu_plain_disk("/w", "/w/img/disk.qcow2", print)
    assert daemon.args == [
        "--blockdev", "file,node-name=srcf,filename=/w/img/disk.qcow2",
        "--blockdev", "qcow2,node-name=src,file=srcf",
        "--export", "fuse,id=e1,node-name=src,mountpoint=/w/qemu/live.img,writable=on",
    ]
    assert (daemon.live, daemon.mountpoints) == ("/w/qemu/live.img", ["/w/qemu/live.img"])

    class Qmp:
        def __init__(self):
            self.commands = []

        def command(self, name, **arguments):
            self.commands.append((name, arguments))
            if name == "query-named-block-nodes":
                return [{"node-name": "srcf"}, {"node-name": "src", "dirty-bitmaps": [
                    {"name": "bench", "persistent": True, "count": 65536}]}]
            return {}

        def wait_event(self, name, timeout):
            return {"event": name, "data": {}}

    daemon.qmp = Qmp()
    target = tmp_path / "full.img"
    qemu_side.qemu_backup_with_bitmap(daemon, str(target), 1 << 20)
    assert target.stat().st_size == 1 << 20
    names = [name for name, _ in daemon.qmp.commands]
    assert names == ["blockdev-add", "blockdev-add", "transaction", "blockdev-del",
                     "blockdev-del", "query-named-block-nodes"]
    actions = daemon.qmp.commands[2][1]["actions"]
    assert actions == [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "src", "name": "bench", "persistent": True}},
        {"type": "blockdev-backup",
         "data": {"job-id": "full", "device": "src", "target": "tgt", "sync": "full"}},
    ]
    assert qemu_side.qemu_bitmap_count(daemon) == 65536
