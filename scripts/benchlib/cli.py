"""The command line of scripts/bench: the options, and one run from the
environment check to the written report."""

from __future__ import annotations

import argparse
import os
import time

from snapfs.units import parse_size

from benchlib import harness, report
from benchlib.config import GiB, MiB, ROOT, TiB, BenchConfig
from benchlib.host import log
from benchlib.measures import GROUPS
from benchlib.results import Results

DESCRIPTION = "Side-by-side benchmark: snapfs against qemu-storage-daemon (the QEMU anchor)."


def _size(text: str) -> int:
    """snapfs.units.parse_size for argparse: a bad size is a usage error
    ("argument --size: not a size: '3X'"), not "invalid value"."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=DESCRIPTION)
    parser.add_argument("--size", type=_size, default=None,
                        help="size of the random test image (default 1G; 64M with --quick)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions of every measure (default 3; 1 with --quick)")
    parser.add_argument("--workdir", default="/var/tmp/snapfs-bench",
                        help="scratch directory on a real disk (default /var/tmp/snapfs-bench)")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks.md"),
                        help="the report to write (default docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true",
                        help="small and once: a smoke test of the harness")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"measure groups to run (default {','.join(GROUPS)})")
    parser.add_argument("--memory-disk", type=_size, default=TiB,
                        help="virtual size of the sparse disk for memory and start-up (1T)")
    parser.add_argument("--note", action="append", default=[],
                        help="a remark for the report's notes, e.g. what else ran on the "
                             "machine (may be given more than once)")
    args = parser.parse_args(argv)
    args.size = args.size or (64 * MiB if args.quick else GiB)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if unknown := set(args.groups) - set(GROUPS):
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    if args.size % (2 * MiB) or args.size < 4 * MiB:
        parser.error("--size must be a multiple of 2 MiB, at least 4 MiB")
    args.workdir = os.path.abspath(args.workdir)
    return args


def main(argv: list[str] | None = None) -> int:
    """One run; 1 if a measure failed. SIGTERM and SIGHUP raise
    harness.Interrupted (SIGINT KeyboardInterrupt) once everything is cleaned up."""
    args = parse_args(argv)
    harness.check_environment(args.workdir)
    harness.catch_termination()
    config = BenchConfig(size=args.size, repeat=args.repeat,
                         workdir=os.path.realpath(args.workdir), output=args.output,
                         quick=args.quick, groups=tuple(args.groups),
                         memory_disk=args.memory_disk)
    results = Results()
    for text in args.note:
        results.note(text)
    description = report.describe(config.workdir)
    load_before = os.getloadavg()
    started = time.monotonic()
    harness.run(config, results)
    rows = report.build_rows(config, results)
    print(report.markdown_table(rows))
    for f in results.failures:
        print(f"FAILED: {f}")
    load = ", ".join(f"{x:.2f}" for x in load_before) + " before; " + ", ".join(
        f"{x:.2f}" for x in os.getloadavg()) + " after (1, 5, 15 min)"
    report.write_report(config, results, rows, config.output, time.monotonic() - started,
                        description + [("load average", load)])
    log(f"report written to {config.output}")
    return 1 if results.failures else 0
