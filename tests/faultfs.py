#!/usr/bin/env python3
"""faultfs: a pass-through FUSE file system that fails or delays operations
on command, standing in for a disk that goes bad (this kernel has no
device-mapper, so no dm-error/dm-delay/dm-flakey).

    python tests/faultfs.py BACKING_DIR MOUNTPOINT [--control NAME]

serves BACKING_DIR's tree on MOUNTPOINT (allow_other, default_permissions,
type fuse.faultfs), prints `ready` on stdout once it serves, and runs until
unmounted or sent SIGTERM/SIGINT.

Commands come over an abstract Unix socket (no file to clean up, no path
length limit): by default `control_address(MOUNTPOINT)`. Each request is one
JSON object on one line, each reply one JSON line: `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. A command is applied in the FUSE loop's own
thread before its reply is sent, so it is in force for every request the
kernel hands over after the client has read the reply.

    {"cmd": "fail",  "op": OP, "errno": 5, [filters]}   fail matching calls
    {"cmd": "delay", "op": OP, "seconds": S, [filters]} delay them (S null: until clear)
    {"cmd": "clear"}                                    drop every rule; delayed calls go on now
    {"cmd": "stats"}                                    calls/failed/delayed per op, and the rules
    {"cmd": "ping"}

OP is an operation name (see OPS), a list of them, or "*". Filters:
`name` (a glob on the file's name, or on its path relative to the root if it
holds a "/"; ops with no file, statfs, never match a name), `after` (let the
next N matching calls through first), `count` (act on at most that many
calls, then stop), `offset` (read and write only: match calls whose byte
range reaches offset or beyond, i.e. off + size > offset). A matching call is
counted by every rule it matches; it is delayed by every delay rule that
fires, then failed by the first fail rule that fires (before anything is done
on the backing file: a failed write writes nothing).

A delay is an await in the request's own task; pyfuse3 serves requests in
concurrent tasks, so a delayed (or hung) request does not hold up others
(the kernel may, though: e.g. it serializes writes and fsyncs of one file).

Files are served through the kernel's page cache, without writeback caching
(writes go through to BACKING_DIR at once), so shared mmap works. Adding a
read rule drops the cached pages of the files it matches, so that the next
read reaches faultfs. File handles are the backing file's descriptors.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import sys

import pyfuse3
import trio

from snapfs.fuse.boundary import ErrorBoundary

log = logging.getLogger("faultfs")

#: the operations rules may name
OPS = frozenset({"lookup", "getattr", "setattr", "readlink", "mkdir", "rmdir", "unlink",
                 "symlink", "rename", "create", "open", "read", "write", "flush", "fsync",
                 "release", "opendir", "readdir", "releasedir", "fsyncdir", "statfs"})
OFFSET_OPS = frozenset({"read", "write"})
#: open flags not passed on to the backing file (the kernel did their work)
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_APPEND
TIMEOUT = 0.0  # no attribute or name caching: tests change BACKING_DIR directly too


def control_address(mountpoint) -> str:
    """The abstract socket name faultfs listens on for a mount point."""
    real = os.path.realpath(os.fsencode(mountpoint))
    return "\0faultfs/" + hashlib.sha256(real).hexdigest()[:24]


class Rule:
    def __init__(self, spec: dict):
        self.action = spec["cmd"]
        ops = spec.get("op")
        ops = [ops] if isinstance(ops, str) else list(ops or ())
        if ops == ["*"]:
            ops = sorted(OPS)
        if not ops or not set(ops) <= OPS:
            raise ValueError(f"bad op {spec.get('op')!r}; known: {sorted(OPS)}")
        self.ops = frozenset(ops)
        self.name = spec.get("name")
        self.after = int(spec.get("after") or 0)
        self.count = None if spec.get("count") is None else int(spec["count"])
        self.offset = None if spec.get("offset") is None else int(spec["offset"])
        if self.offset is not None and not self.ops <= OFFSET_OPS:
            raise ValueError("offset applies to read and write only")
        if self.action == "fail":
            self.errno = int(spec.get("errno", errno.EIO))
            if self.errno <= 0:
                raise ValueError("errno must be positive")
        else:
            self.seconds = None if spec.get("seconds") is None else float(spec["seconds"])
        self.hits = 0
        self.cleared = trio.Event()

    def matches(self, op: str, path: bytes | None, off: int | None, size: int | None) -> bool:
        if op not in self.ops or not self.matches_name(path):
            return False
        if self.offset is not None and (off is None or off + (size or 0) <= self.offset):
            return False
        return True

    def matches_name(self, path: bytes | None) -> bool:
        if self.name is not None:
            if path is None:
                return False
            text = os.fsdecode(path)
            subject = text if "/" in self.name else text.rsplit("/", 1)[-1]
            if not fnmatch.fnmatchcase(subject, self.name):
                return False
        return True

    def fires(self) -> bool:
        """Count one matching call; whether the rule acts on it."""
        if self.after > 0:
            self.after -= 1
            return False
        if self.count is not None and self.hits >= self.count:
            return False
        self.hits += 1
        return True

    def describe(self) -> dict:
        out = {"cmd": self.action, "op": sorted(self.ops), "name": self.name,
               "after": self.after, "count": self.count, "offset": self.offset,
               "hits": self.hits}
        if self.action == "fail":
            out["errno"] = self.errno
        else:
            out["seconds"] = self.seconds
        return out


class Handle:
    __slots__ = ("inode", "path")

    def __init__(self, inode: int, path: bytes):
        self.inode, self.path = inode, path


class FaultOperations(ErrorBoundary):
    """Every handler is wrapped in snapfs's own error boundary: only FUSEError
    leaves it (anything else would leave a dead mount)."""

    enable_writeback_cache = False

    def __init__(self, root: str):
        super().__init__()
        self.root = os.path.realpath(os.fsencode(root))
        self.entries: dict[int, tuple[int, bytes]] = {}  # inode -> (parent inode, name)
        self.handles: dict[int, Handle] = {}  # backing fd -> its file
        self.rules: list[Rule] = []
        self.stats = {op: {"calls": 0, "failed": 0, "delayed": 0} for op in OPS}

    # --- faults -----------------------------------------------------------

    async def inject(self, op: str, path: bytes | None, off: int | None = None,
                     size: int | None = None, *more_paths: bytes) -> None:
        stats = self.stats[op]
        stats["calls"] += 1
        delays, failure = [], None
        for rule in list(self.rules):
            if not any(rule.matches(op, p, off, size) for p in (path, *more_paths)):
                continue
            if not rule.fires():
                continue
            if rule.action == "delay":
                delays.append(rule)
            elif failure is None:
                failure = rule
        for rule in delays:
            stats["delayed"] += 1
            with trio.move_on_after(rule.seconds if rule.seconds is not None else float("inf")):
                await rule.cleared.wait()
        if failure is not None:
            stats["failed"] += 1
            raise pyfuse3.FUSEError(failure.errno)

    async def command(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd in ("fail", "delay"):
            rule = Rule(request)
            self.rules.append(rule)
            if "read" in rule.ops:
                await self._drop_cache(rule)
            return {"ok": True}
        if cmd == "clear":
            for rule in self.rules:
                rule.cleared.set()
            self.rules = []
            return {"ok": True}
        if cmd == "stats":
            return {"ok": True, "stats": self.stats, "rules": [r.describe() for r in self.rules]}
        if cmd == "ping":
            return {"ok": True}
        raise ValueError(f"unknown command {cmd!r}")

    async def _drop_cache(self, rule: Rule) -> None:
        """Forget cached pages of the files the rule matches, so that their
        next read reaches us. In a thread: dropping a dirty page of a shared
        mapping makes the kernel send us a write first, which this loop serves."""
        inodes = [i for i in list(self.entries) if rule.matches_name(self._try_path(i))]
        for inode in inodes:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except OSError:
                pass  # the kernel no longer knows it

    # --- inodes and paths -----------------------------------------------

    def _try_path(self, inode: int) -> bytes | None:
        parts = []
        seen = 0
        while inode != pyfuse3.ROOT_INODE:
            entry = self.entries.get(inode)
            if entry is None or seen > 4096:
                return None
            inode, name = entry
            parts.append(name)
            seen += 1
        return b"/".join(reversed(parts))

    def _rel(self, inode: int) -> bytes:
        rel = self._try_path(inode)
        if rel is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return rel

    def _abs(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel) if rel else self.root

    def _child(self, parent: int, name: bytes) -> bytes:
        if b"/" in name or name in (b"", b".", b".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        rel = self._rel(parent)
        return rel + b"/" + name if rel else name

    def _inode_of(self, st: os.stat_result, parent: int | None, name: bytes | None) -> int:
        if os.path.samestat(st, self._root_stat):
            return pyfuse3.ROOT_INODE
        inode = st.st_ino
        if inode == pyfuse3.ROOT_INODE:  # cannot happen on ext4/tmpfs; refuse rather than confuse
            raise pyfuse3.FUSEError(errno.EIO)
        if parent is not None:
            self.entries[inode] = (parent, name)
        return inode

    def _attrs(self, st: os.stat_result, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attrs, field, getattr(st, field))
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = TIMEOUT
        attrs.attr_timeout = TIMEOUT
        return attrs

    def _entry(self, parent: int, name: bytes, rel: bytes) -> pyfuse3.EntryAttributes:
        st = os.lstat(self._abs(rel))
        return self._attrs(st, self._inode_of(st, parent, name))

    def _forget_name(self, parent: int, name: bytes) -> None:
        for inode, entry in list(self.entries.items()):
            if entry == (parent, name):
                del self.entries[inode]

    # --- the handlers ---------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return await self.getattr(parent_inode, ctx)
        if name == b"..":
            entry = self.entries.get(parent_inode)
            return await self.getattr(entry[0] if entry else pyfuse3.ROOT_INODE, ctx)
        rel = self._child(parent_inode, name)
        await self.inject("lookup", rel)
        return self._entry(parent_inode, name, rel)

    async def getattr(self, inode, ctx=None):
        rel = self._try_path(inode) if inode != pyfuse3.ROOT_INODE else b""
        await self.inject("getattr", rel)
        if rel is not None:
            try:
                return self._attrs(os.lstat(self._abs(rel)), inode)
            except FileNotFoundError:
                pass
        for fd, handle in list(self.handles.items()):  # unlinked but open
            if handle.inode == inode:
                return self._attrs(os.fstat(fd), inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        rel = self._rel(inode) if fh is None or fh not in self.handles else self.handles[fh].path
        await self.inject("setattr", rel)
        where = fh if fh is not None and fh in self.handles else self._abs(rel)
        follow = isinstance(where, int) or not stat.S_ISLNK(os.lstat(where).st_mode)
        if fields.update_size:
            os.truncate(where, attr.st_size)
        if fields.update_mode:
            os.chmod(where, stat.S_IMODE(attr.st_mode)) if follow else None
        if fields.update_uid or fields.update_gid:
            os.chown(where, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, follow_symlinks=follow)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(where) if follow else os.lstat(where)
            os.utime(where, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=follow)
        st = os.fstat(where) if isinstance(where, int) else os.lstat(where)
        return self._attrs(st, inode)

    async def readlink(self, inode, ctx):
        rel = self._rel(inode)
        await self.inject("readlink", rel)
        return os.readlink(self._abs(rel))

    async def symlink(self, parent_inode, name, target, ctx):
        rel = self._child(parent_inode, name)
        await self.inject("symlink", rel)
        os.symlink(target, self._abs(rel))
        self._own(self._abs(rel), ctx, follow=False)
        return self._entry(parent_inode, name, rel)

    async def mkdir(self, parent_inode, name, mode, ctx):
        rel = self._child(parent_inode, name)
        await self.inject("mkdir", rel)
        os.mkdir(self._abs(rel), mode & ~ctx.umask)
        self._own(self._abs(rel), ctx)
        return self._entry(parent_inode, name, rel)

    async def rmdir(self, parent_inode, name, ctx):
        rel = self._child(parent_inode, name)
        await self.inject("rmdir", rel)
        os.rmdir(self._abs(rel))
        self._forget_name(parent_inode, name)

    async def unlink(self, parent_inode, name, ctx):
        rel = self._child(parent_inode, name)
        await self.inject("unlink", rel)
        os.unlink(self._abs(rel))
        self._forget_name(parent_inode, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        await self.inject("rename", old, None, None, new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & pyfuse3.RENAME_NOREPLACE and os.path.lexists(self._abs(new)):
            raise pyfuse3.FUSEError(errno.EEXIST)
        st = os.lstat(self._abs(old))
        os.rename(self._abs(old), self._abs(new))
        self._forget_name(parent_inode_new, name_new)
        self._forget_name(parent_inode_old, name_old)
        self._inode_of(st, parent_inode_new, name_new)

    def _own(self, where, ctx, follow=True) -> None:
        if os.geteuid() == 0:
            os.chown(where, ctx.uid, ctx.gid, follow_symlinks=follow)

    async def create(self, parent_inode, name, mode, flags, ctx):
        rel = self._child(parent_inode, name)
        await self.inject("create", rel)
        fd = os.open(self._abs(rel), (flags & ~_STRIP) | os.O_CREAT | os.O_CLOEXEC
                     | (flags & os.O_EXCL), mode & ~ctx.umask)
        try:
            self._own(fd, ctx)
            st = os.fstat(fd)
            inode = self._inode_of(st, parent_inode, name)
        except BaseException:
            os.close(fd)
            raise
        self.handles[fd] = Handle(inode, rel)
        return pyfuse3.FileInfo(fh=fd), self._attrs(st, inode)

    async def open(self, inode, flags, ctx):
        rel = self._rel(inode)
        await self.inject("open", rel)
        fd = os.open(self._abs(rel), (flags & ~_STRIP) | os.O_CLOEXEC)
        self.handles[fd] = Handle(inode, rel)
        return pyfuse3.FileInfo(fh=fd)

    def _handle_path(self, fh: int) -> bytes:
        handle = self.handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return self._try_path(handle.inode) or handle.path

    async def read(self, fh, off, size):
        await self.inject("read", self._handle_path(fh), off, size)
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        await self.inject("write", self._handle_path(fh), off, len(buf))
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        await self.inject("flush", self._handle_path(fh))

    async def fsync(self, fh, datasync):
        await self.inject("fsync", self._handle_path(fh))
        (os.fdatasync if datasync else os.fsync)(fh)

    async def release(self, fh):
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        try:
            await self.inject("release", self._try_path(handle.inode) or handle.path)
        finally:
            os.close(fh)

    async def opendir(self, inode, ctx):
        rel = self._rel(inode) if inode != pyfuse3.ROOT_INODE else b""
        await self.inject("opendir", rel)
        if not stat.S_ISDIR(os.lstat(self._abs(rel)).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        rel = self._rel(fh) if fh != pyfuse3.ROOT_INODE else b""
        await self.inject("readdir", rel)
        names = sorted(os.listdir(self._abs(rel)))
        for index in range(start_id, len(names)):
            name = names[index]
            child = rel + b"/" + name if rel else name
            try:
                attrs = self._entry(fh, name, child)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break

    async def releasedir(self, fh):
        pass

    async def fsyncdir(self, fh, datasync):
        rel = self._rel(fh) if fh != pyfuse3.ROOT_INODE else b""
        await self.inject("fsyncdir", rel)
        fd = os.open(self._abs(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx):
        await self.inject("statfs", None)
        st = os.statvfs(self.root)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data

    @property
    def _root_stat(self) -> os.stat_result:
        return os.stat(self.root)


# --- the control socket ----------------------------------------------------

async def serve_control(sock: trio.socket.SocketType, ops: FaultOperations, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    sock.listen(16)
    task_status.started()
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await sock.accept()
            nursery.start_soon(_serve_client, conn, ops)


async def _serve_client(conn, ops: FaultOperations) -> None:
    """Answer one client; whatever it does, the file system goes on."""
    try:
        with conn:
            await _answer(conn, ops)
    except Exception:
        log.exception("control client")


async def _answer(conn, ops: FaultOperations) -> None:
    if conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[4:8] not in (
            b"\0\0\0\0", os.getuid().to_bytes(4, sys.byteorder)):
        return  # only root and our own user may command us
    stream = trio.SocketStream(conn)
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                reply = await ops.command(json.loads(line))
            except Exception as e:  # a bad command is answered, never fatal
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


async def run(ops: FaultOperations, mountpoint: str, address: str) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(address)
    options = set(pyfuse3.default_options) | {"fsname=faultfs", "subtype=faultfs",
                                               "allow_other", "default_permissions"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sock, ops)
            nursery.start_soon(_stop_on_signal)
            print("ready", flush=True)
            await pyfuse3.main()
            for rule in ops.rules:  # release whatever waits
                rule.cleared.set()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        sock.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", help="abstract socket name (default: from MOUNTPOINT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="faultfs: %(levelname)s %(message)s")
    if not os.path.isdir(args.backing):
        parser.error(f"{args.backing} is not a directory")
    address = "\0" + args.control if args.control else control_address(args.mountpoint)
    trio.run(run, FaultOperations(args.backing), args.mountpoint, address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
