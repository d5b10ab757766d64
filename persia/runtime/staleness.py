"""The bounded-staleness gate (PERSIA's ``embedding_staleness``) and its measurement.

``StalenessGate(k)`` holds k permits. A training batch takes one before its embedding lookup and
returns it once its embedding gradients have been applied on the parameter servers (or once it is
known that it will produce none). So at most k batches are looked-up-but-not-applied at any time;
k = 1 is fully synchronous.

The staleness a batch actually saw is the number of earlier training batches whose gradients were
not yet applied at the moment of its lookup; it is at most k - 1. The gate records it per batch and
reports the max, the mean and the histogram.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from persia import telemetry
from persia.errors import PersiaError

_POLL_S = 0.05


@dataclass
class StalenessReport:
    """What the gate measured over a run."""

    batches: int = 0
    max: int = 0
    mean: float = 0.0
    histogram: dict[int, int] = field(default_factory=dict)
    max_in_flight: int = 0

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "staleness_max": self.max,
            "staleness_mean": self.mean,
            "staleness_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
            "max_in_flight": self.max_in_flight,
        }


class StalenessGate:
    """k permits; a batch holds one from before its lookup until its gradients are applied.

    Args:
        bound: k >= 1, the most batches in flight at once.
    """

    def __init__(self, bound: int) -> None:
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
            raise PersiaError(
                f"embedding_staleness must be an int >= 1 (1 = synchronous), got {bound!r}"
            )
        self.bound = bound
        self._sem = threading.Semaphore(bound)
        self._lock = threading.Lock()
        self._started = 0  # training batches that took a permit
        self._finished = 0  # ... and returned it
        self._hist: Counter[int] = Counter()
        self._max_in_flight = 0

    def acquire(self, stop: threading.Event | None = None) -> int | None:
        """Takes a permit (waiting while k batches are in flight).

        Returns:
            The staleness the batch sees (earlier batches not yet applied), or None when ``stop``
            was set while waiting.
        """
        while not self._sem.acquire(timeout=_POLL_S):
            if stop is not None and stop.is_set():
                return None
        with self._lock:
            staleness = self._started - self._finished
            self._started += 1
            self._hist[staleness] += 1
            in_flight = self._started - self._finished
            self._max_in_flight = max(self._max_in_flight, in_flight)
        rec = telemetry.current()
        if rec.on:
            rec.staleness_taken(staleness, in_flight)
        return staleness

    def release(self) -> None:
        """Returns one permit: that batch's gradients are applied (or will never come)."""
        with self._lock:
            if self._finished >= self._started:
                raise PersiaError("staleness gate released more often than acquired")
            self._finished += 1
            in_flight = self._started - self._finished
        self._sem.release()
        rec = telemetry.current()
        if rec.on:
            rec.staleness_returned(in_flight)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._started - self._finished

    def report(self) -> StalenessReport:
        with self._lock:
            n = sum(self._hist.values())
            total = sum(k * v for k, v in self._hist.items())
            return StalenessReport(
                batches=n,
                max=max(self._hist) if self._hist else 0,
                mean=total / n if n else 0.0,
                histogram=dict(self._hist),
                max_in_flight=self._max_in_flight,
            )
