"""A simulated network link in front of any :class:`Transport` (benchmarks only; off by default).

:class:`SimLinkTransport` wraps a transport (usually the in-process
:class:`persia.rpc.local.LocalTransport`) and delays every message as one full-duplex link of
a given bandwidth and one-way latency would: the request's bytes travel out, the inner transport
then does the real work where it always did (the parameter server's CPU time is not simulated,
it is spent), and the reply's bytes travel back. Message sizes come from the arrays in the
request and the reply (:func:`message_bytes`), plus a fixed header; with wire compression on
(:mod:`persia.rpc.wire`, ``ParameterServerClient.wire = "f16"``) those arrays are the coded ones,
so the link carries and counts the compressed bytes.

Each direction is a FIFO wire: a message starts transmitting when the wire is free, occupies it
for ``bytes * 8 / bandwidth`` seconds, and arrives ``latency`` seconds after its last byte left.
So two threads sending at once (the hybrid's lookup and gradient threads) share the bandwidth,
while requests and replies do not (full duplex). The waiting thread sleeps, which releases the
GIL, as a thread blocked on a socket would.

Used by ``benchmarks/bench_e2e.py --link`` to show what synchronous training loses when the
parameter servers are across a network, and what the hybrid's staleness wins back::

    servers = ctx.runtime.worker.servers
    servers.transport = SimLinkTransport(servers.transport, bandwidth_bits_per_s=1e9,
                                         latency_s=100e-6)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from persia.errors import ConfigError
from persia.rpc.base import Transport

__all__ = ["SimulatedLink", "SimLinkTransport", "message_bytes", "parse_link"]

#: Bytes counted for each message besides its arrays (method name, framing, small scalars).
HEADER_BYTES = 64

_OUT, _IN = 0, 1


def message_bytes(obj: Any) -> int:
    """Bytes that ``obj`` (a request's argument tuple or a reply) would take on the wire.

    Arrays count their ``nbytes``; numbers 8 bytes; strings and bytes their length; tuples,
    lists and dict values the sum of their items; None nothing. The per-message header is
    added by the link, not here.
    """
    if obj is None:
        return 0
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, str):
        return len(obj.encode())
    if isinstance(obj, (bool, int, float, np.generic)):
        return 8
    if isinstance(obj, (tuple, list)):
        return sum(message_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(message_bytes(k) + message_bytes(v) for k, v in obj.items())
    nbytes = getattr(obj, "nbytes", None)  # torch tensors, buffers
    if isinstance(nbytes, int):
        return nbytes
    return 8


@dataclass
class LinkStats:
    """What went over a link: message counts, bytes each way, seconds callers spent waiting."""

    messages: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    wait_s: float = 0.0


class SimulatedLink:
    """The timeline of one full-duplex link: a FIFO wire per direction plus a fixed latency.

    Args:
        bandwidth_bits_per_s: bits per second in each direction (> 0).
        latency_s: one-way latency in seconds (>= 0).
        header_bytes: bytes added to every message.
        clock: monotonic seconds (tests inject a fake one).
        sleep: blocks for the given seconds (tests inject a fake one).
    """

    def __init__(
        self,
        bandwidth_bits_per_s: float,
        latency_s: float,
        header_bytes: int = HEADER_BYTES,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        problems = []
        if not (_finite(bandwidth_bits_per_s) and bandwidth_bits_per_s > 0):
            problems.append(f"bandwidth_bits_per_s must be > 0, got {bandwidth_bits_per_s!r}")
        if not (_finite(latency_s) and latency_s >= 0):
            problems.append(f"latency_s must be >= 0, got {latency_s!r}")
        if isinstance(header_bytes, bool) or not isinstance(header_bytes, int) or header_bytes < 0:
            problems.append(f"header_bytes must be an int >= 0, got {header_bytes!r}")
        if problems:
            raise ConfigError(problems)
        self.bandwidth_bits_per_s = float(bandwidth_bits_per_s)
        self.latency_s = float(latency_s)
        self.header_bytes = header_bytes
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._free_at = [0.0, 0.0]  # when each direction's wire is next free
        self.stats = LinkStats()

    def schedule(self, nbytes: int, direction: int, now: float) -> float:
        """Books ``nbytes`` (plus the header) on one direction's wire at time ``now``.

        Returns:
            The time the message has fully arrived at the other end.
        """
        size = nbytes + self.header_bytes
        with self._lock:
            start = max(now, self._free_at[direction])
            done = start + size * 8.0 / self.bandwidth_bits_per_s
            self._free_at[direction] = done
            if direction == _OUT:
                self.stats.messages += 1
                self.stats.bytes_out += size
            else:
                self.stats.bytes_in += size
        return done + self.latency_s

    def transmit(self, nbytes: int, direction: int) -> float:
        """Sends ``nbytes`` one way and blocks until they have arrived; returns the wait."""
        now = self._clock()
        wait = self.schedule(nbytes, direction, now) - now
        if wait > 0:
            self._sleep(wait)
            with self._lock:
                self.stats.wait_s += wait
        return max(wait, 0.0)


class SimLinkTransport(Transport):
    """A :class:`Transport` whose messages cross a :class:`SimulatedLink` (benchmarks only).

    Args:
        inner: the transport doing the real work (for instance an in-process one).
        bandwidth_bits_per_s: link bandwidth in each direction, bits per second.
        latency_s: one-way latency, seconds.
        link: an existing link to share (then bandwidth and latency are ignored), so that
            several transports model one network interface.
    """

    def __init__(
        self,
        inner: Transport,
        bandwidth_bits_per_s: float = 10e9,
        latency_s: float = 50e-6,
        link: SimulatedLink | None = None,
    ) -> None:
        if not isinstance(inner, Transport):
            raise ConfigError(f"inner must be a Transport, got {type(inner).__name__}")
        self.inner = inner
        self.link = link if link is not None else SimulatedLink(bandwidth_bits_per_s, latency_s)

    @property
    def stats(self) -> LinkStats:
        return self.link.stats

    def replicas(self, role: str) -> int:
        return self.inner.replicas(role)

    def call(self, role: str, rank: int, method: str, *args: Any) -> Any:
        self.link.transmit(message_bytes(method) + message_bytes(args), _OUT)
        reply = self.inner.call(role, rank, method, *args)
        self.link.transmit(message_bytes(reply), _IN)
        return reply

    def close(self) -> None:
        self.inner.close()


def parse_link(spec: str) -> tuple[float, float]:
    """``"1gbit:100us"`` -> ``(1e9, 100e-6)``: bandwidth (bit, kbit, mbit, gbit) and latency
    (s, ms, us)."""
    units_bw = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    units_lat = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    try:
        bw_text, lat_text = spec.strip().lower().split(":")
        bw = _with_unit(bw_text, units_bw)
        lat = _with_unit(lat_text, units_lat)
    except ValueError:
        raise ConfigError(
            f"link must look like '1gbit:100us' (bandwidth:latency), got {spec!r}"
        ) from None
    if not bw > 0 or not lat >= 0:
        raise ConfigError(f"link needs bandwidth > 0 and latency >= 0, got {spec!r}")
    return bw, lat


def _with_unit(text: str, units: dict[str, float]) -> float:
    for unit, scale in units.items():  # longest units first in each table
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and bool(np.isfinite(x))
