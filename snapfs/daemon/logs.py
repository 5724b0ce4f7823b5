"""How the daemon's processes log and report how they ended."""

from __future__ import annotations

import faulthandler
import logging
import sys

import trio

from snapfs.errors import UserError, innermost
from snapfs.protocol import Readiness

log = logging.getLogger("snapfs")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr (the log file, for a background daemon)."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s snapfs[%(process)d] %(levelname)s: %(message)s")
    faulthandler.enable(file=sys.stderr)  # a hang or crash dumps every thread's stack


def run_logged(main, readiness: Readiness, role: str) -> int:
    """Run `main` under trio; returns the exit code: 0 after a clean stop.
    A failure before the process reported ready goes to its starter as one
    line; any other is logged."""
    try:
        trio.run(main)
    except BaseException as e:  # noqa: BLE001 - report anything, then fail
        user_error = innermost(e, UserError)
        if user_error is not None:
            message = str(user_error)
        else:
            log.exception("%s process failed", role)
            message = f"internal error: {e!r}"
        if readiness.pending:
            readiness.failed(message)
        else:
            log.error("%s", message)
        return 1
    return 0
