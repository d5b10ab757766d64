"""The simulated link: wire timeline, byte counting, delegation and real delays."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from persia.errors import ConfigError
from persia.rpc.base import PARAMETER_SERVER, ParameterServerClient
from persia.rpc.local import LocalTransport
from persia.rpc.simlink import (
    HEADER_BYTES,
    SimLinkTransport,
    SimulatedLink,
    message_bytes,
    parse_link,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


class EchoShard:
    def lookup(self, keys, dim, training):
        return np.ones((len(keys), dim), dtype=np.float32)

    def apply_gradients(self, keys, grads):
        return np.array([len(keys), 0, 0], dtype=np.int64)


def test_message_bytes_counts_arrays_and_scalars():
    keys = np.zeros(10, np.uint64)
    assert message_bytes(keys) == 80
    assert message_bytes((keys, 16, True)) == 96
    assert message_bytes("lookup") == 6
    assert message_bytes(None) == 0
    assert message_bytes([np.zeros((3, 4), np.float32), {"a": 1.0}]) == 48 + 1 + 8


def test_one_message_takes_size_over_bandwidth_plus_latency():
    clock = FakeClock()
    link = SimulatedLink(1e9, 100e-6, clock=clock, sleep=clock.sleep)
    wait = link.transmit(1_000_000 - HEADER_BYTES, 0)
    assert wait == pytest.approx(8e-3 + 100e-6)
    assert clock.t == pytest.approx(8.1e-3)
    assert link.stats.bytes_out == 1_000_000 and link.stats.messages == 1


def test_same_direction_queues_opposite_direction_does_not():
    link = SimulatedLink(8e6, 0.0, header_bytes=0)  # 1 byte per microsecond
    a = link.schedule(1000, 0, now=0.0)
    b = link.schedule(1000, 0, now=0.0)  # waits for the wire
    c = link.schedule(1000, 1, now=0.0)  # other direction: free
    assert a == pytest.approx(1e-3)
    assert b == pytest.approx(2e-3)
    assert c == pytest.approx(1e-3)
    later = link.schedule(1000, 0, now=5e-3)  # wire idle again
    assert later == pytest.approx(6e-3)


def test_transport_delegates_and_delays_request_and_reply():
    clock = FakeClock()
    link = SimulatedLink(1e9, 50e-6, clock=clock, sleep=clock.sleep)
    inner = LocalTransport({PARAMETER_SERVER: [EchoShard(), EchoShard()]})
    tr = SimLinkTransport(inner, link=link)
    client = ParameterServerClient(tr, lambda keys, n: (keys % np.uint64(n)).astype(np.int32))
    assert client.num_shards == 2
    keys = np.arange(1000, dtype=np.uint64)
    rows = client.lookup(1, keys, 16, True)
    assert rows.shape == (1000, 16) and rows.dtype == np.float32
    out_bytes = len("lookup") + 8000 + 8 + 8 + HEADER_BYTES
    in_bytes = 1000 * 16 * 4 + HEADER_BYTES
    assert link.stats.bytes_out == out_bytes
    assert link.stats.bytes_in == in_bytes
    expected = (out_bytes + in_bytes) * 8 / 1e9 + 2 * 50e-6
    assert clock.t == pytest.approx(expected)
    assert len(clock.slept) == 2


def test_real_sleep_is_at_least_the_transfer_time_and_threads_share_the_wire():
    inner = LocalTransport({PARAMETER_SERVER: [EchoShard()]})
    tr = SimLinkTransport(inner, bandwidth_bits_per_s=1e9, latency_s=0.0)
    keys = np.zeros(250_000, np.uint64)  # 2 MB out: 16 ms at 1 Gbit/s

    def send():
        tr.call(PARAMETER_SERVER, 0, "apply_gradients", keys, np.zeros((0, 1), np.float32))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert elapsed >= 2 * 16e-3 * 0.99  # two messages queued on one wire
    assert tr.stats.messages == 2


@pytest.mark.parametrize(
    ("spec", "bw", "lat"),
    [("1gbit:100us", 1e9, 100e-6), ("10Gbit:50us", 10e9, 50e-6), ("100mbit:2ms", 1e8, 2e-3)],
)
def test_parse_link(spec, bw, lat):
    got = parse_link(spec)
    assert got == pytest.approx((bw, lat))


@pytest.mark.parametrize("spec", ["1gbit", "fast:1us", "0gbit:1us", "1gbit:-1us"])
def test_parse_link_rejects(spec):
    with pytest.raises(ConfigError):
        parse_link(spec)


def test_invalid_link_settings_name_the_field():
    with pytest.raises(ConfigError, match="bandwidth_bits_per_s must be > 0, got 0") as info:
        SimulatedLink(0, -1.0)
    assert "latency_s must be >= 0, got -1.0" in str(info.value)
    with pytest.raises(ConfigError, match="inner must be a Transport"):
        SimLinkTransport(object())  # type: ignore[arg-type]
