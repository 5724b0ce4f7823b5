"""The nbdkit Python plugin that serves one snapshot, read-only.

`snapfs export` makes the live process start
`nbdkit ... python snapfs/nbd/nbdkit_plugin.py KEY=VALUE ...` as its child,
handing it SOURCE, the target and the copy map as open descriptors (read
here through /proc/self/fd, read-only). Data is read from the snapshot file
on its mount (SNAPSHOT/NAME), so that it is exactly what the mount shows;
`extents` answers base:allocation from SOURCE's allocation and the copy map
(snapfs.nbd.allocation), so clients skip holes and zero runs.

Keys: snapshot (the file), source, target, copymap (paths to open),
format, target_format, backing_dir (where SOURCE's relative backing names
lie), snapfs (the directory holding the snapfs package).
"""

import os
import sys

import nbdkit

API_VERSION = 2

_config: dict = {}
_state: dict = {}


def config(key, value):
    _config[key] = value


def config_complete():
    missing = {"snapshot", "source", "target", "copymap", "format", "target_format",
               "snapfs"} - _config.keys()
    if missing:
        raise RuntimeError(f"missing parameters: {', '.join(sorted(missing))}")
    sys.path.insert(0, _config["snapfs"])


def get_ready():
    from snapfs.backup.copymap import CopyMap
    from snapfs.image import open_image

    _state["source"] = open_image(_config["source"], _config["format"],
                                  backing_dir=_config.get("backing_dir") or None)
    _state["target"] = open_image(_config["target"], _config["target_format"], with_backing=False)
    _state["copymap"] = CopyMap.open(_config["copymap"], follow=True)
    _state["fd"] = os.open(_config["snapshot"], os.O_RDONLY | os.O_CLOEXEC)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return _state["source"].size


def can_write(h):
    return False


def can_extents(h):
    return True


def can_multi_conn(h):
    return True  # read-only: every connection sees the same bytes


def pread(h, buf, offset, flags):
    view = memoryview(buf)
    while view:
        done = os.preadv(_state["fd"], [view], offset)
        if done == 0:
            raise OSError(5, "short read from the snapshot")
        view = view[done:]
        offset += done


def extents(h, count, offset, flags):
    from snapfs.nbd.allocation import extents as allocation

    found = []
    for start, length, data in allocation(_state["source"], _state["target"], _state["copymap"],
                                          offset, count):
        found.append((start, length, 0 if data else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return found
