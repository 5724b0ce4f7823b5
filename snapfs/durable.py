"""Files replaced so that a crash leaves the old or the new one, whole."""

from __future__ import annotations

import json
import os


def replace_json(path: str, data) -> None:
    """Write `data` as JSON to `path` through a temporary file beside it
    (mode 0600, no symbolic link followed), durable before and after the
    rename that puts it in place."""
    temporary = path + ".new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a file created, renamed or removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
