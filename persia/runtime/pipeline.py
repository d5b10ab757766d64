"""The in-process hybrid pipeline: store, embedding worker and the gradient-applying thread.

One :class:`Runtime` per job in the embedded backend. The DataLoader's lookup thread calls
:meth:`Runtime.lookup`; the NN worker (the user's loop, via :class:`persia.ctx.TrainCtx`) consumes
:class:`TrainingBatch` objects and hands their embedding gradients to :meth:`Runtime.submit`,
which queues them for the applier thread. The applier turns them into per-key gradients,
applies them on the shards and returns the batch's staleness permit.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persia.embedding.data import PersiaBatch
from persia.errors import BackendError, PersiaError
from persia.logger import get_default_logger
from persia.runtime.staleness import StalenessGate
from persia.worker.embedding_worker import EmbeddingWorker, Lookup

_logger = get_default_logger()
_POLL_S = 0.05


@dataclass
class TrainingBatch:
    """A batch whose embeddings have been looked up (PERSIA's ``PersiaTrainingBatch``).

    Attributes:
        batch: the user's :class:`PersiaBatch`.
        lookup: the embedding worker's result (pooled embeddings, backward context).
        index: position in its DataLoader pass.
        staleness: earlier training batches not yet applied at its lookup (None: eval batch).
    """

    batch: PersiaBatch
    lookup: Lookup
    index: int
    gate: StalenessGate | None
    staleness: int | None = None
    _settled: bool = field(default=False, repr=False)
    _submitted: bool = field(default=False, repr=False)

    @property
    def training(self) -> bool:
        return self.lookup.training

    def settle(self) -> None:
        """Returns the staleness permit (once): gradients applied, or none will come."""
        if self.training and not self._settled and self.gate is not None:
            self._settled = True
            self.gate.release()

    def discard(self) -> None:
        """Drops a batch that will never get gradients (no-op once they were submitted)."""
        if not self._submitted:
            self.settle()


class Runtime:
    """Store, worker and applier thread of one job in this process.

    Args:
        worker: the embedding worker (over the parameter servers).
        store: the in-process store (for dump/load/stats), or None where it is remote.
        backward_buffer_size: gradient batches that may wait for the applier.
    """

    def __init__(self, worker: EmbeddingWorker, store: Any, backward_buffer_size: int = 10) -> None:
        self.worker = worker
        self.store = store
        self.training_allowed = True
        self.backward_buffer_size = max(1, backward_buffer_size)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.backward_buffer_size)
        self._error: BaseException | None = None
        self._closed = False
        self._pending = 0
        self._cond = threading.Condition()
        self.counts = np.zeros(3, dtype=np.int64)  # applied, skipped_absent, skipped_nonfinite
        self.batches_applied = 0
        self._thread = threading.Thread(target=self._apply_loop, name="persia-apply", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- forward side
    def lookup(
        self, batch: PersiaBatch, training: bool, index: int, gate: StalenessGate | None
    ) -> TrainingBatch:
        self._raise_pending()
        result = self.worker.forward(batch, training)
        return TrainingBatch(batch, result, index, gate if training else None)

    # ------------------------------------------------------------- backward side
    def submit(
        self,
        item: TrainingBatch,
        summed_grad: np.ndarray | None,
        raw_grads: dict[int, np.ndarray],
    ) -> None:
        """Queues one batch's embedding gradients for the applier thread."""
        self._raise_pending()
        if self._closed:
            raise PersiaError("the training runtime is closed")
        item._submitted = True
        with self._cond:
            self._pending += 1
        while True:
            try:
                self._queue.put((item, summed_grad, raw_grads), timeout=_POLL_S)
                return
            except queue.Full:
                self._raise_pending()

    def _apply_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            item, summed_grad, raw_grads = job
            try:
                if self._error is None:
                    counts = self.worker.backward(item.lookup, summed_grad, raw_grads)
                    self.counts += counts
                    self.batches_applied += 1
            except BaseException as exc:  # surfaced in the NN worker's thread
                self._error = exc
            finally:
                item.settle()
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every submitted gradient has been applied."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending == 0, timeout=timeout_s):
                raise BackendError(
                    f"embedding gradients not applied within {timeout_s} s", role="embedding-worker"
                )
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=10)
