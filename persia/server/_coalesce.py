"""Computing the JSON-rows requests that wait at the same moment in one model call.

A request's fixed cost in the export's recipe (a few dozen Arrow and numpy calls per slot, the
model call) is paid once per call whatever its rows, so many small requests cost far more than
one request with all their rows. :class:`Coalescer` runs ``workers`` threads; a thread that is free
takes every request waiting at that moment (never waiting for more), up to ``max_rows`` rows, and
computes the requests whose columns have the same names and types in one call, then hands each
its own rows' predictions. The recipe treats each row on its own, so a row's prediction is the
same as alone, up to float rounding in the dense model's matrix products. If that call fails, each
request of the group is computed alone, so an error reaches only the request that caused it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

__all__ = ["Coalescer"]


@dataclass
class _Item:
    table: pa.Table
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return int(self.table.num_rows)


class Coalescer:
    """``submit(table)`` -> a future of ``predict(table)``, computed with the other requests
    waiting then (see the module docstring)."""

    def __init__(
        self,
        predict: Callable[[pa.Table], np.ndarray],
        *,
        max_rows: int,
        workers: int,
        name: str = "persia-rows",
    ) -> None:
        self._predict = predict
        self.max_rows = max_rows
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, table: pa.Table) -> Future:
        """Queues one request; the future holds its predictions or the error of computing it."""
        item = _Item(table)
        self._queue.put(item)
        return item.future

    def close(self) -> None:
        """Stops the threads once the queued requests are computed (idempotent)."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def _run(self) -> None:
        carry: _Item | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                return
            items, rows = [first], first.rows
            while rows < self.max_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # for this thread's next turn
                    break
                if rows + nxt.rows > self.max_rows:
                    carry = nxt
                    break
                items.append(nxt)
                rows += nxt.rows
            groups: dict[tuple[tuple[str, str], ...], list[_Item]] = {}
            for item in items:
                key = tuple((f.name, str(f.type)) for f in item.table.schema)
                groups.setdefault(key, []).append(item)
            for group in groups.values():
                self._compute(group)

    def _alone(self, item: _Item) -> None:
        try:
            item.future.set_result(self._predict(item.table))
        except BaseException as exc:  # handed to the request
            item.future.set_exception(exc)

    def _compute(self, group: list[_Item]) -> None:
        if len(group) == 1:
            self._alone(group[0])
            return
        try:
            out = np.asarray(self._predict(pa.concat_tables([it.table for it in group])))
        except Exception:
            out = None
        total = sum(it.rows for it in group)
        if out is None or out.ndim == 0 or out.shape[0] != total:
            for item in group:
                self._alone(item)
            return
        start = 0
        for item in group:
            item.future.set_result(out[start : start + item.rows])
            start += item.rows
