"""Starting snapshot processes quickly.

A snapshot process needs pyfuse3 and trio; a new interpreter that imports
them takes about 0.2 s. So the live process, before trio starts (while it is
still one thread, where fork is safe), forks a *spawner*: a small process
that has everything imported already and waits on a socket pair. For each
snapshot the live process sends it the snapshot's configuration and its open
descriptors (SCM_RIGHTS); the spawner forks a child that serves the snapshot
(`snapshot_server.run`) and sends back a pidfd of the child, by which the live
process waits for its end and signals it. The spawner ends when the live
process does (its end of the socket pair closes). Its children are reaped by
the kernel (SIGCHLD ignored), so they never linger as zombies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time

import trio

log = logging.getLogger("snapfs")

_MAX_MESSAGE = 1 << 20
_MAX_FDS = 16


class SnapshotProcess:
    """A snapshot process, seen from the live process, through its pidfd.
    Any number of tasks may wait for its end."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self._pidfd = pidfd
        self.done = pidfd < 0  # it ended before we got hold of it
        self._watched = False  # a task waits on the pidfd
        self._changed = trio.Event()

    async def wait(self) -> None:
        while not self.done:
            if self._watched:  # one task watches; the others wait for its news
                await self._changed.wait()
                continue
            self._watched = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
                self.done = True
                os.close(self._pidfd)
                self._pidfd = -1
            finally:
                self._watched = False
                self._changed.set()
                self._changed = trio.Event()

    async def wait_group(self) -> None:
        """After it ended: make sure no process of its group (its servers) is
        left, killing any; they must all be gone before its snapshot leaves
        copy-before-write."""
        await trio.to_thread.run_sync(_end_group, self.pid)

    def send_signal(self, signum: int) -> None:
        if not self.done:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass


class Spawner:
    def __init__(self, close_in_child: list[int]):
        """Fork the spawner now (call before trio starts); `close_in_child`:
        descriptors it must not keep (e.g. the starter's readiness pipe)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the spawner: never returns
            code = 0
            try:
                ours.close()
                for fd in close_in_child:
                    os.close(fd)
                _serve(theirs)
            except BaseException:  # noqa: BLE001 - nothing to report to
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._socket = ours
        self._lock = threading.Lock()

    async def spawn(self, config: dict, fds: list[int]) -> SnapshotProcess:
        """Start a snapshot process with `config`; in it, `config["fds"][i]`
        is the descriptor that `fds[i]` is here."""
        return await trio.to_thread.run_sync(self._spawn, config, fds)

    def _spawn(self, config: dict, fds: list[int]) -> SnapshotProcess:
        with self._lock:
            socket.send_fds(self._socket, [json.dumps(config).encode()], fds)
            message, pidfds, _, _ = socket.recv_fds(self._socket, 64, 1)
        if not message:
            raise OSError("the snapshot spawner is gone")
        return SnapshotProcess(int(message), pidfds[0] if pidfds else -1)

    def close(self) -> None:
        """The spawner ends once it sees the socket close."""
        self._socket.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(sock: socket.socket) -> None:
    from snapfs.daemon import snapshot_server

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, _MAX_FDS)
        if not message:
            return  # the live process is gone
        config = json.loads(message)
        config["fds"] = fds
        pid = os.fork()
        if pid == 0:  # the snapshot process
            code = 1
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = snapshot_server.run(config)
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        try:
            pidfds = [os.pidfd_open(pid)]
        except ProcessLookupError:  # ended already (and reaped)
            pidfds = []
        socket.send_fds(sock, [str(pid).encode()], pidfds)
        for fd in pidfds:
            os.close(fd)


def _end_group(pgid: int, timeout: float = 30.0) -> None:
    """Kill every live process of group `pgid` and wait until none is left
    (zombies do not count: they serve nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        members = _group_members(pgid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.error("processes %s of snapshot process group %d do not die", members, pgid)
            return
        time.sleep(0.01)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command: state, ppid, pgrp
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members
