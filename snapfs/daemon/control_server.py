"""The live process's end of the control socket (see snapfs.protocol): one
request per connection, answered by the LiveDaemon. A request that takes a
while (a snapshot, a release) does not hold up the others, nor the FUSE
requests of the mounts."""

from __future__ import annotations

import logging
import os
import socket

import trio

from snapfs import protocol
from snapfs.errors import UserError

log = logging.getLogger("snapfs")


async def serve_control(instance: str, daemon, handlers: trio.Nursery, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept commands until cancelled; each is answered in a task of
    `handlers`, which may outlive this one: a command that stops the daemon
    (umount) still gets its answer."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await listener.bind(protocol.address(instance))
    except OSError as e:
        raise UserError(f"cannot listen for commands: {e.strerror}") from None
    listener.listen(16)
    task_status.started()
    with listener:
        while True:
            connection, _ = await listener.accept()
            handlers.start_soon(_answer, connection, daemon)


async def _answer(connection, daemon) -> None:
    """Answer one request; nothing that goes wrong here may stop the daemon."""
    stream = trio.SocketStream(connection)
    async with stream:
        try:
            request = protocol.decode(await _read_line(stream))
            uid = protocol.peer_uid(connection)
            if not protocol.trusted(uid):
                raise UserError(f"permission denied: only root and user {os.geteuid()} may "
                                "control this live disk")
            reply = await _dispatch(daemon, request)
        except UserError as e:
            reply = protocol.error(str(e))
        except (ValueError, KeyError, TypeError) as e:
            reply = protocol.error(f"bad request: {e!r}")
        except Exception as e:  # noqa: BLE001 - a bug: log it, answer, go on
            log.exception("control request failed")
            reply = protocol.error(f"internal error: {e!r}")
        try:
            await stream.send_all(protocol.encode(reply))
        except (trio.BrokenResourceError, OSError) as e:
            log.info("a command went away before its answer: %s", e)


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > protocol.MAX_MESSAGE:
            raise ValueError("request too long")
    return data


async def _dispatch(daemon, request: dict) -> dict:
    command = request["command"]
    if command == "status":
        return protocol.ok(daemon.status())
    if command == "snapshot":
        snapshot = await daemon.take(protocol.SnapshotRequest.from_dict(request["request"]))
        return protocol.ok(snapshot.status())
    if command == "release":
        await daemon.release(request["snapshot"], bool(request.get("lazy")))
        return protocol.ok()
    if command == "cancel":
        snapshot = daemon.find(request["snapshot"])
        if snapshot.request.sync == "none":
            raise UserError("nothing to cancel: sync mode none has no background copy")
        if snapshot.job is None or snapshot.job.state != "running":
            state = snapshot.status()["state"]
            raise UserError(f"nothing to cancel: the background copy has {state}")
        snapshot.job.cancel()
        await snapshot.job.finished.wait()
        return protocol.ok(snapshot.status())
    if command == "export":
        where = ({"socket": request["socket"]} if request.get("socket") is not None
                 else {"port": int(request["port"]), "bind": request["bind"]})
        return protocol.ok(await daemon.export(request["snapshot"], where))
    if command == "changes":
        return protocol.ok(daemon.changes(request["snapshot"]))
    if command == "umount":
        await daemon.umount(bool(request.get("lazy")))
        return protocol.ok({"pid": daemon.status()["pid"]})
    raise UserError(f"unknown command {command!r}")
