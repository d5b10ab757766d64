"""What the HTTP and the gRPC front ends share: request errors naming the field, the request
counters behind ``/metrics``, and the decoding and checks of a batch request (the settings:
:mod:`persia.server.settings`)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persia.embedding.data import PersiaBatch
from persia.errors import BatchError

__all__ = ["RequestError", "Stats", "decode_batch", "as_predictions"]


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
