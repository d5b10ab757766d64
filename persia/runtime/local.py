"""The embedded (local) backend: every role in this process.

:func:`build_runtime` builds one context's store shards, embedding worker and applier thread;
:func:`run_job` runs a job's training loop right here. Streams between processes need the
cluster backend. The functions are those of :class:`persia.runtime.registry.Backend`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from persia import telemetry
from persia.embedding import EmbeddingConfig
from persia.embedding.config import EmbeddingFileConfig, GlobalConfig, load_spec
from persia.embedding.optim import EmbeddingOptimizer
from persia.embedding.spec import EmbeddingSpec
from persia.errors import BackendError, ConfigError
from persia.rpc.local import local_parameter_servers
from persia.runtime.pipeline import Runtime
from persia.store.build import build_store
from persia.worker.embedding_worker import EmbeddingWorker

__all__ = [
    "build_local_runtime",
    "build_runtime",
    "receive_batches",
    "run_job",
    "runtime_from_spec",
    "stream_sender",
]


def runtime_from_spec(spec: EmbeddingSpec, backward_buffer_size: int = 10) -> Runtime:
    """One job's store, worker and applier thread, all in this process.

    The store has ``spec.shards`` shards holding ``spec.capacity`` rows in all.
    """
    store = build_store(spec)
    # the shards' rows, evictions, misses, ... are read when the metrics are collected
    telemetry.watch_shards(store, lambda st: [(i, s.stats()) for i, s in enumerate(st.shards)])
    worker = EmbeddingWorker.from_spec(spec, local_parameter_servers(store))
    return Runtime(worker, store, backward_buffer_size=backward_buffer_size, spec=spec)


def build_local_runtime(
    embedding_config: EmbeddingConfig,
    optimizer: EmbeddingOptimizer | None,
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None = None,
    global_config_file: str | os.PathLike | GlobalConfig | None = None,
    backward_buffer_size: int = 10,
) -> Runtime:
    """:func:`runtime_from_spec` of what a PERSIA script gives (the YAML files as paths, parsed
    objects or None for the PERSIA environment variables, the rows' hyperparameters and the
    embedding optimizer): :func:`persia.embedding.config.load_spec`."""
    spec = load_spec(embedding_config_file, global_config_file, embedding_config, optimizer)
    return runtime_from_spec(spec, backward_buffer_size)


def build_runtime(
    embedding_config: EmbeddingConfig,
    optimizer: EmbeddingOptimizer | None,
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None = None,
    global_config_file: str | os.PathLike | GlobalConfig | None = None,
    backward_buffer_size: int = 10,
    cluster: Any = None,
) -> Runtime:
    """:func:`build_local_runtime` as the registry calls it (``cluster`` must be None)."""
    if cluster is not None:
        raise ConfigError("cluster settings need the 'ray' backend, got 'local'")
    return build_local_runtime(
        embedding_config,
        optimizer,
        embedding_config_file,
        global_config_file,
        backward_buffer_size=backward_buffer_size,
    )


def run_job(train_fn: Callable[..., dict[str, Any]], job: Any, **options: Any) -> dict[str, Any]:
    """Runs the job's training loop in this process."""
    if options.get("cluster") is not None:
        raise ConfigError("cluster settings need training.backend 'ray', got 'local'")
    return train_fn(job, **options)


_NO_STREAMS = (
    "data-loader streams between processes need the cluster backend (backend='ray' or "
    "RAY_ADDRESS); in one process, subclass IterableDataset and yield PersiaBatch objects"
)


def stream_sender(**options: Any) -> Any:
    """Refused: the embedded backend has no other process to send to."""
    raise BackendError(_NO_STREAMS, role="data-loader")


def receive_batches(channel: str | None, timeout_s: float) -> Iterator[Any]:
    """Refused: the embedded backend has no other process to receive from."""
    raise BackendError(_NO_STREAMS, role="data-loader")
