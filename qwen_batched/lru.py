"""A bounded mapping for the caches (geometry, resize tables): least recently used entries go first."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRU:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._store: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The entry of ``key``, made by ``build()`` on a miss (evicting the least recently used beyond capacity)."""
        value = self._store.get(key)
        if value is None:
            value = self._store[key] = build()
            if len(self._store) > self.capacity:
                self._store.popitem(last=False)
        else:
            self._store.move_to_end(key)
        return value

    def clear(self) -> None:
        self._store.clear()
