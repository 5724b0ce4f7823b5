"""Serving a snapshot over NBD: an nbdkit process, a child of the live
process, running snapfs's plugin (snapfs/nbd/nbdkit_plugin.py).

nbdkit gets SOURCE, the target and the copy map as inherited descriptors and
reads data through the snapshot's own mount. It is started with
--exit-with-parent, so it never outlives the live process, and it is
stopped before its snapshot ends: before the snapshot is unmounted on a
release, and before its copy-before-write stops. It reports being ready by
writing its pid file, once it listens.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess

import trio

import snapfs
from snapfs.errors import UserError

log = logging.getLogger("snapfs")

_PACKAGE = os.path.dirname(os.path.abspath(snapfs.__file__))
PLUGIN = os.path.join(_PACKAGE, "nbd", "nbdkit_plugin.py")
#: where nbdkit's Python finds the snapfs package
PACKAGE_PARENT = os.path.dirname(_PACKAGE)
#: how long nbdkit may take to listen
START_TIMEOUT = 30


class Export:
    def __init__(self, where: dict):
        """`where`: {"socket": PATH} or {"port": N, "bind": ADDR}."""
        self.where = where
        self.process: trio.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, snapshot, run_dir: str) -> None:
        nbdkit = shutil.which("nbdkit")
        if nbdkit is None:
            raise UserError("nbdkit is not installed (Debian: nbdkit nbdkit-plugin-python)")
        store, source = snapshot.store, snapshot.source
        if store.broken is not None:
            raise UserError(f"the snapshot is broken: {store.broken}")
        pidfile = os.path.join(run_dir, f"nbdkit-{secrets.token_hex(4)}.pid")
        if "socket" in self.where:
            listen = ["--unix", self.where["socket"]]
        else:
            listen = ["--port", str(self.where["port"]), "--ipaddr", self.where["bind"]]
        fds = {"source": source.fd, "target": store.target.fd, "copymap": store.copymap.fd}
        args = [nbdkit, "--exit-with-parent", "--foreground", "--readonly", "--pidfile", pidfile,
                *listen, "python", PLUGIN, f"snapshot={snapshot.file}",
                f"format={snapshot.source_format}", f"target_format={snapshot.target_format}",
                f"backing_dir={os.path.dirname(source.path)}", f"snapfs={PACKAGE_PARENT}",
                *(f"{name}=/proc/self/fd/{fd}" for name, fd in fds.items())]
        self.process = await trio.lowlevel.open_process(args, stdin=subprocess.DEVNULL,
                                                        pass_fds=tuple(fds.values()))
        try:
            with trio.fail_after(START_TIMEOUT):
                while not os.path.exists(pidfile):
                    if self.process.poll() is not None:
                        raise UserError(f"nbdkit exited with {self.process.returncode} before "
                                        f"serving {self.describe()} (see the log)")
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            await self.stop()
            raise UserError(f"nbdkit did not listen on {self.describe()} in time") from None
        except BaseException:
            await self.stop()
            raise
        finally:
            try:
                os.unlink(pidfile)
            except FileNotFoundError:
                pass
        log.info("%s exported over NBD on %s (nbdkit pid %d)", snapshot.file, self.describe(),
                 self.process.pid)

    def describe(self) -> str:
        if "socket" in self.where:
            return f"nbd+unix:///?socket={self.where['socket']}"
        return f"nbd://{self.where['bind']}:{self.where['port']}/"

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        if "socket" in self.where:
            try:
                os.unlink(self.where["socket"])
            except FileNotFoundError:
                pass
