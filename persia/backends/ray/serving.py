"""Inference-mode parameter servers on the Ray backend (``job_type: Infer``), as PERSIA runs
them: each parameter-server actor loads its rows of the embedding checkpoint
(``infer_config.embedding_checkpoint``) read-only and follows the training job's
``incremental_dir`` (and new generations of the checkpoint) on its own
(:class:`persia.checkpoint.follow.ServingShard`); the NN worker's embedding worker looks up
through them with evaluation lookups (unknown IDs read as zeros; training lookups and gradients
are refused by the servers).

Two ways to have them:

* started by the inference context itself (``InferCtx([], backend="ray")``, or an ``eval_ctx``
  with ``backend="ray"`` under ``job_type: Infer``): ``ClusterConfig.num_ps`` actors (default
  the spec's ``num_hashmap_internal_shards``), stopped with the runtime;
* started on their own by ``persia-launcher embedding-parameter-server`` with a
  ``global_config.yml`` of ``job_type: Infer`` (:func:`start_serving_parameter_server`): an
  ``InferCtx`` given PERSIA's embedding-worker services (a non-empty address list) attaches to
  the job's servers by name (``PERSIA_JOB_NAME``), as PERSIA's handler reaches its embedding
  workers.

Each server applies a delta when it completes, independently of the others: a request sees
whole deltas per parameter server (in one process, :class:`persia.checkpoint.follow.ServingRuntime`
makes it whole for the whole store).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from persia import _settings
from persia.backends.ray.backend import (
    PARAMETER_SERVER,
    ClusterConfig,
    ParameterServer,
    RayStore,
    attach_parameter_servers,
    get_with_timeout,
    init_ray,
    new_job_id,
    parameter_server_client,
)
from persia.backends.ray.naming import namespace, ps_actor_name
from persia.ctx._serving import infer_sources
from persia.embedding.data import PersiaBatch
from persia.embedding.spec import EmbeddingSpec, spec_from_dict, spec_to_dict
from persia.errors import BackendError, ConfigError, PersiaError
from persia.rpc.base import ParameterServerClient
from persia.runtime.pipeline import TrainingBatch
from persia.runtime.staleness import StalenessGate
from persia.worker.embedding_worker import EmbeddingWorker

__all__ = [
    "RayServingRuntime",
    "ServingParameterServer",
    "build_inference_runtime",
    "serving_options",
    "start_serving_parameter_server",
]


class ServingParameterServer(ParameterServer):
    """A parameter-server actor in inference mode: a read-only
    :class:`persia.checkpoint.follow.ServingShard` behind the usual actor methods (row changes,
    ``replace_rows`` and ``clear`` are refused).

    Args:
        rank, num_shards: which server of how many.
        serving: :func:`serving_options`.
        bind_host, port, security: the ZeroMQ data channel (see :class:`ParameterServer`).
        configs: the (EmbeddingFileConfig, GlobalConfig) it was started with, if any.
    """

    def __init__(
        self,
        rank: int,
        num_shards: int,
        serving: dict[str, Any],
        bind_host: str | None,
        *,
        port: int | None = None,
        configs: tuple[Any, Any] | None = None,
        security: str = "curve",
    ) -> None:
        from persia._settings import ensure_numba_cache_dir

        ensure_numba_cache_dir()
        from persia.checkpoint.follow import ServingShard

        spec = serving.get("spec")
        shard = ServingShard(
            serving["checkpoint_dir"],
            rank,
            num_shards,
            None if spec is None else spec_from_dict(spec),
            incremental_dir=serving.get("incremental_dir"),
            follow_checkpoint=bool(serving.get("follow_checkpoint")),
            poll_interval_s=float(serving.get("poll_interval_s", 1.0)),
        )
        super().__init__(rank, {}, bind_host, port=port, security=security, shard=shard)
        self.serving = shard
        self.replicas = num_shards
        self._configs = configs

    def _read_only(self, what: str) -> PersiaError:
        return PersiaError(
            f"parameter server {self.rank} is in inference mode (job_type: Infer): {what} is "
            "refused"
        )

    def replace_rows(
        self, parts: dict[int, dict[str, np.ndarray]], optimizer: dict[str, Any] | None = None
    ) -> None:
        raise self._read_only("replace_rows")

    def clear(self) -> None:
        raise self._read_only("clear")

    def freshness(self) -> dict[str, Any]:
        """This server's :meth:`persia.checkpoint.follow.ServingShard.freshness`."""
        return self.serving.freshness()

    def serving_spec(self) -> dict[str, Any]:
        """The embedding layer it serves (:func:`persia.embedding.spec.spec_to_dict`)."""
        return spec_to_dict(self.serving.spec)

    def replica_size(self) -> int:
        """The number of parameter servers of the job."""
        return self.replicas

    def job_configs(self) -> tuple[Any, Any] | None:
        """(EmbeddingFileConfig, GlobalConfig) this server was started with, or None."""
        return self._configs

    def close(self) -> None:
        self.serving.close()
        super().close()


def serving_options(
    global_config: Any,
    spec: EmbeddingSpec | None,
    *,
    embedding_checkpoint: str | os.PathLike | None = None,
    incremental_dir: str | os.PathLike | None = None,
    follow_checkpoint: bool | None = None,
    poll_interval_s: float = 1.0,
) -> dict[str, Any]:
    """What an inference-mode server needs, from PERSIA's ``global_config.yml``: the checkpoint
    (``infer_config.embedding_checkpoint``), the deltas (``incremental_dir`` when
    ``enable_incremental_update`` is on) and whether new generations are followed (default:
    while deltas are).

    Raises:
        ConfigError: no checkpoint named.
    """
    embedding_checkpoint, incremental_dir, follow_checkpoint = infer_sources(
        global_config, embedding_checkpoint, incremental_dir, follow_checkpoint
    )
    return {
        "checkpoint_dir": str(Path(embedding_checkpoint).resolve()),
        "spec": None if spec is None else spec_to_dict(spec),
        "incremental_dir": None if incremental_dir is None else str(incremental_dir),
        "follow_checkpoint": bool(follow_checkpoint),
        "poll_interval_s": float(poll_interval_s),
    }


def _actor_options(cluster: ClusterConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": cluster.ps_num_cpus, "max_restarts": 0}
    if cluster.ps_memory_bytes is not None:
        options["memory"] = cluster.ps_memory_bytes
    if cluster.ps_resources:
        options["resources"] = dict(cluster.ps_resources)
    # threads: Ray control calls beside the ZeroMQ thread and the delta follower
    options["max_concurrency"] = 4
    return options


def start_serving_parameter_servers(
    n: int, serving: dict[str, Any], cluster: ClusterConfig, job: str
) -> list[Any]:
    """Starts ``n`` inference-mode parameter-server actors and waits until each has loaded its
    rows and answers (or BackendError)."""
    import ray

    bind = None
    if cluster.transport == "zmq":
        from persia.backends.ray.backend import _bind_host

        bind = _bind_host(cluster)
    actor_cls: Any = ray.remote(ServingParameterServer)
    actors: list[Any] = [
        actor_cls.options(
            name=ps_actor_name(job, i), namespace=namespace(), **_actor_options(cluster)
        ).remote(i, n, serving, bind, security=cluster.channel_security)
        for i in range(n)
    ]
    timeout = cluster.resolved_timeout_s()
    try:
        for i, a in enumerate(actors):
            get_with_timeout(a.ping.remote(), timeout, PARAMETER_SERVER, i)
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    return actors


def start_serving_parameter_server(
    replica_index: int,
    replica_size: int,
    serving: dict[str, Any],
    bind_host: str,
    num_cpus: float,
    configs: tuple[Any, Any] | None = None,
    port: int | None = None,
) -> tuple[Any, str, str]:
    """Starts inference-mode parameter server ``replica_index`` of the job on its own
    (``persia-launcher embedding-parameter-server`` under ``job_type: Infer``) once
    :func:`persia.backends.ray.launch.connect` joined the cluster.

    Returns:
        (the actor, its name ``persia-<job>-ps-<i>``, the endpoint its data channel serves on).
    """
    import ray

    from persia.backends.ray.launch import job_name

    name = ps_actor_name(job_name(), replica_index)
    actor_cls: Any = ray.remote(ServingParameterServer)
    actor = actor_cls.options(
        name=name, namespace=namespace(), num_cpus=num_cpus, max_restarts=0, max_concurrency=4
    ).remote(
        replica_index,
        replica_size,
        serving,
        bind_host,
        port=port,
        configs=configs,
        security=_settings.channel_security(),
    )
    timeout_s = ClusterConfig().resolved_timeout_s()
    get_with_timeout(actor.ping.remote(), timeout_s, PARAMETER_SERVER, replica_index)
    endpoint = get_with_timeout(actor.endpoint.remote(), timeout_s, PARAMETER_SERVER, replica_index)
    return actor, name, str(endpoint)


class RayServingRuntime:
    """The NN worker's read-only runtime over inference-mode parameter-server actors (a
    :class:`persia.runtime.pipeline.RuntimeProtocol`): the embedding worker in this process,
    evaluation lookups through the actors; whatever would change a row is refused.

    Args:
        worker: the embedding worker over ``servers``.
        store: the facade of the actors (stats; its clear and loads are refused by them).
        servers: the client of the actors (closed with the runtime).
        spec: the embedding layer served.
        serving: the servers' :func:`serving_options` (None: attached, started elsewhere).
    """

    read_only = True

    def __init__(
        self,
        worker: EmbeddingWorker,
        store: RayStore,
        servers: ParameterServerClient,
        spec: EmbeddingSpec,
        serving: dict[str, Any] | None,
    ) -> None:
        self.worker = worker
        self._store = store
        self.servers = servers
        self.spec: EmbeddingSpec | None = spec
        self.serving = serving
        self.counts = np.zeros(3, dtype=np.int64)
        self.batches_applied = 0
        self._closed = False
        self._lock = threading.Lock()  # the worker reuses its de-duplication buffers

    @property
    def store(self) -> RayStore:
        """The facade of the parameter-server actors."""
        return self._store

    @store.setter
    def store(self, value: RayStore) -> None:
        raise PersiaError("the store of inference-mode parameter servers cannot be replaced")

    @property
    def training_allowed(self) -> bool:
        """Always False: the servers are read-only."""
        return False

    @training_allowed.setter
    def training_allowed(self, value: bool) -> None:
        if value:
            raise PersiaError("inference-mode parameter servers are read-only: no training")

    @property
    def closed(self) -> bool:
        return self._closed

    def lookup(
        self, batch: PersiaBatch, training: bool, index: int, gate: StalenessGate | None
    ) -> TrainingBatch:
        """An evaluation lookup through the servers (unknown IDs read as zeros)."""
        if training:
            raise PersiaError("inference-mode parameter servers are read-only: no training lookup")
        if self._closed:
            raise PersiaError("this inference runtime was closed")
        with self._lock:
            result = self.worker.forward(batch, False)
        return TrainingBatch(batch, result, index, None)

    def submit(
        self, item: TrainingBatch, summed_grad: np.ndarray | None, raw_grads: dict[int, np.ndarray]
    ) -> None:
        raise PersiaError("inference-mode parameter servers are read-only: gradients are refused")

    def flush(self, timeout_s: float | None = None) -> None:
        """Nothing is ever pending."""

    @property
    def delta_interval_s(self) -> float | None:
        return None

    def attach_delta_writer(self, writer: Any) -> None:
        raise PersiaError("inference-mode parameter servers write no deltas")

    def prefetch(self, batch: PersiaBatch) -> None:
        """Nothing: a serving runtime does not train."""

    def recovery_report(self) -> dict[str, Any] | None:
        return None

    def push_metrics(self) -> None:
        """Has the parameter-server actors push their metrics now."""
        if not self._closed:
            self._store.push_metrics()

    def freshness(self) -> dict[str, Any]:
        """Every server's freshness (``"shards"``, by rank) and the job's: the smallest
        ``last_delta_seq`` (every server has applied the deltas up to it), the largest
        ``age_s``, and the errors any server reports."""
        store = self._store
        refs = [a.freshness.remote() for a in store.actors]
        shards = [
            get_with_timeout(r, store.timeout_s, PARAMETER_SERVER, i) for i, r in enumerate(refs)
        ]
        ages = [s["age_s"] for s in shards if s["age_s"] is not None]
        errors = [f"server {s['rank']}: {s['last_error']}" for s in shards if s["last_error"]]
        return {
            "incremental_dir": shards[0]["incremental_dir"],
            "checkpoint": shards[0]["checkpoint"],
            "last_delta_seq": min(s["last_delta_seq"] for s in shards),
            "age_s": max(ages) if ages else None,
            "last_error": "; ".join(errors) or None,
            "shards": shards,
        }

    def close(self) -> None:
        """Closes the data channel and stops the servers this runtime started (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.servers.transport.close()
        finally:
            self._store.close()


def _join(cluster: ClusterConfig, timeout_s: float) -> None:
    """Joins the job's Ray cluster: ``cluster.address``, else ``RAY_ADDRESS``, else the head
    ``persia-launcher ray-head`` started on this machine (never a new cluster: the servers run
    in an existing one)."""
    import ray

    from persia import _settings

    if ray.is_initialized():
        return
    address = cluster.address or _settings.ray_address()
    if address is None:
        from persia.backends.ray.launch import role_ray_env

        env = role_ray_env(timeout_s)
        os.environ.update(env)  # a write: this process's Ray calls read them (via _settings)
        address = env[_settings.RAY_ADDRESS]
    init_ray(address)


def build_inference_runtime(
    embedding_config_file: Any,
    global_config: Any,
    embedding_config: Any = None,
    cluster: ClusterConfig | None = None,
    *,
    attach: bool | None = None,
    reuse: Any = None,
    **options: Any,
) -> RayServingRuntime:
    """The read-only runtime of inference-mode parameter servers on Ray (module doc).

    Args:
        embedding_config_file: PERSIA's ``embedding_config.yml`` (path, parsed, or None: the
            one the checkpoint records, or the attached servers').
        global_config: the parsed ``global_config.yml`` (``infer_config``, incremental updates).
        embedding_config: the rows' hyperparameters (unused: no row is created).
        cluster: the cluster settings (default: those of a ``persia-launcher`` process, else
            :class:`ClusterConfig` defaults).
        attach: attach to the job's running inference-mode servers by name (default: when the
            cluster says ``attach_ps``, as in a process of ``persia-launcher``) instead of
            starting them.
        reuse: a runtime to return instead, if it is one of these serving the same checkpoint
            (the servers outlive an ``eval_ctx``).
        options: ``embedding_checkpoint``, ``incremental_dir``, ``follow_checkpoint``,
            ``poll_interval_s`` (see :func:`serving_options`).

    Raises:
        ConfigError: no checkpoint named, a bad YAML file, or one that differs from training's.
        BackendError: the job's servers are not found, or not in inference mode.
        CheckpointError: a missing or corrupt checkpoint.
    """
    from persia.checkpoint.follow import serving_spec
    from persia.checkpoint.job import read_meta
    from persia.ctx._serving import given_spec
    from persia.store.build import store_options

    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            f"inference-mode parameter servers on Ray need the ray extra (pip install "
            f"persia[ray]): {exc}",
            PARAMETER_SERVER,
        ) from exc

    if cluster is None:
        from persia.backends.ray.launch import cluster_from_env

        cluster = cluster_from_env() or ClusterConfig()
    if attach is None:
        attach = cluster.attach_ps
    given = given_spec(embedding_config_file, global_config, embedding_config)
    timeout_s = cluster.resolved_timeout_s()
    serving: dict[str, Any] | None = None
    if attach:
        _join(cluster, timeout_s)
        job = str(cluster.job_name or "persia")
        actors = attach_parameter_servers(job, 1, timeout_s, None)
        if not all(hasattr(a, "serving_spec") for a in actors):
            raise BackendError(
                f"the parameter servers of job {job!r} are not in inference mode: start them "
                "with a global_config.yml of common_config.job_type: Infer",
                PARAMETER_SERVER,
            )
        recorded = spec_from_dict(
            get_with_timeout(actors[0].serving_spec.remote(), timeout_s, PARAMETER_SERVER, 0)
        )
        spec = recorded
        if given is not None:
            from persia.checkpoint.follow import layout_differences

            diff = layout_differences(given, recorded)
            if diff:
                raise ConfigError(
                    f"the embedding config given differs from the one job {job!r}'s servers "
                    "serve: " + "; ".join(diff)
                )
            spec = given
        owned = False
    else:
        serving = serving_options(global_config, given, **options)
        if (
            isinstance(reuse, RayServingRuntime)
            and not reuse.closed
            and reuse.serving is not None
            and reuse.serving["checkpoint_dir"] == serving["checkpoint_dir"]
        ):
            return reuse
        spec = serving_spec(read_meta(serving["checkpoint_dir"]), given)
        num_ps = cluster.num_ps if cluster.num_ps is not None else spec.shards
        from persia.backends.ray.planning import check_runtime_fits, job_asks, local_cluster_cpus

        asks = job_asks(cluster, num_ps, nn_actors=False, loaders=False)
        init_ray(cluster.address, local_cluster_cpus(cluster, asks))
        check_runtime_fits(cluster, num_ps)
        job = cluster.job_name or new_job_id()
        actors = start_serving_parameter_servers(num_ps, serving, cluster, job)
        owned = True
    store = RayStore(actors, {**store_options(spec), "adopt_optimizer": True}, timeout_s, owned)
    try:
        client = parameter_server_client(actors, cluster, timeout_s)
    except BaseException:
        store.close()
        raise
    worker = EmbeddingWorker.from_spec(spec, client)
    return RayServingRuntime(worker, store, client, spec, serving)
