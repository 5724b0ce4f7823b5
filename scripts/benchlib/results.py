"""What a run found: the samples of every measure for every system, the
correctness checks, notes, failed measures; and their medians.

The measures (benchlib.measures) fill it in, the run loop (benchlib.harness)
adds the failures, the report (benchlib.report) reads it.
"""

from __future__ import annotations

import statistics

from benchlib.host import log

#: the systems compared, in the order of the first repetition (it flips with every one)
SYSTEMS = ("snapfs", "qemu")
#: what reference samples (a plain dd or cp of the file) are filed under
REFERENCE = "source"


class Results:
    def __init__(self) -> None:
        #: measure key -> system -> samples, in the order taken
        self.samples: dict[str, dict[str, list[float]]] = {}
        #: figures that are not measures (copied clusters, allocated bytes): key -> system -> values
        self.extra: dict[str, dict[str, list[float]]] = {}
        self.checks: list[tuple[str, str, str]] = []  # (what, system, result)
        self.notes: list[str] = []
        self.failures: list[str] = []
        #: bytes allocated in the sparse image, once it is made
        self.sparse_allocated: int | None = None

    def add(self, key: str, system: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(system, []).append(value)
        log(f"  {key:12} {system:7} {value:,.3f}")

    def add_extra(self, key: str, system: str, value: float) -> None:
        self.extra.setdefault(key, {}).setdefault(system, []).append(value)

    def note(self, text: str) -> None:
        """A remark for the report's notes (each said once)."""
        if text not in self.notes:
            self.notes.append(text)
            log(f"NOTE: {text}")

    def check(self, what: str, system: str, result: str) -> None:
        self.checks.append((what, system, result))
        log(f"  check {what} ({system}): {result}")

    def checked(self, what: str, system: str) -> bool:
        """Whether `what` was checked already for `system`."""
        return any(c[0] == what and c[1] == system for c in self.checks)

    def median(self, key: str, system: str) -> float | None:
        values = self.samples.get(key, {}).get(system)
        return statistics.median(values) if values else None
