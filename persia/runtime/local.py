"""Builds the embedded backend's runtime: store shards, embedding worker, applier thread."""

from __future__ import annotations

import os

from persia.embedding import EmbeddingConfig
from persia.embedding.config import EmbeddingFileConfig, GlobalConfig, load_spec
from persia.embedding.optim import EmbeddingOptimizer
from persia.embedding.spec import EmbeddingSpec
from persia.rpc.local import local_parameter_servers
from persia.runtime.pipeline import Runtime
from persia.store.build import build_store
from persia.worker.embedding_worker import EmbeddingWorker

__all__ = ["runtime_from_spec", "build_local_runtime"]


def runtime_from_spec(spec: EmbeddingSpec, backward_buffer_size: int = 10) -> Runtime:
    """One job's store, worker and applier thread, all in this process.

    The store has ``spec.shards`` shards holding ``spec.capacity`` rows in all.
    """
    store = build_store(spec)
    worker = EmbeddingWorker.from_spec(spec, local_parameter_servers(store))
    return Runtime(worker, store, backward_buffer_size=backward_buffer_size)


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
