"""What the commands and the daemon say to each other.

Finding a daemon: every mount of an instance (its live disk and each
snapshot) carries `fsname=snapfs:<instance id>`, which the mount table shows
as the mount's source; the live process listens on the abstract Unix socket
`@snapfs/<instance id>`. So a command finds the daemon from any path of its
mounts, and no socket file or pid file is left behind when a daemon dies.

Talking: one request per connection, one JSON object per line each way: the
request `{"command": ..., ...}`, then the reply, `{"ok": <result>}` or
`{"error": "<one line for the user>"}`. JSON is written as ASCII, so any path
(non-UTF-8 bytes included, as surrogates) survives.

Who may talk: the daemon answers only root and the user it runs as; a
command talks only to a daemon run by root or by its own user (SO_PEERCRED,
both ways), so nobody can pose as either side.

Starting: a process tells whoever started it that its mount is up by writing
one line to a pipe: `ready`, optionally followed by a JSON object, or
`error: <why>`.

Kept free of trio and pyfuse3, so that the commands start quickly.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import asdict, dataclass, fields

SYNC_MODES = ("full", "top", "none", "incremental")
#: what happens when old data cannot be saved (as QEMU's on-cbw-error)
CBW_ERROR_POLICIES = ("break-guest-write", "break-snapshot")
FSNAME_PREFIX = "snapfs:"
#: the largest message either side accepts
MAX_MESSAGE = 16 << 20


# --- what is asked for ----------------------------------------------------

class _Record:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SnapshotRequest(_Record):
    """A snapshot to take, already checked (paths absolute)."""

    snapshot: str  # the mount point
    target: str
    sync: str = "full"
    target_format: str | None = None  # None: the source's format
    cluster_size: int = 64 * 1024
    speed: int | None = None
    force: bool = False
    #: for incremental: the backup (its target) to build on; None: the last one
    base: str | None = None
    #: SNAPSHOT is a regular file: the image appears there itself
    on_file: bool = False
    #: when old data cannot be saved: fail the guest's write, or break the snapshot
    on_cbw_error: str = "break-guest-write"
    #: seconds a write may wait for its copy-before-write before that counts as failed
    cbw_timeout: float | None = None

    def file(self, name: str) -> str:
        """Where the point-in-time image appears."""
        return self.snapshot if self.on_file else os.path.join(self.snapshot, name)


@dataclass
class LiveConfig(_Record):
    """What `snapfs mount` starts the live process with (paths absolute)."""

    source: str  # the image file itself, symbolic links resolved
    live: str
    name: str  # the file's name in LIVE (and SNAPSHOT): SOURCE's name as given
    format: str = "raw"
    #: a snapshot to take before the live disk accepts its first write
    snapshot: SnapshotRequest | None = None
    #: LIVE is a regular file (SOURCE itself, maybe): the disk appears there itself
    on_file: bool = False

    @property
    def file(self) -> str:
        """Where the live disk appears."""
        return self.live if self.on_file else os.path.join(self.live, self.name)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LiveConfig":
        data = json.loads(text)
        snapshot = data.pop("snapshot", None)
        return cls(**data, snapshot=SnapshotRequest.from_dict(snapshot) if snapshot else None)


# --- files kept beside the images -----------------------------------------

def copymap_path(target: str) -> str:
    """Where the copy map of `target` lives."""
    return target + ".snapfs"


def state_dir(source: str) -> str:
    """The live disk's own directory: its state (the snapshots to bring back
    after a crash) and its log. Removed after a clean unmount."""
    return source + ".snapfs-live"


# --- addresses ------------------------------------------------------------

def fsname(instance: str) -> str:
    return FSNAME_PREFIX + instance


def instance_of(mount_source: str) -> str | None:
    """The instance id in a mount's source field, if it is a snapfs mount's."""
    if mount_source.startswith(FSNAME_PREFIX):
        return mount_source[len(FSNAME_PREFIX):] or None
    return None


def address(instance: str) -> str:
    """The abstract socket the live process of `instance` listens on."""
    return "\0snapfs/" + instance


def listening(instance: str) -> bool:
    """Whether something listens on the address of `instance`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address(instance))
        except OSError:
            return False
    return True


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def trusted(uid: int) -> bool:
    """Whether a peer running as `uid` may talk to us."""
    return uid in (0, os.geteuid())


# --- messages -------------------------------------------------------------

def encode(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> dict:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


class Refused(Exception):
    """The daemon refused a request; the message is for the user."""


def ok(result=None) -> dict:
    return {"ok": result}


def error(message: str) -> dict:
    return {"error": " ".join(message.split())}


def result_of(reply: dict):
    """The result in a reply, or Refused with the daemon's line."""
    if "ok" in reply:
        return reply["ok"]
    raise Refused(str(reply.get("error") or "the daemon gave no answer"))


# --- readiness ------------------------------------------------------------

class Readiness:
    """The pipe on which a process tells its starter that its mount is up."""

    def __init__(self, fd: int | None):
        self._fd = fd

    def _say(self, line: str) -> None:
        if self._fd is not None:
            os.write(self._fd, line.encode() + b"\n")
            os.close(self._fd)
            self._fd = None

    def ready(self, **info) -> None:
        self._say("ready " + json.dumps(info) if info else "ready")

    def failed(self, message: str) -> None:
        self._say("error: " + " ".join(message.split()))

    @property
    def pending(self) -> bool:
        return self._fd is not None

    def fds(self) -> list[int]:
        """The descriptor still open (for a child to close)."""
        return [] if self._fd is None else [self._fd]


def parse_readiness(line: str) -> tuple[str | None, dict]:
    """(None, info) if `line` says ready, else (the reason the start failed, {})."""
    line = line.strip()
    if line == "ready" or line.startswith("ready "):
        rest = line[len("ready"):].strip()
        return None, json.loads(rest) if rest else {}
    return line.removeprefix("error: ") or "exited before its mount was up", {}
