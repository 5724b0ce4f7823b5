#!/usr/bin/env python3
"""Side-by-side benchmark: snapfs against qemu-storage-daemon (the QEMU anchor).

One run measures both systems on the same freshly generated images, taking
turns (the order flips with every repetition), repeats every measure
(--repeat, default 3) and reports medians. The page cache is dropped before
every cold measure. The result table, with ratios snapfs vs QEMU and the
targets, goes to stdout and, with a description of the machine, to
docs/benchmarks.md (--output).

The QEMU anchor:
- mounts: a copy-before-write filter over the raw source with a qcow2 target
  (backing: the source), exported writable over FUSE as the live disk, and a
  snapshot-access node over it exported read-only as the snapshot;
- background copy: blockdev-backup (sync full / top) from a raw source node to
  a raw target node, timed until BLOCK_JOB_COMPLETED;
- change tracking: a qcow2 copy of the image exported over FUSE, with or
  without a persistent dirty bitmap (added with a FULL blockdev-backup); the
  rows compare each system with itself, tracked against untracked.

Run it through scripts/bench (as root), which installs what it needs. Every
mount is unmounted and every daemon stopped, even when a measure fails. The
code is in scripts/benchlib/ (its __init__ lists the modules); it uses the
snapfs package for sizes and the mount table, and drives snapfs itself only
through its command line.
"""

import sys

from benchlib.cli import main
from benchlib.harness import Interrupted

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"bench: interrupted ({e or 'SIGINT'}); everything was unmounted and stopped",
              file=sys.stderr)
        sys.exit(130)
