"""The in-process hybrid pipeline: store, embedding worker and the gradient-applying thread.

:class:`RuntimeProtocol` is what the contexts, the DataLoader and the job runner use of a
runtime, on any backend. One :class:`Runtime` per job in the embedded backend. The DataLoader's
lookup thread calls :meth:`Runtime.lookup`; the NN worker (the user's loop, via
:class:`persia.ctx.TrainCtx`) consumes :class:`TrainingBatch` objects and hands their embedding
gradients to :meth:`Runtime.submit`, which queues them for the applier thread. The applier
turns them into per-key gradients, applies them on the shards and returns the batch's staleness
permit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from persia import telemetry
from persia.embedding.data import PersiaBatch
from persia.embedding.spec import EmbeddingSpec
from persia.errors import BackendError, PersiaError
from persia.logger import get_default_logger
from persia.runtime.staleness import StalenessGate
from persia.store import ShardedStore
from persia.worker.embedding_worker import EmbeddingWorker
from persia.worker.protocol import EmbeddingWorkerProtocol, LookupResult

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
    lookup: LookupResult
    index: int
    gate: StalenessGate | None
    staleness: int | None = None
    _settled: bool = field(default=False, repr=False)
    _submitted: bool = field(default=False, repr=False)
    #: set by a CUDA NN worker (persia.ctx): waits until the gradients' device-to-host copies
    #: are done (the applier calls it before it reads them), and returns their pinned buffers
    #: once they were applied
    grads_ready: Callable[[], None] | None = field(default=None, repr=False)
    grads_done: Callable[[], None] | None = field(default=None, repr=False)
    #: the batch's tensors on the NN worker's device, copied ahead (persia.ctx)
    staged: Any = field(default=None, repr=False)

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


@runtime_checkable
class RuntimeProtocol(Protocol):
    """What the contexts (:mod:`persia.ctx`), the DataLoader (:mod:`persia.data`) and the job
    runner use of one context's runtime, on any backend: :class:`Runtime` (the local backend)
    and the Ray backend's ``RayRuntime`` implement it.

    Attributes:
        store: the embedding store (a :class:`persia.store.ShardedStore`, or its facade over
            parameter-server actors): stats, clear, checkpoints, deltas.
        training_allowed: False while an evaluation context is entered (lookups create
            nothing).
        counts: int64 ``[applied, skipped_absent, skipped_nonfinite]`` over every batch applied.
        batches_applied: batches whose gradients were applied.
        spec: the embedding layer the runtime was built from (None: not known); checkpoints
            record it, so that they are served without the job's YAML files.
        read_only: True for inference-mode parameter servers (``job_type: Infer``): the
            contexts refuse whatever would change a row.
    """

    store: ShardedStore
    spec: EmbeddingSpec | None
    read_only: bool
    training_allowed: bool
    counts: np.ndarray
    batches_applied: int

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        ...

    def lookup(
        self, batch: PersiaBatch, training: bool, index: int, gate: StalenessGate | None
    ) -> TrainingBatch:
        """Looks ``batch`` up (the DataLoader's lookup thread)."""
        ...

    def submit(
        self, item: TrainingBatch, summed_grad: np.ndarray | None, raw_grads: dict[int, np.ndarray]
    ) -> None:
        """Queues one batch's embedding gradients for the applier thread."""
        ...

    def prefetch(self, batch: PersiaBatch) -> None:
        """A hint that ``batch`` trains soon (it waits for its staleness permit): a runtime with
        a disk tier brings its disk-resident rows into RAM meanwhile; others do nothing."""
        ...

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every submitted gradient has been applied."""
        ...

    def close(self) -> None:
        """Applies what is queued, stops the applier and releases the backend's roles."""
        ...

    @property
    def delta_interval_s(self) -> float | None:
        """How often incremental deltas must be flushed (None: no time trigger needed)."""
        ...

    def attach_delta_writer(self, writer: Any) -> None:
        """Tells the runtime which :class:`persia.store.delta.DeltaWriter` runs."""
        ...

    def recovery_report(self) -> dict[str, Any] | None:
        """What shard recovery did (None: no recovery)."""
        ...

    def push_metrics(self) -> None:
        """Has the roles this runtime runs in other processes (the Ray backend's actors) push
        their metrics now, and waits for them: the training context calls it when the job ends,
        beside this process's own last push (:mod:`persia.telemetry`)."""
        ...


class Runtime:
    """Store, worker and applier thread of one job in this process (a
    :class:`RuntimeProtocol`; the local backend's runtime, and the base of the Ray backend's).

    Args:
        worker: the embedding worker (over the parameter servers), or a backend's proxy of
            remote ones.
        store: the store (for dump/load/stats): in this process, or a facade of remote shards.
        backward_buffer_size: gradient batches that may wait for the applier.
        spec: the embedding layer the runtime was built from, if known.
    """

    read_only = False

    def __init__(
        self,
        worker: EmbeddingWorkerProtocol,
        store: ShardedStore,
        backward_buffer_size: int = 10,
        *,
        spec: EmbeddingSpec | None = None,
    ) -> None:
        self.worker = worker
        self.store = store
        self.spec = spec
        self.training_allowed = True
        self.backward_buffer_size = max(1, backward_buffer_size)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.backward_buffer_size)
        self._error: BaseException | None = None
        self._closed = False
        self._pending = 0
        self._cond = threading.Condition()
        self.counts = np.zeros(3, dtype=np.int64)  # applied, skipped_absent, skipped_nonfinite
        self.batches_applied = 0
        self._prefetching = False
        self._thread = threading.Thread(target=self._apply_loop, name="persia-apply", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- forward side
    def lookup(
        self, batch: PersiaBatch, training: bool, index: int, gate: StalenessGate | None
    ) -> TrainingBatch:
        self._raise_pending()
        result = self.worker.forward(batch, training)
        return TrainingBatch(batch, result, index, gate if training else None)

    def prefetch(self, batch: PersiaBatch) -> None:
        """Bring the disk-resident rows of a training batch waiting for its staleness permit
        into RAM on a background thread (a hint; nothing when the store has no disk tier, when
        a prefetch is still running, or when the tier's recent reads were page-cache hits: then
        the lookup reads the rows as fast, and a prefetch would only redo its probing on a core
        the lookup needs). Its lookup then finds them in RAM."""
        if self.store.disk_tier is None or self._closed:
            return
        if not self.store.disk_reads_wait():
            return
        if not isinstance(self.worker, EmbeddingWorker):  # a remote worker: no disk tier here
            return
        keys_of = self.worker.batch_keys
        with self._cond:
            if self._prefetching:
                return
            self._prefetching = True

        def run() -> None:
            try:
                for dim, keys in keys_of(batch).items():
                    self.store.prefetch(keys, dim)
            except Exception:  # a hint: the lookup itself reports what is wrong
                pass
            finally:
                with self._cond:
                    self._prefetching = False

        threading.Thread(target=run, name="persia-prefetch", daemon=True).start()

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
                    rec = telemetry.current()
                    t0 = time.perf_counter() if rec.on else 0.0
                    if item.grads_ready is not None:
                        item.grads_ready()
                    counts = self.worker.backward(item.lookup, summed_grad, raw_grads)
                    if rec.on:
                        rec.backward_client(time.perf_counter() - t0)
                    self.counts += counts
                    self.batches_applied += 1
            except BaseException as exc:  # surfaced in the NN worker's thread
                self._error = exc
            finally:
                if item.grads_done is not None:
                    item.grads_done()
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

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    # ------------------------------------------------- extensions (none in this backend)
    @property
    def delta_interval_s(self) -> float | None:
        """How often incremental deltas must be flushed: None, no time trigger needed here."""
        return None

    def attach_delta_writer(self, writer: Any) -> None:
        """Nothing here reads the deltas as they are written."""

    def recovery_report(self) -> dict[str, Any] | None:
        """None: this backend has no shard recovery."""
        return None

    def push_metrics(self) -> None:
        """Nothing to do: every role of this runtime is in this process, whose own push
        reports them."""

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=10)
