"""Disk image formats behind one interface (`snapfs.image.base.Image`):
raw and qcow2, opened and created by format name."""

from __future__ import annotations

import importlib

from snapfs.image.base import Image

#: each format's driver class, as "module:class": imported when first used,
#: so that a command that never opens a qcow2 image does not pay for
#: importing its driver (about 50 ms)
DRIVERS = {"raw": "snapfs.image.raw:RawImage", "qcow2": "snapfs.image.qcow2:Qcow2Image"}
FORMATS = tuple(DRIVERS)


def _driver(fmt: str) -> type[Image]:
    try:
        module, name = DRIVERS[fmt].split(":")
    except KeyError:
        raise ValueError(f"unknown image format {fmt!r}") from None
    return getattr(importlib.import_module(module), name)


def open_image(path: str, fmt: str = "raw", writable: bool = False,
               backing_dir: str | None = None, with_backing: bool = True) -> Image:
    """Open an existing image of format `fmt`. A qcow2 image finds a backing
    file with a relative name in `backing_dir` (default: `path`'s directory);
    without `with_backing` it opens its own layer only, and reading a cluster
    it does not hold fails (for a reader that never reads those)."""
    if fmt == "raw":
        return _driver(fmt).open(path, writable=writable)
    return _driver(fmt).open(path, writable=writable, backing_dir=backing_dir,
                             with_backing=with_backing)


def create_image(path: str, size: int, fmt: str = "raw", overwrite: bool = False,
                 cluster_size: int = 65536, backing_file: str | None = None,
                 backing_format: str | None = None) -> Image:
    """Create a new image of `size` bytes, open for writing. Where it has no
    backing file it reads as zeroes; a qcow2 image may have one (`backing_file`
    as it is to be stored, relative to `path`'s directory, and its format)."""
    if fmt == "raw":
        if backing_file is not None:
            raise ValueError("a raw image has no backing file")
        return _driver(fmt).create(path, size, overwrite=overwrite)
    return _driver(fmt).create(path, size, cluster_size=cluster_size, backing_file=backing_file,
                               backing_format=backing_format, overwrite=overwrite)
