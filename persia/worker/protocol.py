"""What the runtime needs of an embedding worker, declared once.

Two classes implement :class:`EmbeddingWorkerProtocol`: :class:`persia.worker.EmbeddingWorker`
(the worker in the NN-worker process, over a :class:`persia.rpc.base.ParameterServerClient`) and
the Ray backend's ``RemoteEmbeddingWorker`` (the proxy of embedding-worker actors). Their
``forward`` results (:class:`persia.worker.embedding_worker.Lookup`, ``RemoteLookup``) both have
the fields of :class:`LookupResult`, which the training context reads; ``backward`` takes back the
result of the same worker's ``forward``. ``tests/runtime/test_protocols.py`` checks the members
and signatures with :mod:`inspect`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from persia.embedding.data import PersiaBatch

__all__ = ["EmbeddingWorkerProtocol", "LookupResult"]


@runtime_checkable
class LookupResult(Protocol):
    """One batch's pooled embeddings (what :class:`persia.ctx.EmbeddingCtx` turns into tensors)."""

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        ...

    @property
    def summed(self) -> np.ndarray:
        """float32 ``(batch, total_summed_dim)``: every summed slot, side by side."""
        ...

    @property
    def raw(self) -> dict[int, np.ndarray]:
        """Per raw slot (by feature index), float32 ``(batch, sample_fixed_size, dim + 1)``."""
        ...

    @property
    def layout(self) -> list[tuple[str, int, int]]:
        """Per ID feature in batch order, ("sum", column, dim) or ("raw", feature_index, dim)."""
        ...

    @property
    def training(self) -> bool:
        """Whether the lookup created rows (and gradients are expected)."""
        ...

    @property
    def dropped_ids(self) -> int:
        """IDs beyond ``sample_fixed_size`` of raw slots."""
        ...


@runtime_checkable
class EmbeddingWorkerProtocol(Protocol):
    """An embedding worker: a batch's IDs to pooled embeddings, gradients back to the shards."""

    def forward(self, batch: PersiaBatch, training: bool) -> LookupResult:
        """Looks up and pools ``batch``'s ID features (a training lookup creates rows)."""
        ...

    def backward(
        self, lookup: Any, summed_grad: np.ndarray | None, raw_grads: dict[int, np.ndarray]
    ) -> np.ndarray:
        """Applies one batch's gradients (``lookup``: what this worker's :meth:`forward`
        returned); returns the counts ``[applied, skipped_absent, skipped_nonfinite]``."""
        ...

    def close(self) -> None:
        """Releases what the worker holds (connections, actors it started)."""
        ...
