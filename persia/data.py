"""PERSIA's data API: datasets and the DataLoader that runs the embedding pipeline ahead.

``DataLoader(dataset, embedding_staleness=k)`` iterates the user's dataset on a background thread,
takes a staleness permit for each training batch, looks its embeddings up (de-duplication,
routing, gather, pooling: :class:`persia.worker.embedding_worker.EmbeddingWorker`) and queues the
result, so the lookups of the next batches overlap the dense compute of the current one. The
permit comes back when the batch's embedding gradients have been applied (see
:mod:`persia.runtime.staleness`).

Must be created inside a context (``with TrainCtx(...)`` or ``with eval_ctx(...)``), as in PERSIA.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from persia import telemetry
from persia.embedding.data import PersiaBatch
from persia.errors import BackendError, BatchError, PersiaError
from persia.logger import get_default_logger
from persia.runtime import registry
from persia.runtime.staleness import StalenessGate, StalenessReport

if TYPE_CHECKING:
    from persia.runtime.pipeline import TrainingBatch

__all__ = ["IterableDatasetBase", "IterableDataset", "StreamingDataset", "DataLoader"]

_logger = get_default_logger()
_POLL_S = 0.05
_DONE = object()


def _is_batch(item: Any) -> bool:
    """Whether a queued item is a looked-up batch (not the end, an error or nothing)."""
    return item is not None and item is not _DONE and not isinstance(item, BaseException)


class IterableDatasetBase:
    """PERSIA's base of every dataset a :class:`DataLoader` takes: ``__iter__`` yields
    :class:`PersiaBatch` objects.

    PERSIA's subclasses also defined ``consume_dataset`` (feeding its Rust channel); persia's
    DataLoader iterates the dataset itself on its lookup thread, so a subclass needs only
    ``__iter__`` (a ``consume_dataset`` it defines is never called).

    Args:
        buffer_size: how many batches the reader may produce ahead of the lookups.
    """

    def __init__(self, buffer_size: int = 10) -> None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise PersiaError(f"buffer_size must be an int >= 1, got {buffer_size!r}")
        self.buffer_size = buffer_size

    def __iter__(self) -> Iterator[PersiaBatch]:
        raise PersiaError(f"{type(self).__name__} must define __iter__ yielding PersiaBatch")


class IterableDataset(IterableDatasetBase):
    """A dataset whose ``__iter__`` yields :class:`PersiaBatch` objects (PERSIA's API).

    Args:
        buffer_size: how many batches the reader may produce ahead of the lookups.
    """


class StreamingDataset(IterableDataset):
    """Batches sent by data-loader processes with ``DataCtx().send_data(batch)`` (PERSIA's API).

    This needs the cluster backend (``backend="ray"`` or ``RAY_ADDRESS`` set), which runs data
    loaders in other processes: the batches of every loader of the stream are received until
    each has finished (see :mod:`persia.backends.ray.stream`); the embedded backend has no other
    process to receive from.

    Args:
        buffer_size: see :class:`IterableDataset`.
        channel: the stream's name (default ``$PERSIA_STREAM_CHANNEL``, else ``default``).
        timeout_s: the longest wait for a data loader to appear or to send a batch.
    """

    def __init__(
        self, buffer_size: int = 10, channel: str | None = None, timeout_s: float = 600.0
    ) -> None:
        super().__init__(buffer_size)
        self.channel = channel
        self.timeout_s = timeout_s

    def __iter__(self) -> Iterator[PersiaBatch]:

        from persia import _settings
        from persia.ctx import cnt_ctx

        ctx = cnt_ctx()
        if getattr(ctx, "backend", None) == "ray" or _settings.ray_address():
            yield from registry.backend("ray").receive_batches(self.channel, self.timeout_s)
            return
        raise BackendError(
            "StreamingDataset receives batches from data-loader processes and needs the cluster "
            "backend; in one process, subclass IterableDataset and yield PersiaBatch objects"
        )


class DataLoader:
    """Iterates a dataset with the embedding lookups of upcoming batches running ahead.

    Args:
        dataset: an :class:`IterableDataset` (or any iterable of :class:`PersiaBatch`).
        forward_buffer_size: how many looked-up batches may wait for the NN worker.
        timeout_ms: how long the NN worker waits for the next batch before an error.
        num_workers: PERSIA's lookup-thread count. persia starts one lookup thread (the de-
            duplication and gather kernels are memory-bound and the dense compute needs the
            other cores), so values above 1 only cap, never add threads.
        reproducible: keep the dataset's batch order (always true here: one lookup thread);
            with ``embedding_staleness=1`` runs are bit-identical.
        embedding_staleness: k, the most training batches between their lookup and the
            application of their gradients; 1 is synchronous. None: bounded by
            ``forward_buffer_size``.
    """

    def __init__(
        self,
        dataset: Any,
        forward_buffer_size: int = 10,
        timeout_ms: int = 1000 * 60 * 10,
        num_workers: int = 10,
        reproducible: bool = False,
        embedding_staleness: int | None = None,
    ) -> None:
        from persia.ctx import cnt_ctx

        problems = []
        for name, value in (
            ("forward_buffer_size", forward_buffer_size),
            ("timeout_ms", timeout_ms),
            ("num_workers", num_workers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an int >= 1, got {value!r}")
        if embedding_staleness is not None and (
            isinstance(embedding_staleness, bool)
            or not isinstance(embedding_staleness, int)
            or embedding_staleness < 1
        ):
            problems.append(
                f"embedding_staleness must be None or an int >= 1 (1 = synchronous), "
                f"got {embedding_staleness!r}"
            )
        if problems:
            raise PersiaError("DataLoader: " + "; ".join(problems))
        ctx = cnt_ctx()
        if ctx is None:
            raise PersiaError(
                "DataLoader must be created inside a persia context "
                "(`with TrainCtx(...) as ctx:` or `with eval_ctx(...)`)"
            )
        self.dataset = dataset
        self.forward_buffer_size = forward_buffer_size
        self.timeout_ms = timeout_ms
        self.num_workers = min(num_workers, 1)
        self.reproducible = reproducible
        self.embedding_staleness = embedding_staleness
        if ctx._runtime is None:
            raise PersiaError("the current context has no embedding runtime (enter it first)")
        self._runtime = ctx._runtime
        self._ctx = ctx
        self.gate = StalenessGate(embedding_staleness or forward_buffer_size)
        self._active: _Run | None = None

    def __iter__(self) -> Iterator[TrainingBatch]:
        if self._active is not None:
            self._active.close()
        run = _Run(self)
        self._active = run
        try:
            yield from run
        finally:
            run.close()
            if self._active is run:
                self._active = None

    def staleness_report(self) -> StalenessReport:
        """Staleness measured over every training batch this loader produced so far."""
        return self.gate.report()


class _Run:
    """One pass over the dataset: a lookup thread feeding a bounded queue."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.runtime = loader._runtime
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=loader.forward_buffer_size)
        self.stop = threading.Event()
        self.previous: TrainingBatch | None = None
        # a CUDA NN worker copies the next batch to the device while the current one computes:
        # the batch taken from the queue ahead of its turn (or the end / an error)
        ctx = loader._ctx
        has = getattr(ctx, "_transfer", None) is not None
        self.stage: Any = ctx._stage_ahead if has else None  # type: ignore[attr-defined]
        self.ahead: Any = None
        self.thread = threading.Thread(target=self._produce, name="persia-lookup", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        index = 0
        try:
            batches = iter(self.loader.dataset)
            while True:
                rec = telemetry.current()
                t0 = time.perf_counter() if rec.on else 0.0
                batch = next(batches, _DONE)
                if batch is _DONE:
                    break
                if self.stop.is_set():
                    return
                if not isinstance(batch, PersiaBatch):
                    raise BatchError(
                        f"the dataset must yield PersiaBatch objects, got {type(batch).__name__} "
                        f"(batch {index})"
                    )
                if rec.on:
                    rec.loader_batch(batch.batch_size, time.perf_counter() - t0)
                training = batch.requires_grad and self.runtime.training_allowed
                staleness = None
                if training:
                    # disk rows into RAM while the permit is awaited (a disk tier only)
                    self.runtime.prefetch(batch)
                    staleness = self.loader.gate.acquire(self.stop)
                    if staleness is None:
                        return
                try:
                    t1 = time.perf_counter() if rec.on else 0.0
                    item = self.runtime.lookup(batch, training, index, self.loader.gate)
                    if rec.on:
                        rec.forward_client(time.perf_counter() - t1)
                except BaseException:
                    if training:
                        self.loader.gate.release()
                    raise
                item.staleness = staleness
                if not self._put(item):
                    item.discard()
                    return
                if rec.on:
                    rec.pending_batches(self.queue.qsize())
                index += 1
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[TrainingBatch]:
        timeout_s = self.loader.timeout_ms / 1000.0
        while True:
            if self.previous is not None:
                # The NN worker asks for the next batch: one that got no backward never will,
                # and must return its staleness permit or the next lookup could wait forever.
                self.previous.discard()
                self.previous = None
            item, self.ahead = self.ahead, None
            if item is None:
                try:
                    item = self.queue.get(timeout=timeout_s)
                except queue.Empty:
                    raise BackendError(
                        f"no batch within timeout_ms={self.loader.timeout_ms}", role="data-loader"
                    ) from None
            if item is _DONE:
                self.runtime.flush()
                return
            if isinstance(item, BaseException):
                raise item
            if self.stage is not None:
                self.stage(item)  # a no-op when it was staged ahead
                try:  # the next batch, if already looked up: its copy overlaps this step
                    self.ahead = self.queue.get_nowait()
                except queue.Empty:
                    pass
                if _is_batch(self.ahead):
                    self.stage(self.ahead)
            self.previous = item
            yield item

    def close(self) -> None:
        self.stop.set()
        if self.previous is not None:  # left the loop before its backward: none will come
            self.previous.discard()
            self.previous = None
        ahead, self.ahead = self.ahead, None
        if _is_batch(ahead):
            ahead.discard()
        self._drain()  # a producer blocked on a full queue can now see the stop
        self.thread.join(timeout=5.0)
        if self.thread.is_alive():
            _logger.warning("persia lookup thread did not stop within 5 s")
        self._drain()  # anything put between the first drain and the join

    def _drain(self) -> None:
        """Discards what was looked up but never consumed, so its permits come back."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if hasattr(item, "discard"):
                item.discard()
