"""Telling systemd how the daemon is doing (sd_notify's protocol): one
datagram to the socket named in $NOTIFY_SOCKET, if any (a name starting with
'@' is in the abstract namespace). Used with `--foreground` in a unit of
Type=notify: READY=1 once the mounts serve, STOPPING=1 when it stops."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("snapfs")


def notify(*assignments: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", address, e)
