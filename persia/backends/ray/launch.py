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
  actors instead of starting their own: :func:`cluster_from_env`. As in PERSIA, they need no
  embedding configuration: parameter server 0 holds the two files it was started with, and an
  NN worker given neither ``embedding_config_file`` nor ``PERSIA_EMBEDDING_CONFIG`` takes them
  from it (:func:`job_configs`).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

from persia import _settings
from persia.backends.ray.backend import ClusterConfig, ParameterServer
from persia.backends.ray.naming import namespace, ps_actor_name

__all__ = [
    "LaunchedParameterServer",
    "cluster_from_env",
    "connect",
    "head_address_file",
    "job_configs",
    "ray_head_command",
    "reachable",
    "role_ray_env",
    "started_head_address",
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
        configs: the parsed ``embedding_config.yml`` and ``global_config.yml`` it was started
            with (handed to NN workers that have none: :meth:`job_configs`).
        port: the ZeroMQ channel's port (None: a free one).
        security: the channel's mechanism (``PERSIA_CHANNEL_SECURITY`` of the launcher).
    """

    def __init__(
        self,
        rank: int,
        replicas: int,
        shard_kwargs: dict[str, Any],
        bind_host: str | None,
        configs: tuple[Any, Any] | None = None,
        port: int | None = None,
        security: str = "curve",
    ) -> None:
        super().__init__(rank, shard_kwargs, bind_host, port=port, security=security)
        self.replicas = replicas
        self._configured = False
        self._configs = configs
        glob = configs[1] if configs is not None else None
        if glob is not None:  # PERSIA's metrics_config of the server's global_config.yml
            from persia import telemetry

            telemetry.enable_from_config(glob.common_config.metrics_config, telemetry.PS, rank)

    def job_configs(self) -> tuple[Any, Any] | None:
        """(EmbeddingFileConfig, GlobalConfig) this server was started with, or None."""
        return self._configs

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
        self.shard.replica = self.rank
        self._configured = True
        return True


def start_parameter_server(
    replica_index: int,
    replica_size: int,
    shard_kwargs: dict[str, Any],
    bind_host: str,
    num_cpus: float,
    configs: tuple[Any, Any] | None = None,
    port: int | None = None,
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
    ).remote(
        replica_index,
        replica_size,
        shard_kwargs,
        bind_host,
        configs,
        port,
        _settings.channel_security(),
    )
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


def job_configs(cluster: ClusterConfig) -> tuple[Any, Any]:
    """The embedding and global configuration of the job's running parameter servers (those
    ``persia-launcher embedding-parameter-server`` started), for an NN worker that was given
    none; waits up to the cluster timeout for parameter server 0.

    Raises:
        ConfigError: the servers hold no configuration (started by another driver), so the NN
            worker must be given one.
        BackendError: no parameter server 0 of the job within the timeout.
    """
    from persia.backends.ray.backend import attach_parameter_servers, get_with_timeout, init_ray
    from persia.errors import ConfigError

    init_ray(cluster.address, cluster.num_cpus)
    timeout_s = cluster.resolved_timeout_s()
    name = str(cluster.job_name)
    first = attach_parameter_servers(name, 1, timeout_s, None)[0]
    configs = None
    if hasattr(first, "job_configs"):
        configs = get_with_timeout(first.job_configs.remote(), timeout_s, "parameter-server", 0)
    if configs is None:
        raise ConfigError(
            f"no embedding config: the parameter servers of job {name!r} hold none; pass "
            f"embedding_config_file= or set {_settings.PERSIA_EMBEDDING_CONFIG}"
        )
    return configs


# ---------------------------------------------------------------- the job's Ray head
def head_address_file() -> Path:
    """Where ``persia-launcher ray-head`` writes the address of the Ray head it started:
    ``head_address`` in :func:`persia._settings.ray_temp_dir`."""
    return _settings.ray_temp_dir() / "head_address"


def ray_head_command(
    ray_executable: str, port: int, host: str | None, num_cpus: int | None, address: str | None
) -> tuple[list[str], dict[str, str]]:
    """The ``ray start ... --block`` command (and its environment) that starts the job's Ray
    head on ``port`` (files under :func:`persia._settings.ray_temp_dir`, its token in
    ``auth_token`` there unless the user chose one, as a cluster persia starts itself), or,
    with ``address``, joins that head as one more node. ``host``: this node's address (None:
    Ray's choice, the address of the machine's default route)."""
    from persia.backends.ray.backend import _place_auth_token

    cmd = [ray_executable, "start", "--block", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if host:
        cmd.append(f"--node-ip-address={host}")
    if address:
        cmd.append(f"--address={address}")
    else:
        folder = _settings.ray_temp_dir()
        if not _settings.ray_auth_chosen():  # a token of this folder, in token mode
            _place_auth_token(folder)  # sets RAY_AUTH_TOKEN_PATH here, for the child below
            env = _settings.environment()
            env[_settings.RAY_AUTH_MODE] = "token"
            return cmd + _head_args(port, folder), env
        cmd += _head_args(port, folder)
    return cmd, _settings.environment()


def _head_args(port: int, folder: Path) -> list[str]:
    return [
        "--head",
        f"--port={port}",
        f"--temp-dir={folder}",
        "--include-dashboard=false",
    ]


def started_head_address() -> str | None:
    """The address Ray wrote for the head it started in :func:`persia._settings.ray_temp_dir`
    (its ``ray_current_cluster`` file), once that address answers; else None."""
    try:
        found = (_settings.ray_temp_dir() / "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return found if found and reachable(found) else None


def reachable(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def role_ray_env(timeout_s: float) -> dict[str, str]:
    """The Ray variables a role started by ``persia-launcher`` needs: ``RAY_ADDRESS`` when it is
    set, else the address of the head ``persia-launcher ray-head`` started on this machine
    (waiting up to ``timeout_s`` for it to answer, as Procfile lines start together), with that
    head's token file.

    Raises:
        BackendError: no ``RAY_ADDRESS`` and no reachable head within ``timeout_s``.
    """
    from persia.errors import BackendError

    address = _settings.ray_address()
    if address:
        return {_settings.RAY_ADDRESS: address}
    path = head_address_file()
    deadline = time.monotonic() + timeout_s
    found = None
    while True:
        try:
            found = path.read_text().strip()
        except OSError:
            found = None
        if found and reachable(found):
            break
        if time.monotonic() > deadline:
            where = f"{found} (from {path}) does not answer" if found else f"no {path}"
            raise BackendError(
                f"no Ray cluster within {timeout_s:g} s: {where}. Set RAY_ADDRESS, or start "
                "the job's Ray head with `persia-launcher ray-head` (the line that replaces "
                "PERSIA's nats_server)"
            )
        time.sleep(0.25)
    out = {_settings.RAY_ADDRESS: found}
    token = _settings.ray_temp_dir() / "auth_token"
    if not _settings.ray_auth_chosen() and token.is_file():
        # a client sends its token only in token mode (Ray enables it for clusters it starts)
        out[_settings.RAY_AUTH_TOKEN_PATH] = str(token)
        out[_settings.RAY_AUTH_MODE] = "token"
    return out
