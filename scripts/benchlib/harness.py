"""The run loop and its guarantees.

Every measure group runs for both systems in every repetition, the order of
the systems flipping with each repetition (QEMU's figures swing between runs:
the report compares medians of alternating runs). A measure that fails is
recorded and the run goes on. After every group anything still mounted under
the work directory is unmounted; at the end (also on SIGTERM, SIGHUP or ^C)
the work directory's images and mount points are removed, unless something is
still mounted there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

from snapfs.mounts import lazy_unmount

from benchlib.config import ROOT, BenchConfig
from benchlib.host import MeasureError, PageCache, log, mounts_under, remove
from benchlib.measures import GROUPS, Measures
from benchlib.results import SYSTEMS, Results

#: the tools the measures run
TOOLS = ("snapfs", "qemu-storage-daemon", "qemu-img", "fio", "fusermount3", "dd", "cmp", "cp",
         "mkfs.xfs")
#: what the run leaves in the work directory, to remove at the end
SCRATCH = ("img", "snapfs", "qemu", "xfs", "first-write.iolog")


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind through every `finally` and clean up."""


def catch_termination() -> None:
    """Turn SIGTERM and SIGHUP into Interrupted, as SIGINT is KeyboardInterrupt."""
    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)


def check_environment(workdir: str) -> None:
    """Exit with a message unless the tools are there, we are root and the work
    directory is on a disk with nothing mounted under it. Creates it."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)} (run it through scripts/bench)")
    if os.geteuid() != 0:
        sys.exit("bench: run it as root (FUSE mounts, dropping the page cache)")
    os.makedirs(workdir, exist_ok=True)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", workdir], capture_output=True,
                            text=True).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        sys.exit(f"bench: {workdir} is on {fstype}; use a directory on a disk (--workdir)")
    if mounts_under(workdir):
        sys.exit(f"bench: something is mounted under {workdir} already")
    if os.stat(workdir).st_dev != os.stat(ROOT).st_dev:
        log(f"WARNING: {workdir} is not on the project's file system")


def run(config: BenchConfig, results: Results) -> None:
    """Make the images, run every group for both systems `config.repeat` times,
    then clean the work directory, whatever happened."""
    measures = Measures(config, results)
    PageCache.filesystem = config.workdir
    try:
        measures.prepare()
        groups = [g for g in GROUPS if g in config.groups]
        for rep in range(config.repeat):
            order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]
            for group in groups:
                for system in order:
                    log(f"rep {rep + 1}/{config.repeat}: {group} — {system}")
                    try:
                        measures.run_group(group, system, rep)
                    except MeasureError as e:
                        results.failures.append(f"rep {rep + 1}, {group}, {system}: {e}")
                        log(f"FAILED: {e}")
                    finally:
                        sweep(config.workdir, results)
    finally:
        sweep(config.workdir, results)
        clean_workdir(config.workdir)


def sweep(workdir: str, results: Results) -> None:
    """Anything still mounted under the work directory: unmount it."""
    for mp in mounts_under(workdir):
        results.note(f"{mp} was still mounted after a measure; unmounted (fusermount3 -u -z)")
        lazy_unmount(mp)


def clean_workdir(workdir: str) -> None:
    """Remove what the run made in the work directory, and the directory if it
    is then empty; nothing if something is still mounted there."""
    if mounts_under(workdir):
        log(f"WARNING: still mounted under {workdir}; leaving its files alone")
        return
    log(f"removing the images and mount points in {workdir}")
    for name in SCRATCH:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            remove(path)
    with contextlib.suppress(OSError):
        os.rmdir(workdir)
