"""The live disk's state on disk: which snapshots are active, so that after
the daemon dies (kill -9, the OOM killer) `snapfs mount SOURCE LIVE` brings
them back.

It lives in the live disk's own directory, `SOURCE.snapfs-live/` (beside
SOURCE), as `state.json`, replaced atomically (write, fsync, rename, fsync of
the directory) whenever a snapshot is taken or released. The directory also
holds the daemon's log. A clean unmount removes the directory; after a crash
it stays for the next mount.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import shutil

from snapfs.protocol import state_dir

STATE_FILE = "state.json"
LOG_FILE = "log"


def boot_id() -> str:
    """This boot's identity: the page cache (where the copy maps' bits and the
    data they describe live until written back) survives a daemon's death,
    not a reboot."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


#: ioctl FS_IOC_GETVERSION: the inode's generation number
_FS_IOC_GETVERSION = 0x80087601


def identity(fd: int) -> list[int]:
    """What tells a file from another one put at its path: device, inode and,
    where the file system keeps one, the inode's generation (ext4 and XFS give
    a reused inode number a new generation)."""
    st = os.fstat(fd)
    generation = array.array("l", [-1])
    try:
        fcntl.ioctl(fd, _FS_IOC_GETVERSION, generation, True)
    except OSError:
        generation[0] = -1
    return [st.st_dev, st.st_ino, generation[0]]


def identity_of(path: str) -> list[int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return identity(fd)
    finally:
        os.close(fd)


class LiveState:
    def __init__(self, source: str):
        self.dir = state_dir(source)
        self.file = os.path.join(self.dir, STATE_FILE)
        self.log = os.path.join(self.dir, LOG_FILE)

    def make_dir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def load(self) -> dict | None:
        """What the last daemon left, or None (never ran, or stopped cleanly)."""
        try:
            with open(self.file) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.file}: unreadable ({e})") from None

    def save(self, state: dict) -> None:
        self.make_dir()
        temporary = self.file + ".new"
        with open(temporary, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.file)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        """After a clean stop: nothing stays behind."""
        shutil.rmtree(self.dir, ignore_errors=True)
