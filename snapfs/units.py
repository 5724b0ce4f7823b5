"""Sizes as people write and read them: 64K, 1M, 1.5 GiB."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'65536', '64K', '64k', '64KiB', '1M', ... as a number of bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?B)?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"
