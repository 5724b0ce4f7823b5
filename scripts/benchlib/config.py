"""What one run is asked to do: image size, repetitions, measure groups, the
work directory and the report's path, and the sizes derived from them.

Built once from the command line (benchlib.cli) and read by every other
module; nothing here touches the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: the project's root: scripts/benchlib/config.py -> ../../
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass(frozen=True)
class BenchConfig:
    size: int  # the random test image
    repeat: int
    workdir: str  # real path: mount points are compared with the mount table's
    output: str
    quick: bool
    groups: tuple[str, ...]
    memory_disk: int  # virtual size of the sparse disk for memory and start-up

    @property
    def half(self) -> int:
        """What the sequential writes write: the first half of the image."""
        return self.size // 2

    @property
    def rand_read_ios(self) -> int:
        return 1024 if self.quick else 16384

    @property
    def rand_over_ios(self) -> int:
        return 1024 if self.quick else 16384

    @property
    def memory_writes(self) -> int:
        """Bytes of random 64 KiB writes before the peak memory is read."""
        return 64 * MiB if self.quick else GiB

    @property
    def tracking_pairs(self) -> int:
        """Pairs of sessions (untracked, tracked) per repetition in the
        "tracking" group."""
        return 1 if self.quick else 2

    #: how many snapshots are active at once in the first-write rows of the
    #: "multi" group
    snapshot_counts = (1, 2, 4, 8)

    #: share of the sparse image (TOP copy) that holds data
    sparse_share = 0.10

    def img(self, name: str) -> str:
        """The path of an image (or other scratch file) of the run."""
        return os.path.join(self.workdir, "img", name)
