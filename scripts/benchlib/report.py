"""The report: the results table (medians, snapfs vs QEMU ratios, the targets
set for snapfs and whether they are met), the correctness checks, the notes,
every sample, and a description of the machine; as markdown, on stdout and in
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys

from benchlib.config import KiB, MiB, GiB, TiB, ROOT, BenchConfig
from benchlib.host import PageCache
from benchlib.results import REFERENCE, SYSTEMS, Results
from benchlib.snapfs_side import snapfs_python


def size_text(n: int) -> str:
    """A size in the largest unit that divides it ("32 MiB", "1 TiB"). Not
    snapfs.units.human, which rounds to one decimal ("32.0 MiB"): these go into
    row labels, and stay what they were."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


# --- the results table ------------------------------------------------------------

def speed_ratio(snapfs: float, qemu: float, higher_better: bool, better: str,
                worse: str) -> tuple[float, str]:
    """(advantage of snapfs, e.g. 2.0 for twice as good; its wording)."""
    r = snapfs / qemu if higher_better else qemu / snapfs
    return r, (f"{r:.2f}x {better}" if r >= 1 else f"{1 / r:.2f}x {worse}")


def fmt(value: float | None, unit: str) -> str:
    """A median as the table shows it."""
    if value is None:
        return "failed"
    if unit in ("MB/s", "IOPS"):
        return f"{value:,.0f} {unit}"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:.2f}"


def build_rows(config: BenchConfig, results: Results) -> list[dict]:
    """The table's rows: measure, both medians, snapfs vs QEMU, target, met."""
    m = results.median
    rows = []

    def row(label, key, unit, higher_better, target_text, target_ok, better="faster",
            worse="slower", values=None):
        s, q = values if values else (m(key, "snapfs"), m(key, "qemu"))
        if s is None or q is None or not q or not s:
            versus, met = "—", "no figure"
        else:
            r, versus = speed_ratio(s, q, higher_better, better, worse)
            met = ("—" if target_ok is None else
                   "met" if target_ok(s, q, r) else "**NOT met**")
        rows.append({"measure": label, "snapfs": fmt(s, unit), "qemu": fmt(q, unit),
                     "versus": versus, "target": target_text, "met": met})

    half = size_text(config.half)
    row(f"First-write sequential (dd 1M, {half}, fdatasync)", "seq_first", "MB/s", True,
        "≥ 2x QEMU", lambda s, q, r: r >= 2)
    counts = config.snapshot_counts
    for n in counts:
        row(f"First-write sequential, {n} snapshot{'s' if n > 1 else ''} at once "
            f"(dd 1M, {half}, fdatasync)", f"seq_first_{n}", "MB/s", True, "(information)", None)

    def kept(sysname):  # the share of the 1-snapshot throughput kept with the most snapshots
        one, most = m(f"seq_first_{counts[0]}", sysname), m(f"seq_first_{counts[-1]}", sysname)
        return most / one if one and most else None

    row(f"First-write sequential, {counts[-1]} snapshots ÷ {counts[0]} snapshot", None, "x",
        True, "(information)", None, better="better", worse="worse",
        values=(kept("snapfs"), kept("qemu")))
    row(f"Overwrite sequential (dd 1M, {half}, fdatasync)", "seq_over", "MB/s", True,
        "≥ 1.5x QEMU", lambda s, q, r: r >= 1.5)
    row("First-write 4 KiB random (fio psync)", "rand_first", "IOPS", True,
        "≥ 1.5x QEMU", lambda s, q, r: r >= 1.5)
    row("Overwrite 4 KiB random (fio psync)", "rand_over", "IOPS", True,
        "≥ 1x QEMU", lambda s, q, r: r >= 1)
    row("Snapshot sequential read, cold (dd 1M)", "snap_seq", "MB/s", True,
        "≥ 1.5x QEMU", lambda s, q, r: r >= 1.5)
    src = m("src_seq", REFERENCE)
    ratio = lambda key, sysname: (m(key, sysname) / src) if src and m(key, sysname) else None
    row(f"Snapshot sequential read ÷ cold dd of the source ({fmt(src, 'MB/s')})", None, "x",
        True, "snapfs ≥ 0.83 (within 1.2x of the source)", lambda s, q, r: s >= 1 / 1.2,
        values=(ratio("snap_seq", "snapfs"), ratio("snap_seq", "qemu")))
    row("Snapshot 4 KiB random read, cold (fio psync)", "snap_rand", "IOPS", True,
        "≥ 1x QEMU", lambda s, q, r: r >= 1)
    row(f"FULL background copy, {size_text(config.size)} (until done)", "full", "s", False,
        "≥ 3x faster than QEMU", lambda s, q, r: r >= 3)
    cp = m("cp", REFERENCE)
    by_cp = lambda sysname: (m("full", sysname) / cp) if cp and m("full", sysname) else None
    row(f"FULL copy time ÷ cold cp of the file ({fmt(cp, 's')})", None, "x", False,
        "snapfs ≤ 1 (no slower than cp)", lambda s, q, r: s <= 1,
        better="less", worse="more", values=(by_cp("snapfs"), by_cp("qemu")))
    row("FULL copy, until done + fsync of the target", "full_sync", "s", False,
        "(information)", None)

    def durable_by(key, reference, sysname):  # until durable ÷ a plain copy + fsync
        ref, t = m(reference, REFERENCE), m(f"{key}_sync", sysname)
        return t / ref if ref and t else None

    cp_sync = m("cp_sync", REFERENCE)
    row(f"FULL copy until durable ÷ cold cp + fsync of the file ({fmt(cp_sync, 's')})", None,
        "x", False, "snapfs ≤ 1 (no slower than cp + fsync)", lambda s, q, r: s <= 1,
        better="less", worse="more",
        values=(durable_by("full", "cp_sync", "snapfs"), durable_by("full", "cp_sync", "qemu")))
    row("FULL copy on reflink XFS (SOURCE and TARGET on it), until durable",
        "reflink_full_sync", "s", False, "(information)", None)
    reflink_cp = m("reflink_cp_sync", REFERENCE)
    row(f"FULL copy on reflink XFS until durable ÷ cp --reflink=never + fsync there "
        f"({fmt(reflink_cp, 's')})", None, "x", False, "(information)", None,
        better="less", worse="more",
        values=(durable_by("reflink_full", "reflink_cp_sync", "snapfs"),
                durable_by("reflink_full", "reflink_cp_sync", "qemu")))
    # a backup of a disk in use: the live disk (snapfs) or the daemon (QEMU) runs already
    row(f"FULL on reflink XFS of a running disk, until durable ÷ cp --reflink=never + "
        f"fsync there (snapfs: `snapfs snapshot --wait`)", None, "x", False,
        "snapfs ≤ 0.1 (10x faster)", lambda s, q, r: s <= 0.1, better="less", worse="more",
        values=(durable_by("reflink_take", "reflink_cp_sync", "snapfs"),
                durable_by("reflink_full", "reflink_cp_sync", "qemu")))
    allocated = (results.sparse_allocated if results.sparse_allocated is not None
                 else config.size * config.sparse_share)
    share = allocated / config.size
    row(f"TOP copy, sparse image ({100 * share:.0f}% allocated)", "top", "s", False,
        "(information)", None)

    def by_full(sysname):
        top, full = m("top", sysname), m("full", sysname)
        if not top or not full:
            return None
        if sysname == "snapfs":  # without snapfs' start-up: QEMU's times exclude it too
            top -= m("top_mount", sysname) or 0
            full -= m("full_mount", sysname) or 0
        return top / full if full > 0 else None

    row(f"TOP time ÷ FULL time, start-up excluded (allocated share {share:.2f})", None, "x", False,
        f"snapfs ≤ {2 * share:.2f} (2x the allocated share)", lambda s, q, r: s <= 2 * share,
        better="less", worse="more", values=(by_full("snapfs"), by_full("qemu")))
    row(f"Peak memory, {size_text(config.memory_disk)} sparse disk, sync none, "
        f"{size_text(config.memory_writes)} of random 64 KiB writes", "memory", "MiB", False,
        "snapfs ≤ 100 MiB", lambda s, q, r: s <= 100, better="less", worse="more")
    row("Memory in use after those writes, proportional set size (PSS) summed", "memory_pss",
        "MiB", False, "(information)", None, better="less", worse="more")
    row(f"Start-up on a {size_text(config.memory_disk)} sparse image", "startup", "s", False,
        "snapfs ≤ 2 s", lambda s, q, r: s <= 2)
    row(f"Snapshot of a mounted live disk, {size_text(config.memory_disk)} sparse image",
        "take", "s", False, "(information)", None)

    def tracked(key, sysname):  # with change tracking ÷ with none, same writes
        t, u = m(f"trk_{key}", sysname), m(f"untrk_{key}", sysname)
        return t / u if t and u else None

    for key, label in (
            ("seq_over", f"overwrite sequential (dd 1M, {half}, fdatasync)"),
            ("rand_over", "overwrite 4 KiB random (fio psync)"),
            ("seq_first", f"first write since the backup, sequential (dd 1M, {half}, fdatasync)"),
            ("rand_first", "first write since the backup, 4 KiB random, one per cluster "
                           "(fio psync)")):
        row(f"Change tracking on, {label}: tracked ÷ untracked", None, "x", True,
            "snapfs ≥ 0.95 (within 5%)", lambda s, q, r: s >= 0.95, better="better",
            worse="worse", values=(tracked(key, "snapfs"), tracked(key, "qemu")))

    def plain(key):  # the plain file's figure, in the label
        value = m(key, REFERENCE)
        return f"; plain file {fmt(value, 'IOPS')}" if value else ""

    for depth, target_text, target_ok in (
            (1, "≥ 0.9x QEMU", lambda s, q, r: r >= 0.9),
            (16, "≥ 1.5x QEMU", lambda s, q, r: r >= 1.5)):
        row(f"Queue depth {depth}, snapshot 4 KiB random read, cold (fio libaio O_DIRECT"
            f"{plain(f'depth_read_{depth}')})", f"depth_read_{depth}", "IOPS", True,
            target_text, target_ok)
    for key, what in (("over", "overwrite"), ("first", "first write, copy-before-write")):
        for depth in (1, 16):
            row(f"Queue depth {depth}, live disk 4 KiB random {what} (fio libaio O_DIRECT"
                f"{plain(f'depth_{key}_{depth}') if key == 'over' else ''})",
                f"depth_{key}_{depth}", "IOPS", True,
                *(("(information)", None) if depth == 1 else
                  ("≥ 1.2x QEMU", lambda s, q, r: r >= 1.2)))
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| Measure | snapfs | QEMU | snapfs vs QEMU | Target | Met |\n"
            "|---|---:|---:|---|---|---|\n")
    return head + "".join(
        f"| {r['measure']} | {r['snapfs']} | {r['qemu']} | {r['versus']} | {r['target']} "
        f"| {r['met']} |\n" for r in rows)


# --- all samples --------------------------------------------------------------------

#: sample key -> (what it is, unit), in the order of the samples table
LABELS = {
    "seq_first": ("first-write sequential", "MB/s"), "seq_over": ("overwrite sequential", "MB/s"),
    "rand_first": ("first-write 4 KiB random", "IOPS"), "rand_over": ("overwrite 4 KiB random", "IOPS"),
    "snap_seq": ("snapshot sequential read, cold", "MB/s"),
    "snap_rand": ("snapshot 4 KiB random read, cold", "IOPS"),
    "src_seq": ("source file sequential read, cold (dd)", "MB/s"),
    "full": ("FULL copy, until done", "s"), "full_sync": ("FULL copy, + fsync of target", "s"),
    "cp": ("cold cp of the file", "s"), "cp_sync": ("cold cp + fsync", "s"),
    "reflink_full": ("FULL copy on reflink XFS, until done", "s"),
    "reflink_full_sync": ("FULL copy on reflink XFS, + fsync of target", "s"),
    "reflink_full_mount": ("FULL copy on reflink XFS: of which `snapfs mount`", "s"),
    "reflink_take": ("FULL on reflink XFS of a mounted live disk, `snapfs snapshot --wait` "
                     "until it returns", "s"),
    "reflink_take_sync": ("FULL on reflink XFS, `snapfs snapshot --wait`, + fsync of target",
                          "s"),
    "reflink_cp_sync": ("cold cp --reflink=never + fsync on reflink XFS", "s"),
    "top": ("TOP copy, until done", "s"), "top_sync": ("TOP copy, + fsync of target", "s"),
    "full_mount": ("FULL copy: of which `snapfs mount`", "s"),
    "top_mount": ("TOP copy: of which `snapfs mount`", "s"),
    "memory": ("peak RSS (VmHWM)", "MiB"),
    "memory_pss": ("memory in use after the writes (PSS sum)", "MiB"),
    "startup": ("start-up", "s"),
    "startup_live": ("start-up of the live disk alone", "s"),
    "take": ("snapshot of a mounted live disk", "s"),
    **{f"{prefix}_{key}": (f"{what}: {label}", unit)
       for prefix, what in (("untrk", "no backup taken (untracked)"),
                            ("trk", "change tracking on"))
       for key, label, unit in (("seq_first", "first write sequential", "MB/s"),
                                ("seq_over", "overwrite sequential", "MB/s"),
                                ("rand_first", "first write 4 KiB random", "IOPS"),
                                ("rand_over", "overwrite 4 KiB random", "IOPS"))},
    **{f"seq_first_{n}": (f"first-write sequential, {n} snapshot{'s' if n > 1 else ''}", "MB/s")
       for n in BenchConfig.snapshot_counts},
    **{f"depth_{key}_{depth}": (f"queue depth {depth}: {what} (fio libaio O_DIRECT)", "IOPS")
       for key, what in (("read", "snapshot 4 KiB random read, cold"),
                         ("over", "live disk 4 KiB random overwrite"),
                         ("first", "live disk 4 KiB random first write"))
       for depth in (1, 16)},
}

#: Results.extra key -> (what it is, unit)
EXTRA_LABELS = {
    "clusters_copied_by_writes": ("clusters copied before a write (snapfs status)", ""),
    **{f"clusters_copied_{n}": (f"{n} snapshot{'s' if n > 1 else ''}: clusters copied before a "
                                "write, per snapshot", "") for n in BenchConfig.snapshot_counts},
    "take_multi": ("`snapfs snapshot` in the first-write rows with several snapshots, each", "s"),
    "full_allocated": ("FULL target, allocated bytes", "MiB"),
    "top_allocated": ("TOP target, allocated bytes", "MiB"),
    "reflink_used": ("FULL copy on reflink XFS: space it took there (df)", "MiB"),
    "trk_changed": ("change tracking: bytes marked changed after the writes", "MiB"),
    **{f"trk_ratio_{key}": (f"change tracking: {label}, tracked ÷ untracked, per repetition", "x")
       for key, label in (("seq_first", "first write sequential"),
                          ("seq_over", "overwrite sequential"),
                          ("rand_first", "first write 4 KiB random"),
                          ("rand_over", "overwrite 4 KiB random"))},
    "depth_clusters_copied": ("queue depth rows: clusters copied before a write (snapfs "
                              "status)", ""),
}


def samples_table(results: Results) -> str:
    lines = ["| Measure | System | Unit | Median | Samples (in order) |", "|---|---|---|---:|---|"]
    for key, (label, unit) in LABELS.items():
        for system in (*SYSTEMS, REFERENCE):
            values = results.samples.get(key, {}).get(system)
            if values:
                digits = 0 if unit in ("MB/s", "IOPS") else 2
                lines.append(f"| {label} | {system} | {unit} | "
                             f"{statistics.median(values):,.{digits}f} | "
                             + ", ".join(f"{v:,.{digits}f}" for v in values) + " |")
    for key, (label, unit) in EXTRA_LABELS.items():
        for system, values in results.extra.get(key, {}).items():
            if unit == "MiB":
                values = [v / MiB for v in values]
            digits = 2 if unit else 0
            lines.append(f"| {label} | {system} | {unit} | "
                         f"{statistics.median(values):,.{digits}f} | "
                         + ", ".join(f"{v:,.{digits}f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


# --- the machine --------------------------------------------------------------------

def _first_line(cmd: list[str]) -> str:
    """The first line a command prints (stdout, else stderr), or "unknown"."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (result.stdout or result.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> list[tuple[str, str]]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return [("CPU", cpu), ("cores", str(os.cpu_count())), ("memory", mem),
            ("kernel", f"{platform.release()} ({platform.machine()})"),
            ("OS", _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]))]


def machine_disk(workdir: str) -> list[tuple[str, str]]:
    """The work directory's file system and the disk under it."""
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    fs = out(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", workdir]) or "unknown"
    source = fs.split()[0] if fs != "unknown" else ""
    disk = ""
    if source.startswith("/dev/"):
        parent = out(["lsblk", "-no", "PKNAME", source]).splitlines()
        device = "/dev/" + parent[0] if parent and parent[0] else source
        fields = {name: out(["lsblk", "-dno", name, device]) for name in ("SIZE", "ROTA", "MODEL")}
        if fields["SIZE"]:
            disk = (f"{device}, {fields['SIZE']}, "
                    + ("rotational" if fields["ROTA"] == "1" else "not rotational")
                    + " (as the kernel sees it)"
                    + (f", model {fields['MODEL']}" if fields["MODEL"] else ""))
    return [("work directory", workdir), ("file system", fs), ("disk", disk or "unknown")]


def versions() -> list[tuple[str, str]]:
    python = snapfs_python() or sys.executable
    git = _first_line(["git", "-C", ROOT, "describe", "--always", "--dirty", "--abbrev=12"])
    return [
        ("snapfs", f"git {git}"),
        ("python (snapfs)", _first_line([python, "-c", "import sys; print(sys.version.split()[0])"])),
        ("pyfuse3", _first_line([python, "-c", "import pyfuse3; print(pyfuse3.__version__)"])),
        ("trio", _first_line([python, "-c", "import trio; print(trio.__version__)"])),
        ("libfuse (fusermount3)", _first_line(["fusermount3", "-V"])),
        ("qemu-storage-daemon", _first_line(["qemu-storage-daemon", "--version"])),
        ("fio", _first_line(["fio", "--version"])),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def describe(workdir: str) -> list[tuple[str, str]]:
    """The "Machine" section, but for the load average (taken around the run)."""
    return machine() + machine_disk(workdir) + versions()


# --- the report file ------------------------------------------------------------------

PREFACE = """\
# Benchmarks: snapfs against qemu-storage-daemon

This file is written by `scripts/bench` (the harness: `scripts/bench.py` and
the modules in `scripts/benchlib/`). It compares snapfs with the QEMU anchor,
qemu-storage-daemon from the distribution, doing the same job on the same
images:

- **live disk and snapshot**: a `copy-before-write` filter over the raw source
  with a qcow2 target (backing: the source), exported writable over FUSE, and a
  `snapshot-access` node over it exported read-only over FUSE; snapfs runs
  `snapfs mount SOURCE LIVE SNAPSHOT --target TARGET --sync none` (the live
  disk and one snapshot in one command);
- **several snapshots at once** (the "N snapshots at once" rows): snapfs runs
  `snapfs mount SOURCE LIVE` (the live disk alone), then N times `snapfs
  snapshot LIVE SNAPSHOTi --target TARGETi --sync none` (each snapshot served
  by a process of its own); QEMU stacks N `copy-before-write` filters, each
  with its own qcow2 target and `snapshot-access` export, the live disk on the
  top one. Either way every first write to a cluster copies its old data into
  N targets;
- **a snapshot of a mounted live disk**: `snapfs snapshot --sync none` on a
  live disk from `snapfs mount SOURCE LIVE`; QEMU 7.2 cannot put a filter
  under a running export, so it takes one by image fleecing (what libvirt does
  for a pull-mode backup): `qemu-img create` of a qcow2 target backed by the
  source, `blockdev-add`, `blockdev-backup sync=none` into it,
  `block-export-add` of it over FUSE, timed until the export is mounted;
- **background copy**: `blockdev-backup` (sync `full` or `top`) between raw
  nodes, timed until `BLOCK_JOB_COMPLETED`; snapfs runs `snapfs mount --sync
  full|top` and is timed from the start of `snapfs mount` until `snapfs wait`
  returns (its start-up included).
- **FULL on reflink XFS** (the "reflink XFS" rows): SOURCE and TARGET on an
  XFS made with `mkfs.xfs -m reflink=1` on a sparse file in the work
  directory, loop-mounted, anew for every turn; snapfs clones the clusters
  (FICLONERANGE), QEMU's `blockdev-backup` copies them (its copy offload is
  off by default). The reference is `cp --reflink=never` of the same file on
  the same XFS + fsync. snapfs is timed twice: from `snapfs mount` (as the
  other background copy rows), and from `snapfs snapshot` on a live disk
  already mounted, until `snapfs wait` returns and the target is fsynced;
- **change tracking** (the "Change tracking on" rows, tracked ÷ untracked):
  the writes of the first-write and overwrite rows on a live disk with no
  snapshot, each time on a fresh copy of the image, once *tracked* and once
  *untracked*. snapfs: `snapfs mount SOURCE LIVE`, and for the tracked one
  `snapfs snapshot --sync full`, `snapfs wait`, `snapfs release` first (a
  completed FULL backup: from then on the first write to each cluster syncs
  its bit in the change map before it proceeds); the untracked live disk
  never had a backup. QEMU's column is QEMU's own ratio, not snapfs': a qcow2
  copy of the image exported writable over FUSE, with a persistent dirty
  bitmap added in one transaction with a FULL `blockdev-backup` (tracked) or
  neither (untracked). QEMU keeps dirty bitmaps in memory and writes them
  into the qcow2 file when it closes it: a write costs it a bit set in memory,
  so its ratio shows mostly the noise of the measure, and a crash loses its
  bitmap (the next backup must be full) where snapfs' change map survives.

Why the figures are what they are, where the time goes and what was tried:
[performance.md](performance.md).

## How to run it

As root, on the machine to describe: `scripts/bench` (it installs QEMU, fio and
the venv through `scripts/setup`; then about 13 minutes for the default 1 GiB
image and 3 repetitions on 2 cores). Options: `--size 1G`,
`--repeat 3`, `--workdir /var/tmp/snapfs-bench` (must not be tmpfs; keep it on
the disk you care about), `--output docs/benchmarks.md`, `--quick` (64 MiB, one
repetition: a smoke test, its figures mean nothing), `--groups
write,multi,copy,top,reflink,memory,take,tracking,depth` to run part of it
(`multi`: the rows with several snapshots; `reflink`: the FULL copy on a
loop-mounted XFS with reflink=1; `take`: the snapshot of a mounted live disk;
`tracking`: the change tracking rows; `depth`: the queue depth 1 and 16
rows), `--note TEXT` to add a remark to the notes (what
else ran on the machine, say).

## How to read it

- Every figure is the **median** of the repetitions; the systems take turns
  (the order flips with every repetition) on fresh copies of the same images.
  All samples are listed below: QEMU's figures in particular swing between
  runs.
- The page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before
  every cold read and before every background copy. Writes use `dd bs=1M
  conv=notrunc,fdatasync` (input already cached) and `fio --ioengine=psync`
  with `--end_fsync=1`: the figures include getting the data to disk.
- "snapfs vs QEMU" says how much better or worse snapfs does: for throughput
  and IOPS snapfs ÷ QEMU, for times and memory QEMU ÷ snapfs, worded as
  *faster*/*slower* or *less*/*more*. Rows marked "÷" are ratios to a
  reference (a plain `dd` or `cp` of the file, or the FULL copy) and are given
  for both systems.
- "First-write" means every write lands on clusters not yet copied, so each
  one first copies the old 64 KiB cluster to the target; "overwrite" means the
  clusters were copied already. The first-write random test writes one 4 KiB
  block in each of half of the clusters of the half of the image that the
  sequential test did not touch (an fio replay log, so no cluster is hit
  twice); the snapshot is then read with about 3/4 of its clusters copied.
- The "N snapshots at once" rows run the first-write sequential `dd` on a
  fresh copy of the image with N snapshots active (sync none: no background
  copy competes); then every snapshot is compared with the image as it was
  before the writes. Their 1-snapshot row differs from the plain first-write
  row only in how the snapshot was taken (`snapfs snapshot` on a mounted live
  disk instead of `snapfs mount` with a snapshot). The "÷" row is the share of
  the 1-snapshot throughput kept with the most snapshots.
- snapfs' background copy times include its start-up (`snapfs mount` until
  `snapfs wait` returns); QEMU's start at `blockdev-backup`, with the daemon
  already running. The TOP ÷ FULL row leaves snapfs' start-up out, so that it
  compares the copies alone. `snapfs wait` (and `snapfs snapshot --wait`) looks
  at the status after 5 ms, then at pauses doubling up to 0.05 s: snapfs' copy
  times may run up to 0.05 s late.
- Start-up rows: `snapfs mount SOURCE LIVE SNAPSHOT --target TARGET` until
  it returns (both mounts serve), on a sparse image; `snapfs snapshot` until it
  returns. Each snapfs snapshot is served by a process of its own (forked by
  a spawner that the live process starts with it), whose start is part of
  both. snapfs' peak memory is the sum of the VmHWM of the live process, the
  spawner, the snapshot process and its servers: forked processes share
  pages, so the sum is an upper bound. The PSS row sums the same processes'
  proportional set sizes once the writes are done (each shared page counted
  once in all; for QEMU, one process, about its resident size).
- The machine may be shared: the load average before and after the run is
  under "Machine"; treat differences within the spread of the samples as
  noise.
- The "Change tracking on" rows divide the figure of a tracked live disk by
  that of an untracked one, the same writes on the same image (1 = tracking
  costs nothing). "First write since the backup": the first `dd` over the
  first half and the fio replay that writes one 4 KiB block into each of half
  of the clusters of the other half: clusters not written since the backup,
  each first write to one syncs its bit (a sequential writer's bits 4 MiB
  ahead at a time). "Overwrite": the second `dd` over the same half, then fio
  random 4 KiB writes over it: clusters marked already. The page cache is
  dropped after the backup, before the writes, in both sessions. Sessions
  come in pairs, untracked then tracked, then tracked then untracked (two
  pairs per repetition, one with `--quick`); the table divides the medians,
  and the ratio of each pair is listed under "All samples". snapfs' check
  compares the bytes `snapfs status` reports changed with the clusters
  written.
- The "Queue depth" rows use `fio --ioengine=libaio --direct=1 --iodepth=1|16`
  (4 KiB), on a live disk and its snapshot (sync none) of a fresh copy of the
  image: cold random reads of the snapshot before any write (so every read
  goes to the source), random overwrites of the first half (copied first by
  an untimed `dd`), then first writes: one 4 KiB block in every cluster of the
  third quarter (depth 1) or the fourth (depth 16), in random order (an fio
  replay log). The plain file's figure (the same reads of the source image,
  the same overwrites of a plain copy) is in the label.
- The "Target" column holds the goals set for snapfs; "Met" says whether the
  median reaches them.
"""


def write_report(config: BenchConfig, results: Results, rows: list[dict], path: str,
                 elapsed: float, description: list[tuple[str, str]]) -> None:
    """The whole report, written to `path` atomically (a temporary file renamed)."""
    parts = [PREFACE, "\n## Results\n\n"]
    parts.append(f"{size_text(config.size)} random image, {config.repeat} repetition(s)"
                 + (" (**--quick: smoke test, not a measurement**)" if config.quick else "")
                 + f", run took {elapsed / 60:.0f} min.\n\n")
    parts.append(markdown_table(rows))
    if results.failures:
        parts.append("\n**Failed measures:**\n\n" + "".join(f"- {f}\n" for f in results.failures))
    parts.append("\n## Correctness checks\n\n")
    if results.checks:
        parts.append("| Check | System | Result |\n|---|---|---|\n" + "".join(
            f"| {w} | {s} | {r} |\n" for w, s, r in results.checks))
    else:
        parts.append("(none ran)\n")
    parts.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in results.notes))
    if not PageCache.dropped_ok:
        parts.append("- The page cache could not be dropped: \"cold\" figures are warm.\n")
    parts.append("\n## All samples\n\n" + samples_table(results))
    parts.append("\n## Machine\n\n| | |\n|---|---|\n" + "".join(
        f"| {k} | {v} |\n" for k, v in description))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(parts))
    os.replace(tmp, path)
