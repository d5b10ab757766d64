"""What the HTTP and the gRPC front ends share: request errors naming the field, admission, what
they record in :mod:`persia.telemetry` (served at ``/metrics``), and the decoding and checks of a
batch request (the settings: :mod:`persia.server.settings`)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from persia import telemetry
from persia.embedding.data import PersiaBatch
from persia.errors import BatchError

__all__ = [
    "RequestError",
    "InFlight",
    "record",
    "record_freshness",
    "decode_batch",
    "as_predictions",
]


class RequestError(Exception):
    """A request the server refuses: an HTTP status, where in the request, and why."""

    def __init__(self, status: int, loc: list[str | int], msg: str, kind: str) -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind = status, loc, msg, kind

    def body(self) -> dict[str, Any]:
        """FastAPI's error shape: ``{"detail": [{"loc", "msg", "type"}]}``."""
        return {"detail": [{"loc": self.loc, "msg": self.msg, "type": self.kind}]}


class InFlight:
    """Prediction requests being computed or queued, for admission (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def enter(self) -> int:
        """One more prediction request in flight; returns how many were before it."""
        with self._lock:
            self.count += 1
            return self.count - 1

    def leave(self) -> None:
        """One prediction request done."""
        with self._lock:
            self.count -= 1


def record(endpoint: str, code: str, seconds: float, samples: int | None = None) -> None:
    """One answer, to :mod:`persia.telemetry` (nothing while it is off): every answer by endpoint
    and status code, and a prediction answered (``samples`` given) with its latency and samples.
    """
    rec = telemetry.current()
    if not rec.on:
        return
    rec.serving_response(endpoint, code)
    if samples is not None:
        rec.serving_request(seconds, samples)


def record_freshness(freshness: dict[str, Any] | None) -> None:
    """The served model's training time (when the last delta applied was flushed), for the
    ``persia_serving_freshness_seconds`` gauge; nothing for a static model or before a delta."""
    rec = telemetry.current()
    if rec.on and freshness is not None:
        flushed = freshness.get("last_delta_flushed_unix_s")
        if flushed is not None:
            rec.serving_model_time(float(flushed))


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
