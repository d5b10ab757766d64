"""Coalescer: JSON-rows requests waiting at the same moment are computed in one call and each
gets its own rows' predictions; different columns are not mixed; a failing request fails alone."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from persia.errors import BatchError
from persia.server._coalesce import Coalescer


class Recorder:
    """predict(table) = 2 * column x; blocks its first call until released; records calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, table: pa.Table) -> np.ndarray:
        if not self.calls:
            self.entered.set()
            assert self.release.wait(30)
        self.calls.append(table.num_rows)
        x = table.column("x").to_numpy(zero_copy_only=False).astype(np.float64)
        if np.isnan(x).any():
            raise BatchError("column 'x': a missing value")
        return (2 * x).astype(np.float32)


def _t(*xs: float | None, **extra) -> pa.Table:
    return pa.table({"x": pa.array(list(xs), pa.float64()), **extra})


def test_waiting_requests_are_computed_together_and_split_back():
    predict = Recorder()
    c = Coalescer(predict, max_rows=6, workers=1)
    try:
        first = c.submit(_t(1.0))
        assert predict.entered.wait(30)  # the worker is busy: the next ones wait together
        futures = [c.submit(_t(float(i), float(i) + 0.5)) for i in range(2, 6)]
        other = c.submit(_t(9.0, y=pa.array(["a"])))  # other columns: computed apart
        bad = c.submit(_t(None))
        predict.release.set()
        assert first.result(30).tolist() == [2.0]
        for i, f in enumerate(futures, start=2):
            assert f.result(30).tolist() == [2 * i, 2 * i + 1]
        assert other.result(30).tolist() == [18.0]
        with pytest.raises(BatchError, match="missing value"):
            bad.result(30)
    finally:
        c.close()
    # 1, then the waiting ones up to 6 rows per call (3 requests of 2 rows), then the rest;
    # the call holding the bad request failed and its requests were computed alone
    assert predict.calls[0] == 1 and max(predict.calls) <= 6
    assert 6 in predict.calls


def test_close_computes_what_is_queued_and_stops_the_threads():
    c = Coalescer(lambda t: np.zeros(t.num_rows), max_rows=10, workers=2)
    threads = list(c._threads)
    futures = [c.submit(_t(1.0)) for _ in range(5)]
    c.close()
    assert all(f.result(0).shape == (1,) for f in futures)
    assert len(threads) == 2 and not any(t.is_alive() for t in threads)
