"""The embedded (local) backend: every role in this process.

:func:`build_runtime` builds one context's store shards, embedding worker and applier thread;
:func:`run_job` runs a job's training loop right here. Streams between processes need the
cluster backend. The functions are those of :class:`persia.runtime.registry.Backend`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from persia.embedding import EmbeddingConfig
from persia.embedding.config import (
    EmbeddingFileConfig,
    GlobalConfig,
    load_embedding_config,
    load_global_config,
)
from persia.embedding.optim import SGD, EmbeddingOptimizer
from persia.errors import BackendError, ConfigError
from persia.rpc.local import local_parameter_servers
from persia.runtime.pipeline import Runtime
from persia.store import ShardedStore
from persia.store.config import Admission, Uniform
from persia.utils import embedding_seed
from persia.worker.embedding_worker import EmbeddingWorker, SlotSpec


def slot_specs(config: EmbeddingFileConfig) -> list[SlotSpec]:
    """The worker's view of every slot of ``embedding_config.yml``."""
    return [
        SlotSpec(
            name=s.name,
            dim=s.dim,
            pooling=s.pooling,
            prefix=s.prefix,
            sample_fixed_size=s.sample_fixed_size,
            hash_stack_rounds=s.hash_stack_config.hash_stack_rounds,
            hash_stack_size=s.hash_stack_config.embedding_size,
        )
        for s in config.slots
    ]


def resolve_configs(
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None,
    global_config_file: str | os.PathLike | GlobalConfig | None,
) -> tuple[EmbeddingFileConfig, GlobalConfig]:
    """The parsed ``embedding_config.yml`` and ``global_config.yml`` (paths, parsed objects, or
    None for the PERSIA environment variables / defaults)."""
    emb = (
        embedding_config_file
        if isinstance(embedding_config_file, EmbeddingFileConfig)
        else load_embedding_config(embedding_config_file)
    )
    glob = (
        global_config_file
        if isinstance(global_config_file, GlobalConfig)
        else load_global_config(global_config_file)
    )
    return emb, glob


def store_options(
    embedding_config: EmbeddingConfig,
    optimizer: EmbeddingOptimizer | None,
    emb: EmbeddingFileConfig,
    glob: GlobalConfig,
) -> dict[str, Any]:
    """Keyword arguments of the job's store (``ShardedStore`` or a shard of it, any backend):
    capacity, optimizer (SGD placeholder when none: an evaluation store adopts a checkpoint's),
    init and admission from ``EmbeddingConfig``, the embedding seed, weight bound and dims."""
    low, high = embedding_config.emb_initialization
    return {
        "capacity": glob.embedding_parameter_server_config.capacity,
        "optimizer": optimizer if optimizer is not None else SGD(lr=0.01),
        "init": Uniform(float(low), float(high)),
        "admission": Admission(probability=float(embedding_config.admit_probability)),
        "seed": embedding_seed(),
        "weight_bound": float(embedding_config.weight_bound),
        "dims": sorted({s.dim for s in emb.slots}),
    }


def build_local_runtime(
    embedding_config: EmbeddingConfig,
    optimizer: EmbeddingOptimizer | None,
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None = None,
    global_config_file: str | os.PathLike | GlobalConfig | None = None,
    backward_buffer_size: int = 10,
) -> Runtime:
    """One job's store, worker and applier thread, all in this process.

    The store has ``num_hashmap_internal_shards`` shards holding ``capacity`` rows in all
    (``embedding_parameter_server_config`` of ``global_config.yml``).
    """
    emb, glob = resolve_configs(embedding_config_file, global_config_file)
    store = ShardedStore(
        num_shards=glob.embedding_parameter_server_config.num_hashmap_internal_shards,
        adopt_optimizer=optimizer is None,
        **store_options(embedding_config, optimizer, emb, glob),
    )
    worker = EmbeddingWorker(
        slot_specs(emb), emb.feature_index_prefix_bit, local_parameter_servers(store)
    )
    return Runtime(worker, store, backward_buffer_size=backward_buffer_size)


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
