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
import stat
import threading

from snapfs.durable import replace_json
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
    """The state directory of one SOURCE. Only a directory that this user
    made (owned by it, writable by nobody else, not a symbolic link) is
    used: SOURCE's directory may belong to someone else, who must not be able
    to plant a state (or a log that is a link to some other file) there."""

    def __init__(self, source: str):
        self._saving = threading.Lock()  # saves run in worker threads
        self.dir = state_dir(source)
        self.file = os.path.join(self.dir, STATE_FILE)
        self.log = os.path.join(self.dir, LOG_FILE)

    def make_dir(self) -> bool:
        """Make the directory unless it exists; whether it existed."""
        try:
            os.mkdir(self.dir, 0o700)
            return False
        except FileExistsError:
            check_trusted(self.dir, directory=True)
            return True

    def load(self) -> dict | None:
        """What the last daemon left, or None (never ran, or stopped
        cleanly); ValueError with one line if it cannot be used."""
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            return None
        check_trusted(self.dir, directory=True, st=st)
        try:
            fd = os.open(self.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ValueError(f"{self.file}: {e.strerror}") from None
        with os.fdopen(fd) as f:
            check_trusted(self.file, directory=False, st=os.fstat(f.fileno()))
            try:
                state = json.load(f)
                _check_shape(state)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.file}: damaged ({e}); move it away to mount SOURCE "
                                 "without bringing back its snapshots") from None
        return state

    def save(self, state: dict) -> None:
        with self._saving:
            self._save(state)

    def _save(self, state: dict) -> None:
        self.make_dir()
        replace_json(self.file, state)

    def remove(self, keep: tuple[str, ...] = ()) -> None:
        """After a clean stop: nothing stays behind but what `keep` names
        (change tracking that outlives the mount)."""
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for name in os.listdir(self.dir):
            if name not in keep:
                path = os.path.join(self.dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)


def check_trusted(path: str, directory: bool, st: os.stat_result | None = None) -> None:
    """Refuse (ValueError, one line) what this user did not make itself."""
    st = st or os.lstat(path)
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind:
        raise ValueError(f"{path}: exists and is not a {'directory' if directory else 'file'} "
                         "snapfs made")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ValueError(f"{path}: not made by snapfs as this user (owner {st.st_uid}, "
                         f"mode {stat.S_IMODE(st.st_mode):o}); not trusted, remove it")


def _check_shape(state) -> None:
    """Raise if the state is not what `LiveDaemon` writes."""
    if not isinstance(state, dict) or not isinstance(state.get("snapshots"), list):
        raise ValueError("no list of snapshots")
    for entry in state["snapshots"]:
        request = entry["request"]
        if not (isinstance(request, dict) and isinstance(request["snapshot"], str)
                and isinstance(request["target"], str) and isinstance(entry["times"], dict)):
            raise ValueError("a snapshot's record is incomplete")
