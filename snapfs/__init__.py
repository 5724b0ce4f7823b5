"""snapfs: point-in-time snapshots of a disk image that stays in use."""

__version__ = "0.1.0"
