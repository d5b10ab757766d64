"""Roles started one by one against a running Ray cluster (what ``persia-launcher`` runs).

PERSIA's deployment starts each role as its own process (a Procfile line, a Kubernetes pod);
here each such process joins the Ray cluster named by ``RAY_ADDRESS``, in the Ray namespace
``PERSIA_RAY_NAMESPACE`` (default ``persia``), and the roles of one job find each other by
name (``PERSIA_JOB_NAME``, default ``persia``):

* ``embedding-parameter-server --replica-index i --replica-size n`` starts the parameter-server
  actor ``persia-<job>-ps-<i>`` (:class:`LaunchedParameterServer`) and holds it until the
  process is stopped. The shard's settings that PERSIA's NN worker sends to its servers (the
  embedding optimizer, the initialisation range, admission, weight bound) arrive with the first
  NN worker that attaches (:meth:`LaunchedParameterServer.configure`), as in PERSIA.
* NN workers (``TrainCtx(backend="ray")`` in a script started by ``nn-worker``) attach to those
  actors instead of starting their own: :func:`cluster_from_env`.
"""

from __future__ import annotations

import logging
from typing import Any

from persia import _settings
from persia.backends.ray.backend import ClusterConfig, ParameterServer
from persia.backends.ray.naming import namespace, ps_actor_name

__all__ = [
    "LaunchedParameterServer",
    "cluster_from_env",
    "connect",
    "job_name",
    "namespace",
    "start_parameter_server",
    "stop_parameter_server",
]


def job_name() -> str:
    """``PERSIA_JOB_NAME``, default ``persia``."""
    return _settings.job_name() or "persia"


def cluster_from_env() -> ClusterConfig | None:
    """The ClusterConfig of a process started by ``persia-launcher nn-worker``: attach to the
    parameter servers of ``PERSIA_JOB_NAME`` (None when that variable is not set)."""
    name = _settings.job_name()
    if not name:
        return None
    return ClusterConfig(job_name=name).wired(attach_ps=True)


def connect(address: str | None) -> None:
    """Joins the Ray cluster at ``address`` in :func:`namespace` (once per process)."""
    import ray

    from persia.backends.ray.backend import _forwarded_env

    if ray.is_initialized():
        return
    ray.init(
        address=address,
        namespace=namespace(),
        runtime_env={"env_vars": _forwarded_env()},
        logging_level=logging.WARNING,
    )


class LaunchedParameterServer(ParameterServer):
    """A parameter server started on its own; configured by the first NN worker.

    Args:
        rank: this shard's index.
        replicas: the number of parameter servers of the job.
        shard_kwargs: the settings it starts with (replaced by :meth:`configure`).
        bind_host: where the ZeroMQ channel binds.
    """

    def __init__(
        self, rank: int, replicas: int, shard_kwargs: dict[str, Any], bind_host: str | None
    ) -> None:
        super().__init__(rank, shard_kwargs, bind_host)
        self.replicas = replicas
        self._configured = False

    def replica_size(self) -> int:
        """The number of parameter servers of the job."""
        return self.replicas

    def configure(self, shard_kwargs: dict[str, Any]) -> bool:
        """Takes the NN worker's shard settings while no row exists yet; returns whether it
        did (later NN workers find it configured and change nothing)."""
        from persia.store import Shard

        if self._configured or int(self.shard.stats()["rows"]) > 0:
            return False
        self._kwargs = dict(shard_kwargs)
        self.shard = Shard(**self._kwargs)
        self._configured = True
        return True


def start_parameter_server(
    replica_index: int,
    replica_size: int,
    shard_kwargs: dict[str, Any],
    bind_host: str,
    num_cpus: float,
) -> tuple[Any, str, str]:
    """Starts parameter server ``replica_index`` of the job (``persia-launcher
    embedding-parameter-server``) once :func:`connect` joined the cluster.

    Returns:
        (the actor, its name ``persia-<job>-ps-<i>``, the endpoint its data channel serves on).

    Raises:
        BackendError: the actor did not come up within the cluster timeout.
    """
    import ray

    from persia.backends.ray.backend import get_with_timeout

    name = ps_actor_name(job_name(), replica_index)
    actor_cls: Any = ray.remote(LaunchedParameterServer)
    actor = actor_cls.options(
        name=name, namespace=namespace(), num_cpus=num_cpus, max_restarts=0, max_concurrency=4
    ).remote(replica_index, replica_size, shard_kwargs, bind_host)
    timeout_s = ClusterConfig().resolved_timeout_s()
    get_with_timeout(actor.ping.remote(), timeout_s, "parameter-server", replica_index)
    endpoint = get_with_timeout(
        actor.endpoint.remote(), timeout_s, "parameter-server", replica_index
    )
    return actor, name, str(endpoint)


def stop_parameter_server(actor: Any) -> None:
    """Stops an actor of :func:`start_parameter_server`."""
    import ray

    ray.kill(actor)
