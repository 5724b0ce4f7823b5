"""A bounded cache of metadata clusters (L2 tables, refcount blocks)."""

from __future__ import annotations

from collections import OrderedDict


class LRU(OrderedDict):
    """A dict that keeps at most `capacity` entries, dropping the least
    recently looked up or put."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
