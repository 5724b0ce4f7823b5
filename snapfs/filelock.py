"""The locks by which a running instance holds its files.

The live process holds an exclusive `flock` on SOURCE, on every TARGET and on
every copy map as long as it uses them, and a shared one on each backing file
of SOURCE (several overlays may share a base image). A second instance, or a
`--force` that would replace one of them, is refused while they are held.
(QEMU's byte-range locks are separate: QEMU does not see these.)
"""

from __future__ import annotations

import fcntl
import os

from snapfs.errors import UserError


class InUse(UserError):
    """A running snapfs instance holds the file."""


def lock(path: str, what: str) -> int:
    """Open `path` and lock it; the descriptor holds the lock until closed.
    `what` names the file in the refusal."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InUse(f"{what} {path}: in use by another snapfs instance") from None
    return fd


def check_free(path: str, what: str) -> None:
    """Refuse if a running instance holds `path` (if it exists)."""
    try:
        fd = lock(path, what)
    except FileNotFoundError:
        return
    os.close(fd)


def share_chain(image) -> None:
    """Take a shared lock on each backing file under `image` (through the
    descriptors the image holds: they last as long as it is open)."""
    layer = getattr(image, "backing", None)
    while layer is not None:
        try:
            fcntl.flock(layer.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUse(f"backing file {layer.path}: in use by another snapfs instance, "
                        "which writes it") from None
        layer = getattr(layer, "backing", None)
