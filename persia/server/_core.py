"""What the HTTP and the gRPC front ends share: the settings, request errors naming the field,
the request counters behind ``/metrics``, and the decoding and checks of a batch request."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persia.embedding.data import PersiaBatch
from persia.errors import BatchError, ConfigError

__all__ = ["ServerSettings", "RequestError", "Stats", "decode_batch", "as_predictions"]

MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    """The limits and addresses of one server (``persia serve``'s options).

    Attributes:
        host: the address both front ends listen on.
        port: the HTTP port (0: any free port).
        grpc_port: the gRPC port (TorchServe's inference API; 0: any free port, None: no gRPC).
        max_request_bytes: a larger request body gets 413 (HTTP) or RESOURCE_EXHAUSTED (gRPC).
        max_batch: a request with more samples gets 413, naming the field.
        max_concurrent: requests computed at once (threads).
        max_queue: requests waiting for a thread; one more gets 503 with ``Retry-After``
            (HTTP) or RESOURCE_EXHAUSTED (gRPC).
        max_delta_age_s: readiness fails while the last applied delta is older than this
            (None: no bound).
        model_name: the gRPC ``model_name`` served (None: any name).
        coalesce_rows: JSON-rows requests waiting at the same moment are computed in one
            model call up to this many rows (:mod:`persia.server._coalesce`; 0: one call per
            request).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = 7070
    max_request_bytes: int = 16 * MiB
    max_batch: int = 8192
    max_concurrent: int = 4
    max_queue: int = 64
    max_delta_age_s: float | None = None
    model_name: str | None = None
    coalesce_rows: int = 1024

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_request_bytes", "max_batch", "max_concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_queue", "coalesce_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be an int >= 0, got {value!r}")
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            if value is None and name == "grpc_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
                problems.append(f"{name} must be a port number (0: any free port), got {value!r}")
        age = self.max_delta_age_s
        if age is not None and not (
            isinstance(age, (int, float)) and math.isfinite(age) and age > 0
        ):
            problems.append(f"max_delta_age_s must be > 0 or None, got {age!r}")
        if problems:
            raise ConfigError(problems, source="persia serve")


class RequestError(Exception):
    """A request the server refuses: an HTTP status, where in the request, and why."""

    def __init__(self, status: int, loc: list[str | int], msg: str, kind: str) -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind = status, loc, msg, kind

    def body(self) -> dict[str, Any]:
        """FastAPI's error shape: ``{"detail": [{"loc", "msg", "type"}]}``."""
        return {"detail": [{"loc": self.loc, "msg": self.msg, "type": self.kind}]}


@dataclass
class Stats:
    """Request counters for ``/metrics`` (thread-safe).

    **Interim**: a minimal Prometheus text body of persia's own counters until the metrics issue's
    ``persia.telemetry`` renders it.
    """

    started_unix_s: float = field(default_factory=time.time)
    _requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    _seconds: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0

    def enter(self) -> int:
        """One more prediction request in flight; returns how many were before it."""
        with self._lock:
            self.in_flight += 1
            return self.in_flight - 1

    def leave(self) -> None:
        """One prediction request done."""
        with self._lock:
            self.in_flight -= 1

    def record(self, endpoint: str, code: str, seconds: float) -> None:
        with self._lock:
            self._requests[(endpoint, code)] += 1
            self._seconds[endpoint] = self._seconds.get(endpoint, 0.0) + seconds

    def render(self, model_kind: str, freshness: dict[str, Any]) -> str:
        """The Prometheus text exposition of the counters and the model's freshness."""
        with self._lock:
            requests = sorted(self._requests.items())
            seconds = sorted(self._seconds.items())
            in_flight = self.in_flight
        lines = [
            "# persia serve: interim metrics (the metrics issue's persia.telemetry replaces them)",
            "# HELP persia_server_requests_total Requests answered, by endpoint and status code.",
            "# TYPE persia_server_requests_total counter",
        ]
        for (endpoint, code), n in requests:
            lines.append(f'persia_server_requests_total{{endpoint="{endpoint}",code="{code}"}} {n}')
        lines += [
            "# HELP persia_server_request_seconds_total Seconds spent answering, by endpoint.",
            "# TYPE persia_server_request_seconds_total counter",
        ]
        for endpoint, s in seconds:
            lines.append(f'persia_server_request_seconds_total{{endpoint="{endpoint}"}} {s:.6f}')
        lines += [
            "# HELP persia_server_in_flight Prediction requests being computed or queued.",
            "# TYPE persia_server_in_flight gauge",
            f"persia_server_in_flight {in_flight}",
            "# HELP persia_server_info The model served.",
            "# TYPE persia_server_info gauge",
            f'persia_server_info{{kind="{model_kind}"}} 1',
        ]
        seq, age = freshness.get("last_delta_seq"), freshness.get("age_s")
        if seq is not None:
            lines += [
                "# HELP persia_server_last_delta_seq The last training delta applied.",
                "# TYPE persia_server_last_delta_seq gauge",
                f"persia_server_last_delta_seq {int(seq)}",
            ]
        if age is not None:
            lines += [
                "# HELP persia_server_delta_age_seconds Age of the last training delta applied.",
                "# TYPE persia_server_delta_age_seconds gauge",
                f"persia_server_delta_age_seconds {float(age):.3f}",
            ]
        return "\n".join(lines) + "\n"


def decode_batch(data: bytes, max_batch: int, loc: list[str | int]) -> PersiaBatch:
    """A :meth:`PersiaBatch.to_bytes` request, decoded and checked against ``max_batch``.

    Raises:
        RequestError: 422 for bytes that are not a batch, 413 for too many samples.
    """
    try:
        batch = PersiaBatch.from_bytes(data)
    except BatchError as exc:
        raise RequestError(
            422, loc, f"not a PersiaBatch.to_bytes() batch: {exc}", "batch"
        ) from None
    if batch.batch_size > max_batch:
        raise RequestError(
            413,
            [*loc, "batch_size"],
            f"{batch.batch_size} samples, more than this server's limit of {max_batch}",
            "too_large",
        )
    return batch


def as_predictions(output: Any, n: int) -> list[Any]:
    """The model's output as JSON: one float per sample (one output per sample) or one list
    per sample; a value that is not finite becomes null."""
    arr = np.asarray(output)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise ValueError(f"the model returned shape {arr.shape} for {n} samples")
    arr = arr.reshape(n, -1).astype(np.float64, copy=False)
    flat = arr.shape[1] == 1
    if flat:
        arr = arr[:, 0]
    if np.isfinite(arr).all():
        return arr.tolist()
    values = np.where(np.isfinite(arr), arr, np.nan).astype(object)
    values[~np.isfinite(arr)] = None
    return values.tolist()
