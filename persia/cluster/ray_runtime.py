"""The NN worker's runtime on the cluster backend: the embedded pipeline over remote shards.

:func:`build_ray_runtime` is :func:`persia.train.local.build_local_runtime` with the store
replaced by parameter-server actors (:mod:`persia.cluster.ray_backend`): the same embedding
worker, lookup thread, applier thread and staleness gate run in this process, so the staleness
bound holds per NN worker across the network and is measured the same way.
"""

from __future__ import annotations

import os
from typing import Any

from persia.cluster.ray_backend import (
    ClusterConfig,
    RayStore,
    init_ray,
    new_job_id,
    parameter_server_client,
    start_parameter_servers,
)
from persia.config import (
    EmbeddingFileConfig,
    GlobalConfig,
    load_embedding_config,
    load_global_config,
)
from persia.embedding import EmbeddingConfig
from persia.embedding.optim import SGD, EmbeddingOptimizer
from persia.store.config import Admission, Uniform
from persia.train.local import slot_specs
from persia.train.pipeline import Runtime
from persia.utils import embedding_seed
from persia.worker.embedding_worker import EmbeddingWorker

__all__ = ["RayRuntime", "build_ray_runtime"]


class RayRuntime(Runtime):
    """A :class:`Runtime` whose store is a set of parameter-server actors; closing it stops
    the actors it started and the data channel.

    With ``ClusterConfig(recover=...)``, ``recovery`` is the
    :class:`persia.cluster.ray_recovery.ShardRecovery` that restores dead shards; the training
    context flushes its incremental deltas every :attr:`delta_interval_s` and hands its writer to
    :meth:`attach_delta_writer`.
    """

    recovery: Any = None

    @property
    def delta_interval_s(self) -> float | None:
        """How often incremental deltas must be flushed (None: no time trigger needed)."""
        return None if self.recovery is None else self.recovery.flush_interval_s

    def attach_delta_writer(self, writer: Any) -> None:
        """Tells the recovery (if any) which :class:`persia.store.delta.DeltaWriter` runs."""
        if self.recovery is not None:
            self.recovery.attach_writer(writer)

    def close(self) -> None:
        try:
            super().close()
        finally:
            try:
                self.worker.servers.transport.close()
            finally:
                if isinstance(self.store, RayStore):
                    self.store.close()


def build_ray_runtime(
    embedding_config: EmbeddingConfig,
    optimizer: EmbeddingOptimizer | None,
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None = None,
    global_config_file: str | os.PathLike | GlobalConfig | None = None,
    backward_buffer_size: int = 10,
    cluster: ClusterConfig | None = None,
) -> RayRuntime:
    """Starts the parameter-server actors of one job and a runtime over them.

    ``cluster.num_ps`` shards (default: ``num_hashmap_internal_shards``) hold ``capacity`` rows
    in all, as in the embedded backend; a local Ray cluster is started unless one is named.
    """
    if cluster is None:  # a process of persia-launcher nn-worker joins its job's servers
        from persia.cluster.ray_launch import cluster_from_env

        cluster = cluster_from_env() or ClusterConfig()
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
    ps = glob.embedding_parameter_server_config
    num_ps = cluster.num_ps if cluster.num_ps is not None else ps.num_hashmap_internal_shards
    low, high = embedding_config.emb_initialization
    store_kwargs: dict[str, Any] = {
        "capacity": ps.capacity,
        "optimizer": optimizer if optimizer is not None else SGD(lr=0.01),
        "init": Uniform(float(low), float(high)),
        "admission": Admission(probability=float(embedding_config.admit_probability)),
        "seed": embedding_seed(),
        "weight_bound": float(embedding_config.weight_bound),
        "dims": sorted({s.dim for s in emb.slots}),
    }
    shard_kwargs = dict(store_kwargs)
    shard_kwargs["capacity"] = -(-ps.capacity // num_ps)  # as ShardedStore splits it
    init_ray(cluster.address, cluster.num_cpus)
    timeout_s = cluster.resolved_timeout_s()
    if cluster.attach_ps:
        from persia.cluster.ray_ddp import attach_parameter_servers

        actors = attach_parameter_servers(
            str(cluster.job_name), num_ps, timeout_s, shard_kwargs, ps.capacity
        )
    else:
        actors = start_parameter_servers(
            num_ps, shard_kwargs, cluster, cluster.job_name or new_job_id()
        )
    store = RayStore(
        actors,
        {**store_kwargs, "adopt_optimizer": optimizer is None},
        timeout_s,
        owned=not cluster.attach_ps,
    )
    try:
        client = parameter_server_client(actors, cluster, timeout_s)
    except BaseException:
        store.close()
        raise
    worker = EmbeddingWorker(slot_specs(emb), emb.feature_index_prefix_bit, client)
    runtime = RayRuntime(worker, store, backward_buffer_size=backward_buffer_size)
    if cluster.recover:
        from persia.cluster.ray_recovery import enable_recovery

        try:
            enable_recovery(runtime, cluster, glob, shard_kwargs)
        except BaseException:
            runtime.close()
            raise
    return runtime
