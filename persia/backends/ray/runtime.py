"""The NN worker's runtime on the cluster backend: the embedded pipeline over remote shards.

:func:`ray_runtime_from_spec` is :func:`persia.runtime.local.runtime_from_spec` with the store
replaced by parameter-server actors (:mod:`persia.backends.ray.backend`): the same embedding
worker, lookup thread, applier thread and staleness gate run in this process, so the staleness
bound holds per NN worker across the network and is measured the same way.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from persia import _settings
from persia.backends.ray.backend import (
    ClusterConfig,
    RayStore,
    attach_parameter_servers,
    init_ray,
    new_job_id,
    parameter_server_client,
    start_parameter_servers,
)
from persia.backends.ray.recovery import (
    RecoverableRayStore,
    ShardRecovery,
    recoverable_parameter_servers,
    recovery_settings,
)
from persia.embedding import EmbeddingConfig
from persia.embedding.config import EmbeddingFileConfig, GlobalConfig, load_spec
from persia.embedding.optim import EmbeddingOptimizer
from persia.embedding.spec import EmbeddingSpec
from persia.rpc.base import ParameterServerClient
from persia.runtime.pipeline import Runtime
from persia.store.build import shard_options, store_options
from persia.worker.embedding_worker import EmbeddingWorker
from persia.worker.protocol import EmbeddingWorkerProtocol

if TYPE_CHECKING:
    from persia.backends.ray.embedding_workers import RemoteEmbeddingWorker

__all__ = ["RayRuntime", "ray_runtime_from_spec", "build_ray_runtime"]


class RayRuntime(Runtime):
    """A :class:`Runtime` whose store is a set of parameter-server actors; closing it closes
    the data channel and the embedding worker and stops the actors it started.

    Args:
        worker: the embedding worker (in this process, or the embedding-worker actors' proxy).
        store: the facade of the parameter-server actors.
        servers: this process's client of the parameter servers (its transport is closed with
            the runtime).
        backward_buffer_size: gradient batches that may wait for the applier.
        recovery: with ``ClusterConfig(recover=...)``, the
            :class:`persia.backends.ray.recovery.ShardRecovery` that restores dead shards (the
            store is then its :class:`~persia.backends.ray.recovery.RecoverableRayStore` and
            ``servers`` its recovering channel); the training context flushes its incremental
            deltas every :attr:`delta_interval_s` and hands its writer to
            :meth:`attach_delta_writer`.
    """

    store: RayStore

    def __init__(
        self,
        worker: EmbeddingWorkerProtocol,
        store: RayStore,
        servers: ParameterServerClient,
        backward_buffer_size: int = 10,
        recovery: ShardRecovery | None = None,
        *,
        spec: EmbeddingSpec | None = None,
    ) -> None:
        super().__init__(worker, store, backward_buffer_size=backward_buffer_size, spec=spec)
        self.servers = servers
        self.recovery = recovery

    @property
    def delta_interval_s(self) -> float | None:
        """How often incremental deltas must be flushed (None: no time trigger needed)."""
        return None if self.recovery is None else self.recovery.flush_interval_s

    def attach_delta_writer(self, writer: Any) -> None:
        """Tells the recovery (if any) which :class:`persia.store.delta.DeltaWriter` runs."""
        if self.recovery is not None:
            self.recovery.attach_writer(writer)

    def recovery_report(self) -> dict[str, Any] | None:
        """The recovery's :meth:`~persia.backends.ray.recovery.ShardRecovery.report` (None:
        recovery is off)."""
        return None if self.recovery is None else self.recovery.report()

    def push_metrics(self) -> None:
        """Has the parameter-server actors, and the embedding-worker actors if any, push their
        metrics now (each its own group; a no-op unless this process pushes)."""
        if self.closed:
            return
        from persia.backends.ray.embedding_workers import RemoteEmbeddingWorker

        self.store.push_metrics()
        if isinstance(self.worker, RemoteEmbeddingWorker):
            self.worker.push_metrics()

    def close(self) -> None:
        try:
            super().close()
        finally:
            try:
                try:
                    self.servers.transport.close()
                finally:
                    self.worker.close()
            finally:
                self.store.close()


def ray_runtime_from_spec(
    spec: EmbeddingSpec,
    cluster: ClusterConfig | None = None,
    backward_buffer_size: int = 10,
) -> RayRuntime:
    """Starts the parameter-server actors of one job and a runtime over them.

    ``cluster.num_ps`` shards (default: ``spec.shards``) hold ``spec.capacity`` rows in all, as
    in the embedded backend; a local Ray cluster is started unless one is named.
    """
    if cluster is None:  # a process of persia-launcher nn-worker joins its job's servers
        from persia.backends.ray.launch import cluster_from_env

        cluster = cluster_from_env() or ClusterConfig()
    num_ps = cluster.num_ps if cluster.num_ps is not None else spec.shards
    store_kwargs = store_options(spec)
    shard_kwargs = shard_options(spec, num_ps)
    recover = recovery_settings(cluster, spec)  # checked before anything starts
    if cluster.attach_ps:
        init_ray(cluster.address, cluster.num_cpus)
    else:  # the actors started here must fit the cluster (or fail now)
        from persia.backends.ray.planning import check_runtime_fits, job_asks, local_cluster_cpus

        asks = job_asks(cluster, num_ps, nn_actors=False, loaders=False)
        init_ray(cluster.address, local_cluster_cpus(cluster, asks))
        check_runtime_fits(cluster, num_ps)
    timeout_s = cluster.resolved_timeout_s()
    job_name = cluster.job_name or new_job_id()
    if cluster.attach_ps:
        actors = attach_parameter_servers(str(cluster.job_name), num_ps, timeout_s, spec)
    else:
        actors = start_parameter_servers(num_ps, shard_kwargs, cluster, job_name)
    store: RayStore
    client: ParameterServerClient
    if recover is not None:  # the recovering store and data channel, composed here
        store, client = recoverable_parameter_servers(
            actors,
            {**store_kwargs, "adopt_optimizer": spec.optimizer is None},
            shard_kwargs,
            cluster,
            recover,
            spec.incremental_dir,
            timeout_s,
            owned=not cluster.attach_ps,
        )
    else:
        store = RayStore(
            actors,
            {**store_kwargs, "adopt_optimizer": spec.optimizer is None},
            timeout_s,
            owned=not cluster.attach_ps,
        )
        try:
            client = parameter_server_client(actors, cluster, timeout_s)
        except BaseException:
            store.close()
            raise
    worker: EmbeddingWorkerProtocol
    if cluster.num_embedding_workers > 0:
        try:
            worker = _remote_embedding_worker(
                cluster, job_name, list(spec.slots), spec.feature_index_prefix_bit, actors, client
            )
        except BaseException:
            client.transport.close()
            store.close()
            raise
    else:
        worker = EmbeddingWorker.from_spec(spec, client)
    recovery = store.recovery if isinstance(store, RecoverableRayStore) else None
    return RayRuntime(
        worker,
        store,
        client,
        backward_buffer_size=backward_buffer_size,
        recovery=recovery,
        spec=spec,
    )


def build_ray_runtime(
    embedding_config: EmbeddingConfig,
    optimizer: EmbeddingOptimizer | None,
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None = None,
    global_config_file: str | os.PathLike | GlobalConfig | None = None,
    backward_buffer_size: int = 10,
    cluster: ClusterConfig | None = None,
) -> RayRuntime:
    """:func:`ray_runtime_from_spec` of what a PERSIA script gives (the YAML files as paths,
    parsed objects or None for the PERSIA environment variables, the rows' hyperparameters and
    the embedding optimizer): :func:`persia.embedding.config.load_spec`.

    An NN worker that attaches to the job's launched parameter servers (``persia-launcher
    nn-worker``) and is given no embedding configuration (neither ``embedding_config_file`` nor
    ``PERSIA_EMBEDDING_CONFIG``) uses the files the servers were started with
    (:func:`persia.backends.ray.launch.job_configs`): the global one too, unless it has its own.
    """
    if cluster is None:  # a process of persia-launcher nn-worker joins its job's servers
        from persia.backends.ray.launch import cluster_from_env

        cluster = cluster_from_env()
    if (
        cluster is not None
        and cluster.attach_ps
        and embedding_config_file is None
        and _settings.env_path(_settings.PERSIA_EMBEDDING_CONFIG) is None
    ):
        from persia.backends.ray.launch import job_configs

        embedding_file, global_file = job_configs(cluster)
        embedding_config_file = embedding_file
        if (
            global_config_file is None
            and _settings.env_path(_settings.PERSIA_GLOBAL_CONFIG) is None
        ):
            global_config_file = global_file
    spec = load_spec(embedding_config_file, global_config_file, embedding_config, optimizer)
    return ray_runtime_from_spec(spec, cluster, backward_buffer_size)


def _remote_embedding_worker(
    cluster: ClusterConfig,
    job_name: str,
    slots: list[Any],
    prefix_bits: int,
    ps_actors: list[Any],
    client: ParameterServerClient,
) -> RemoteEmbeddingWorker:
    """The proxy of ``cluster.num_embedding_workers`` embedding-worker actors: started here
    (and stopped with the runtime), or, for an NN worker attaching to its job's servers, the
    ones its driver started."""
    from persia.backends.ray.embedding_workers import (
        RemoteEmbeddingWorker,
        attach_embedding_workers,
        start_embedding_workers,
    )

    timeout_s = cluster.resolved_timeout_s()
    n = cluster.num_embedding_workers
    if cluster.attach_ps:
        actors = attach_embedding_workers(job_name, n, timeout_s)
        return RemoteEmbeddingWorker(actors, client, timeout_s, owned=False)
    actors = start_embedding_workers(n, slots, prefix_bits, ps_actors, cluster, job_name)
    try:
        return RemoteEmbeddingWorker(actors, client, timeout_s, owned=True)
    except BaseException:
        from persia.backends.ray.embedding_workers import stop_embedding_workers

        stop_embedding_workers(actors)
        raise
