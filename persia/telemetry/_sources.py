"""What is read when the metrics are collected (never on the hot path), held weakly: the
shards' counters, delta writers' lag. Registered whether metrics are on or off (registering costs
nothing), so that turning them on later still finds them."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

#: What a watched shard owner gives: ``[(replica, Shard.stats()), ...]``.
ShardSource = Callable[[Any], list[tuple[int, dict[str, Any]]]]


class _Sources:
    """Objects read when the metrics are collected (never on the hot path), held weakly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, weakref.ref, Callable[[Any], Any]]] = []

    def add(self, kind: str, owner: Any, fn: Callable[[Any], Any]) -> None:
        with self._lock:
            self._items = [it for it in self._items if it[1]() is not None]
            self._items.append((kind, weakref.ref(owner), fn))

    def remove(self, owner: Any) -> None:
        with self._lock:
            self._items = [it for it in self._items if it[1]() not in (None, owner)]

    def read(self, kind: str) -> Iterator[Any]:
        with self._lock:
            items = [(ref(), fn) for k, ref, fn in self._items if k == kind]
        for owner, fn in items:
            if owner is not None:
                yield fn(owner)


SOURCES = _Sources()
