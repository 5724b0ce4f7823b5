"""scripts/bench --quick end to end: the harness mounts both snapfs and the QEMU
anchor, measures, cleans up and writes a table with a figure for each system
in every row. Nothing is timed: the figures of a --quick run mean nothing.

It installs QEMU and fio if they are missing (through scripts/bench), then runs
everything once on a small image: about a quarter of a minute.
"""

import os
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the start of every row the table must have
ROWS = [
    "First-write sequential",
    "Overwrite sequential",
    "First-write 4 KiB random",
    "Overwrite 4 KiB random",
    "Snapshot sequential read, cold",
    "Snapshot sequential read ÷ cold dd of the source",
    "Snapshot 4 KiB random read",
    "FULL background copy",
    "FULL copy time ÷ cold cp",
    "FULL copy, until done + fsync",
    "TOP copy, sparse image",
    "TOP time ÷ FULL time",
    "Peak memory",
    "Start-up",
]


def _mounted_under(directory: str) -> list[str]:
    prefix = os.path.realpath(directory) + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
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
