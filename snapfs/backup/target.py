"""The backup target: the image that receives the point-in-time clusters.

A raw target is a sparse file of the source's size: clusters not copied are
holes. A qcow2 target is laid out per sync mode, as QEMU's drive-backup does:

- full: a standalone image (no backing file);
- top: backed by the source's backing file, so that with the clusters of the
  source's top layer it is the whole point-in-time image;
- none: backed by the source itself (meaningful only while mounted);
- incremental: backed by the base backup's target (always qcow2), so that the
  chain full <- inc1 <- inc2 reads as the point-in-time image.

Its cluster size is snapfs's cluster size, so that every copy fills whole
target clusters and never reads the target's backing file.
"""

from __future__ import annotations

import os

from snapfs.image import create_image
from snapfs.image.base import Image


def backing_for(sync: str, source: Image, source_format: str, target_path: str,
                base: tuple[str, str] | None = None) -> tuple[str | None, str | None]:
    """(backing file name to store in a qcow2 target, its format); `base`:
    the (path, format) of the backup an incremental builds on."""
    if sync == "incremental":
        return _name_from(target_path, base[0]), base[1]
    if sync == "none":
        return _name_from(target_path, source.path), source_format
    if sync == "top" and getattr(source, "backing", None) is not None:
        return _name_from(target_path, source.backing.path), source.backing_format
    return None, None


def _name_from(target_path: str, backing_path: str) -> str:
    """How the target names its backing file: the plain name when both lie in
    one directory, else the absolute path."""
    backing_path = os.path.abspath(backing_path)
    if os.path.dirname(backing_path) == os.path.dirname(os.path.abspath(target_path)):
        name = os.path.basename(backing_path)
        # QEMU takes "name:rest" for a protocol: "./" keeps it a file name
        return "./" + name if ":" in name else name
    return backing_path


def create_target(path: str, source: Image, source_format: str, target_format: str,
                  sync: str, cluster_size: int, overwrite: bool,
                  base: tuple[str, str] | None = None) -> Image:
    backing_file = backing_format = None
    if target_format == "qcow2":
        backing_file, backing_format = backing_for(sync, source, source_format, path, base)
    return create_image(path, source.size, target_format, overwrite=overwrite,
                        cluster_size=cluster_size, backing_file=backing_file,
                        backing_format=backing_format)
