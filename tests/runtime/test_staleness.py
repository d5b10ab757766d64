import random
import threading
import time

import pytest

from persia.errors import PersiaError
from persia.runtime.staleness import StalenessGate


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bound_must_be_positive_int(bad):
    with pytest.raises(PersiaError, match="embedding_staleness"):
        StalenessGate(bad)


def test_synchronous_gate_sees_zero_staleness():
    gate = StalenessGate(1)
    for _ in range(5):
        assert gate.acquire() == 0
        gate.release()
    rep = gate.report()
    assert rep.max == 0 and rep.batches == 5 and rep.histogram == {0: 5}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_never_more_than_k_in_flight_and_histogram_matches(k):
    gate = StalenessGate(k)
    seen = []
    in_flight = []
    lock = threading.Lock()
    pending: list[int] = []
    stop = threading.Event()
    rng = random.Random(k)

    def applier():
        while not stop.is_set() or pending:
            with lock:
                item = pending.pop(0) if pending else None
            if item is None:
                time.sleep(0.0005)
                continue
            time.sleep(rng.random() * 0.002)
            gate.release()

    t = threading.Thread(target=applier)
    t.start()
    for _ in range(60):
        s = gate.acquire()
        seen.append(s)
        in_flight.append(gate.in_flight)
        with lock:
            pending.append(1)
    stop.set()
    t.join()
    assert max(in_flight) <= k
    assert max(seen) <= k - 1
    rep = gate.report()
    assert rep.batches == 60
    assert rep.max == max(seen)
    assert sum(rep.histogram.values()) == 60
    assert rep.histogram == {s: seen.count(s) for s in set(seen)}
    assert rep.max_in_flight <= k


def test_acquire_returns_none_when_stopped():
    gate = StalenessGate(1)
    assert gate.acquire() == 0
    stop = threading.Event()
    stop.set()
    assert gate.acquire(stop) is None


def test_release_without_acquire_is_an_error():
    with pytest.raises(PersiaError):
        StalenessGate(2).release()
