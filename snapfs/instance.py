"""What describes one snapfs instance, shared by the command line and the
daemon: its configuration, the files it keeps beside the target, and the
one-line readiness message its processes send when their mount is up.

Kept free of trio and pyfuse3, so that the commands start quickly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger("snapfs")

SYNC_MODES = ("full", "top", "none")


@dataclass
class MountConfig:
    """What `snapfs mount` was asked for, already checked (paths are absolute)."""

    source: str
    live: str
    snapshot: str
    target: str
    sync: str = "full"
    cluster_size: int = 64 * 1024
    speed: int | None = None
    force: bool = False
    format: str = "raw"
    target_format: str = "raw"

    @property
    def name(self) -> str:
        return os.path.basename(self.source)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "MountConfig":
        return cls(**json.loads(text))


def state_path(target: str) -> str:
    """Where the copy map of `target` lives."""
    return target + ".snapfs"


def log_path(target: str) -> str:
    """Where a background instance logs."""
    return target + ".snapfs.log"


class Readiness:
    """The pipe on which a process tells its starter that its mount is up."""

    def __init__(self, fd: int | None):
        self._fd = fd

    def _say(self, line: str) -> None:
        if self._fd is not None:
            os.write(self._fd, line.encode() + b"\n")
            os.close(self._fd)
            self._fd = None

    def ready(self) -> None:
        self._say("ready")

    def failed(self, message: str) -> None:
        if self._fd is None:
            log.error("%s", message)
        self._say("error: " + " ".join(message.split()))

    @property
    def pending(self) -> bool:
        return self._fd is not None

    def fds(self) -> list[int]:
        """The descriptor still open (for a forked child to close)."""
        return [] if self._fd is None else [self._fd]


def parse_readiness(line: str) -> str | None:
    """None if `line` says ready, else the reason the start failed."""
    line = line.strip()
    if line == "ready":
        return None
    return line.removeprefix("error: ") or "exited before its mount was up"
