"""The context stack: :class:`BaseCtx`, the context entered most recently (:func:`cnt_ctx`)
and the runtime built most recently (an ``eval_ctx`` outside a ``TrainCtx`` uses it, as PERSIA's
servers outlive a context)."""

from __future__ import annotations

import threading

import torch

from persia.errors import PersiaError
from persia.logger import get_default_logger, warn_once
from persia.runtime.pipeline import RuntimeProtocol

_logger = get_default_logger()
_CTX_LOCK = threading.RLock()
_CURRENT_CTX: BaseCtx | None = None
_LAST_RUNTIME: RuntimeProtocol | None = None


def cnt_ctx() -> BaseCtx | None:
    """The context most recently entered and not yet exited."""
    return _CURRENT_CTX


def last_runtime() -> RuntimeProtocol | None:
    """The runtime a context built most recently (None: none yet)."""
    return _LAST_RUNTIME


def set_last_runtime(runtime: RuntimeProtocol) -> None:
    """Records ``runtime`` as the one built most recently."""
    global _LAST_RUNTIME
    _LAST_RUNTIME = runtime


def close_last_runtime(by: str) -> None:
    """Closes the runtime a context built most recently (kept open after its context ended, so
    that an ``eval_ctx`` may follow) because a new job named ``by`` replaces it: its parameter
    servers go, and with them what they hold of the cluster. Does nothing while a context uses
    it. An error it still holds (a late failure of its applier thread) belongs to that job and
    is logged, not raised."""
    last = _LAST_RUNTIME
    current = _CURRENT_CTX
    if last is None or last.closed or (current is not None and current._runtime is last):
        return
    try:
        last.close()
    except Exception as exc:  # noqa: BLE001 - reported, and not this job's error
        _logger.warning(
            f"the previous training runtime ended with an error, ignored by the new {by}: "
            f"{type(exc).__name__}: {exc}"
        )


class BaseCtx:
    """Common base of persia's contexts (PERSIA's API); not used directly.

    Args:
        threadpool_worker_size: PERSIA's RPC thread count; has no effect here (no RPC).
        device_id: CUDA device for the dense model, or None for the CPU.
    """

    def __init__(self, threadpool_worker_size: int = 10, device_id: int | None = None) -> None:
        if threadpool_worker_size != 10:
            warn_once(
                _logger,
                "threadpool_worker_size",
                "threadpool_worker_size has no effect in persia (no RPC thread pool)",
            )
        if device_id is not None and device_id >= 0:
            if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
                raise PersiaError(f"device_id={device_id}: no such CUDA device")
            torch.cuda.set_device(device_id)
            self.device = torch.device("cuda", device_id)
        else:
            device_id = None
            self.device = torch.device("cpu")
        self.device_id = device_id
        self._origin: BaseCtx | None = None
        self._runtime: RuntimeProtocol | None = None

    def _enter(self) -> None:
        """Hook when entering the context."""

    def _exit(self) -> None:
        """Hook when exiting the context."""

    def __enter__(self):
        global _CURRENT_CTX
        with _CTX_LOCK:
            self._enter()
            self._origin = _CURRENT_CTX
            _CURRENT_CTX = self
        return self

    def __exit__(self, exc_type, value, trace) -> None:
        global _CURRENT_CTX
        with _CTX_LOCK:
            try:
                self._exit()
            finally:
                _CURRENT_CTX = self._origin
