"""The cluster backend on Ray: parameter-server shards as Ray actors behind the Transport.

What runs where (one NN worker):

* N **parameter-server actors** (:class:`ParameterServer`), each wrapping one
  :class:`persia.store.Shard`; placed by Ray resources (``ClusterConfig.ps_num_cpus``,
  ``ps_memory_bytes``, ``ps_resources``), fractional CPUs by default so that a whole small job
  fits on a 2-CPU node.
* The embedding worker and the applier thread stay in the NN-worker process (the existing
  :class:`persia.worker.embedding_worker.EmbeddingWorker` and
  :class:`persia.runtime.pipeline.Runtime`); they reach the shards through a
  :class:`persia.rpc.base.Transport`: either :class:`RayTransport` (Ray actor calls) or the
  zero-copy ZeroMQ channel of :mod:`persia.rpc.zmq_transport` (the default for the hot path,
  ``ClusterConfig.transport``).

Failures: every call waits at most ``timeout_s`` (``PERSIA_RAY_TIMEOUT_S``, default 60 s); a dead
or unreachable actor raises :class:`persia.errors.BackendError` naming the role and rank. Errors
raised by the store itself (``StoreError``, ...) come back as themselves.

Ray's files: a Ray cluster started here keeps its logs, sockets and session files under
``PERSIA_RAY_TEMP_DIR`` (default ``<system temp>/persia-ray-<uid>``), and, when Ray's token
authentication is on and no token is configured (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``),
its token goes to ``auth_token`` in that folder (mode 0600), not to ``~/.ray``. Only modules named
``persia/backends/ray/`` import Ray.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import persia.rpc.wire as _wire
from persia import _settings, telemetry
from persia.backends.ray.config import TRANSPORTS, ClusterConfig, RoleSpec
from persia.backends.ray.naming import namespace, ps_actor_name
from persia.embedding.spec import EmbeddingSpec
from persia.errors import BackendError, PersiaError
from persia.rpc.base import PARAMETER_SERVER, ParameterServerClient, Transport
from persia.rpc.protocol import ShardProtocol
from persia.store.build import shard_options

__all__ = [
    "TRANSPORTS",
    "ClusterConfig",
    "RoleSpec",
    "ParameterServer",
    "RayTransport",
    "RayStore",
    "init_ray",
    "ray_temp_dir",
    "attach_parameter_servers",
    "start_parameter_servers",
]

_INIT_LOCK = threading.Lock()


# ------------------------------------------------------------------------------ Ray itself
def ray_temp_dir() -> Path:
    """Where a Ray cluster started by persia keeps its files (``PERSIA_RAY_TEMP_DIR``)."""
    return _settings.ray_temp_dir()


def _place_auth_token(folder: Path) -> None:
    """Points Ray's token authentication at ``folder/auth_token`` unless the user chose."""
    if _settings.ray_auth_chosen():
        return
    path = folder / "auth_token"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.environ[_settings.RAY_AUTH_TOKEN_PATH] = str(path)  # a write: Ray reads it


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connects this process to Ray once: ``address``, else ``RAY_ADDRESS``, else a new local
    cluster whose files live under :func:`ray_temp_dir`."""
    import ray

    with _INIT_LOCK:
        if ray.is_initialized():
            return
        address = address or _settings.ray_address()
        runtime_env = {"env_vars": _forwarded_env()}
        if address is not None:
            ray.init(
                address=address,
                namespace=namespace(),
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
            )
            return
        folder = ray_temp_dir()
        folder.mkdir(parents=True, exist_ok=True)
        _place_auth_token(folder)
        ray.init(
            # "local": a new cluster, never one Ray finds through a stale ray_current_cluster
            # file (a head that `persia-launcher ray-head` ran and that was killed uncleanly)
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace=namespace(),
            _temp_dir=str(folder),
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )


def _forwarded_env() -> dict[str, str]:
    """The variables every actor gets from the driver (numba cache, deep checks)."""
    _settings.ensure_numba_cache_dir()
    names = (
        _settings.NUMBA_CACHE_DIR,
        _settings.PERSIA_DEEP_CHECKS,
        _settings.OMP_WAIT_POLICY,
        _settings.PERSIA_METRICS_GATEWAY_ADDR,  # NN-worker actors push where the driver does
    )
    return _settings.env_values(names)


def _ray_exceptions() -> tuple[Any, Any, Any]:
    import ray.exceptions as rex

    died = (rex.RayActorError, rex.ActorUnavailableError, rex.ActorDiedError)
    return died, rex.GetTimeoutError, rex.RayTaskError


def get_with_timeout(ref: Any, timeout_s: float, role: str, rank: int | None) -> Any:
    """``ray.get`` that turns Ray's failures into :class:`BackendError` naming the role.

    A :class:`PersiaError` raised inside the actor comes back as itself.
    """
    import ray

    died, timeout, task_error = _ray_exceptions()
    try:
        return ray.get(ref, timeout=timeout_s)
    except died as exc:
        raise BackendError(
            f"actor is dead or unreachable ({type(exc).__name__})", role, rank
        ) from exc
    except timeout:
        raise BackendError(f"no reply within {timeout_s:g} s", role, rank) from None
    except task_error as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, PersiaError):
            raise cause from None
        raise BackendError(f"failed: {cause!r}", role, rank) from exc


# --------------------------------------------------------------------- the parameter server
class ParameterServer:
    """One parameter-server shard as a Ray actor (created through :func:`start_parameter_servers`).

    Implements :class:`persia.rpc.protocol.ShardProtocol` (its properties as methods: an actor
    has none), plus the actor's own ``ping``, ``endpoint``, ``replace_rows``, ``clear`` and
    ``close``.

    Args:
        rank: this shard's index.
        shard_kwargs: :class:`persia.store.Shard`'s arguments (capacity, optimizer, init, ...).
        bind_host: where the ZeroMQ channel binds (None: no channel).
        port: the channel's port (None: a free one).
        security: the channel's mechanism, ``"curve"`` or ``"null"`` (:mod:`persia.rpc.security`).
        shard: the shard to serve (default: a new :class:`persia.store.Shard` of
            ``shard_kwargs``; the inference-mode servers give their read-only one).
        metrics: where to push this actor's metrics (:func:`persia.telemetry.settings` of the
            driver; None: metrics off here).
    """

    def __init__(
        self,
        rank: int,
        shard_kwargs: dict[str, Any],
        bind_host: str | None,
        *,
        port: int | None = None,
        security: str = "curve",
        shard: Any = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        from persia._settings import ensure_numba_cache_dir

        ensure_numba_cache_dir()
        from persia.store import Shard

        self.rank = rank
        if metrics is not None:
            telemetry.configure(telemetry.PS, rank, push=metrics)
        # this shard's rows, evictions, misses, ... are read when the metrics are collected
        telemetry.watch_shards(self, lambda ps: [(ps.rank, ps.shard.stats())])
        self._kwargs = dict(shard_kwargs)
        self.shard = Shard(**self._kwargs) if shard is None else shard
        self.shard.replica = rank
        self._server = None
        if bind_host is not None:
            from persia.rpc.zmq_transport import ZmqServer

            if bind_host == "node":
                import ray

                bind_host = ray.util.get_node_ip_address()
            try:
                self._server = ZmqServer(self._dispatch, bind_host, port or 0, security)
            except Exception as exc:  # zmq.ZMQError: the port is taken, the host not ours
                raise BackendError(
                    f"cannot bind the data channel to {bind_host}:{port or 'a free port'}: {exc}",
                    PARAMETER_SERVER,
                    rank,
                ) from None

    def _dispatch(self, method: str, args: list[Any]) -> Any:
        if method in _wire.METHODS:
            return _wire.serve(self.shard, method, args)
        if method not in ("lookup", "apply_gradients"):
            raise BackendError(f"method {method!r} is not served on the data channel")
        return getattr(self.shard, method)(*args)

    def endpoint(self) -> str | None:
        """The ZeroMQ channel's address (``tcp://host:port``), or None."""
        return None if self._server is None else self._server.endpoint

    def access(self) -> Any:
        """What a client of the job needs to use the channel (a
        :class:`persia.rpc.security.ChannelAccess`: the address and, with CURVE, the keys;
        it travels only as the reply of this Ray call), or None."""
        return None if self._server is None else self._server.access

    def ping(self) -> int:
        return self.rank

    def flush_metrics(self) -> bool | None:
        """Pushes this actor's metrics now (None: it does not push)."""
        return telemetry.push_now()

    def lookup(self, keys: np.ndarray, dim: int, training: bool) -> np.ndarray:
        return self.shard.lookup(keys, dim, training)

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray) -> np.ndarray:
        return self.shard.apply_gradients(keys, grads)

    def lookup_wire(self, keys: np.ndarray, dim: int, training: bool, codec: str) -> np.ndarray:
        """:meth:`lookup` with the rows coded (:mod:`persia.rpc.wire`)."""
        return _wire.serve(self.shard, "lookup_wire", (keys, dim, training, codec))  # type: ignore[no-any-return]

    def apply_gradients_wire(
        self, keys: np.ndarray, message: np.ndarray, dim: int, codec: str
    ) -> np.ndarray:
        """:meth:`apply_gradients` of coded gradients (:mod:`persia.rpc.wire`)."""
        return _wire.serve(self.shard, "apply_gradients_wire", (keys, message, dim, codec))  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.shard.stats()

    def export_rows(self, dim: int | None = None) -> dict[int, dict[str, np.ndarray]]:
        return self.shard.export_rows(dim)

    def replace_rows(
        self, parts: dict[int, dict[str, np.ndarray]], optimizer: dict[str, Any] | None = None
    ) -> None:
        """Drops every row, then imports ``{dim: {"keys", "values", "state"}}`` in order;
        ``optimizer`` (``to_dict()`` form) replaces the shard's optimizer when given."""
        from persia.embedding.optim import EmbeddingOptimizer
        from persia.store import Shard

        kwargs = dict(self._kwargs)
        if optimizer is not None:
            kwargs["optimizer"] = EmbeddingOptimizer.from_dict(optimizer)
        fresh = Shard(**kwargs)
        fresh.replica = self.rank
        for dim, part in parts.items():
            fresh.import_rows(dim, part["keys"], part["values"], part["state"])
        self.shard = fresh
        self._kwargs = kwargs

    # change tracking for incremental updates (persia.store.delta), as on a local Shard
    def track_changes(self, enabled: bool = True) -> None:
        self.shard.track_changes(enabled)

    def tracking_changes(self) -> bool:
        return self.shard.tracking_changes

    def changed_count(self) -> int:
        return self.shard.changed_count

    def take_changes(self) -> dict[int, dict[str, np.ndarray]]:
        return self.shard.take_changes()

    def import_rows(
        self, dim: int, keys: np.ndarray, values: np.ndarray, state: np.ndarray | None = None
    ) -> None:
        self.shard.import_rows(dim, keys, values, state)

    def clear(self) -> None:
        from persia.store import Shard

        self.shard = Shard(**self._kwargs)
        self.shard.replica = self.rank

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        telemetry.shutdown()  # the last push


def start_parameter_servers(
    n: int, shard_kwargs: dict[str, Any], cluster: ClusterConfig, job: str, first_rank: int = 0
) -> list[Any]:
    """Starts ``n`` parameter-server actors (ranks ``first_rank`` on) and waits until each
    answers (or BackendError)."""
    import ray

    options: dict[str, Any] = {"num_cpus": cluster.ps_num_cpus, "max_restarts": 0}
    if cluster.ps_memory_bytes is not None:
        options["memory"] = cluster.ps_memory_bytes
    if cluster.ps_resources:
        options["resources"] = dict(cluster.ps_resources)
    if cluster.transport == "zmq":
        # Threads: the Ray control calls (stats, export) run beside the ZeroMQ thread.
        options["max_concurrency"] = 4
    actor_cls = ray.remote(ParameterServer)
    bind = _bind_host(cluster) if cluster.transport == "zmq" else None
    metrics = telemetry.settings()  # each actor pushes its own, where this process does
    actors: list[Any] = [
        actor_cls.options(name=ps_actor_name(job, i), namespace=namespace(), **options).remote(
            i, shard_kwargs, bind, security=cluster.channel_security, metrics=metrics
        )
        for i in range(first_rank, first_rank + n)
    ]
    timeout = cluster.resolved_timeout_s()
    for i, a in enumerate(actors, first_rank):
        get_with_timeout(a.ping.remote(), timeout, PARAMETER_SERVER, i)
    return actors


def attach_parameter_servers(
    job_name: str,
    num_ps: int,
    timeout_s: float,
    spec: EmbeddingSpec | None = None,
) -> list[Any]:
    """The running parameter-server actors of ``job_name`` (waits up to ``timeout_s`` for each
    to exist, then for it to answer).

    Servers started on their own (``persia-launcher embedding-parameter-server``,
    :class:`persia.backends.ray.launch.LaunchedParameterServer`) say how many they are, which
    overrides ``num_ps``, and take the shard settings of ``spec`` (its capacity split among
    them) if no NN worker configured them before.
    """
    import ray

    actors: list[Any] = []
    deadline = time.monotonic() + timeout_s
    i = 0
    while i < num_ps:
        name = ps_actor_name(job_name, i)
        while True:
            try:
                actor = ray.get_actor(name, namespace=namespace())
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"no actor named {name!r} within {timeout_s:g} s", PARAMETER_SERVER, i
                    ) from None
                time.sleep(0.2)
        get_with_timeout(actor.ping.remote(), timeout_s, PARAMETER_SERVER, i)
        actors.append(actor)
        if i == 0 and hasattr(actor, "replica_size"):
            num_ps = int(
                get_with_timeout(actor.replica_size.remote(), timeout_s, PARAMETER_SERVER, 0)
            )
        i += 1
    if spec is not None:
        kwargs = shard_options(spec, len(actors))
        for rank, actor in enumerate(actors):
            if hasattr(actor, "configure"):
                get_with_timeout(actor.configure.remote(kwargs), timeout_s, PARAMETER_SERVER, rank)
    return actors


def _bind_host(cluster: ClusterConfig) -> str:
    """Loopback on a cluster started here; the node's Ray address on a joined one."""
    if cluster.bind_host:
        return cluster.bind_host
    joined = cluster.address or _settings.ray_address()
    return "node" if joined else "127.0.0.1"  # "node": resolved inside the actor


# ----------------------------------------------------------------------------- transport
class RayTransport(Transport):
    """Role calls as Ray actor method calls (``ray.get`` with a timeout).

    Args:
        roles: role name -> actor handles, by rank.
        timeout_s: the longest one call may take.
    """

    def __init__(self, roles: dict[str, list[Any]], timeout_s: float) -> None:
        self._roles = {k: list(v) for k, v in roles.items()}
        self.timeout_s = timeout_s

    def replicas(self, role: str) -> int:
        return len(self._roles.get(role, []))

    def actor(self, role: str, rank: int) -> Any:
        try:
            return self._roles[role][rank]
        except (KeyError, IndexError):
            raise BackendError(
                f"no such replica (have {self.replicas(role)})", role, rank
            ) from None

    def call(self, role: str, rank: int, method: str, *args: Any) -> Any:
        ref = getattr(self.actor(role, rank), method).remote(*args)
        return get_with_timeout(ref, self.timeout_s, role, rank)


# -------------------------------------------------------------------------- store facade
class RemoteShard:
    """A parameter-server actor seen as a :class:`persia.store.Shard` (control path, Ray calls):
    a :class:`persia.rpc.protocol.ShardProtocol`."""

    def __init__(self, actor: Any, rank: int, timeout_s: float) -> None:
        self.actor = actor
        self.rank = rank
        self.timeout_s = timeout_s

    def _call(self, method: str, *args: Any) -> Any:
        ref = getattr(self.actor, method).remote(*args)
        return get_with_timeout(ref, self.timeout_s, PARAMETER_SERVER, self.rank)

    def lookup(self, keys: np.ndarray, dim: int, training: bool) -> np.ndarray:
        return self._call("lookup", keys, dim, training)

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray) -> np.ndarray:
        return self._call("apply_gradients", keys, grads)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def export_rows(self, dim: int | None = None) -> dict[int, dict[str, np.ndarray]]:
        parts = self._call("export_rows")
        return parts if dim is None else {dim: parts[dim]}

    # change tracking, so that a DeltaWriter works over the actors as over local shards
    def track_changes(self, enabled: bool = True) -> None:
        self._call("track_changes", enabled)

    @property
    def tracking_changes(self) -> bool:
        return bool(self._call("tracking_changes"))

    @property
    def changed_count(self) -> int:
        return int(self._call("changed_count"))

    def take_changes(self) -> dict[int, dict[str, np.ndarray]]:
        return self._call("take_changes")

    def import_rows(self, dim: int, keys: Any, values: Any, state: Any | None = None) -> None:
        self._call("import_rows", dim, keys, values, state)


def _sharded_store_base() -> type:
    from persia.store import ShardedStore

    return ShardedStore


class RayStore(_sharded_store_base()):  # type: ignore[misc]
    """A :class:`persia.store.ShardedStore` whose shards are parameter-server actors.

    Every store-level operation (stats, clear, dump, load, job checkpoints) works as on the
    embedded store, so checkpoints move between backends and shard counts. Rows of a dump or a
    load pass through this process (no shared filesystem needed; the table must fit in its
    memory once).

    Args:
        actors: the parameter-server actors, by rank.
        store_kwargs: :class:`persia.store.ShardedStore`'s arguments except ``num_shards``.
        timeout_s: the longest one control call may take.
        owned: :meth:`close` stops the actors.
    """

    def __init__(
        self, actors: list[Any], store_kwargs: dict[str, Any], timeout_s: float, owned: bool
    ) -> None:
        super().__init__(num_shards=len(actors), **store_kwargs)
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self._owned = owned
        self.shards: list[ShardProtocol] = [
            RemoteShard(a, i, timeout_s) for i, a in enumerate(self.actors)
        ]

    def shard_stats(self) -> list[dict[str, Any]]:
        """Each shard's stats, asked of all actors at once."""
        refs = [a.stats.remote() for a in self.actors]
        return [
            get_with_timeout(r, self.timeout_s, PARAMETER_SERVER, i) for i, r in enumerate(refs)
        ]

    @property
    def rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shard_stats())

    def _replace_shards(self, shards: list[Any]) -> None:
        # ``shards`` are fresh local Shard objects (ShardedStore.clear / load, checkpoint
        # restores): their rows replace each actor's.
        refs = [
            a.replace_rows.remote(s.export_rows(), self.optimizer.to_dict())
            for a, s in zip(self.actors, shards, strict=True)
        ]
        for i, r in enumerate(refs):
            get_with_timeout(r, self.timeout_s, PARAMETER_SERVER, i)

    def push_metrics(self) -> None:
        """Has the actors push their metrics now (:func:`flush_actor_metrics`)."""
        flush_actor_metrics(self.actors, PARAMETER_SERVER)

    def close(self) -> None:
        """Stops the actors this store started."""
        if not self._owned:
            return
        import ray

        self._owned = False
        flush_actor_metrics(self.actors, PARAMETER_SERVER)
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


def flush_actor_metrics(actors: list[Any], role: str, timeout_s: float = 30.0) -> None:
    """Has each actor push its metrics now and waits (at most ``timeout_s``) until each has:
    when the job ends, and before the actors are stopped. Only when this process pushes; a push
    that fails or does not finish in time is logged as a warning (the job's result does not
    depend on it)."""
    if telemetry.settings() is None or not actors:
        return
    import ray

    problems = []
    refs = []
    for i, a in enumerate(actors):
        try:
            refs.append((i, a.flush_metrics.remote()))
        except Exception as exc:  # noqa: BLE001 - a dead actor has nothing left to push
            problems.append(f"{i}: {type(exc).__name__}")
    done = set()
    if refs:
        try:
            done = set(ray.wait([r for _, r in refs], num_returns=len(refs), timeout=timeout_s)[0])
        except Exception as exc:  # noqa: BLE001 - Ray already shut down: nothing to push
            problems.append(f"{type(exc).__name__}: {exc}")
            refs = []
    for i, ref in refs:
        if ref not in done:
            problems.append(f"{i}: no answer within {timeout_s:g} s")
            continue
        try:
            if ray.get(ref) is False:
                problems.append(f"{i}: the push failed (see the actor's log)")
        except Exception as exc:  # noqa: BLE001 - a dead actor has nothing left to push
            problems.append(f"{i}: {type(exc).__name__}")
    if problems:
        from persia.logger import get_default_logger

        get_default_logger().warning(
            f"persia metrics: the push of the {role} actors' metrics did not reach the "
            f"Pushgateway from every actor ({'; '.join(problems)})"
        )


def _liveness(roles: dict[str, list[Any]]) -> Any:
    """A ``(role, rank) -> None`` check that raises BackendError once Ray knows an actor dead."""

    def check(role: str, rank: int) -> None:
        import ray

        ref = roles[role][rank].ping.remote()
        ready, _ = ray.wait([ref], timeout=0.5)
        if ready:
            get_with_timeout(ref, 1.0, role, rank)

    return check


def new_job_id() -> str:
    """A short unique name for one job's actors."""
    return f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"


def parameter_server_client(
    actors: list[Any], cluster: ClusterConfig, timeout_s: float
) -> ParameterServerClient:
    """A client over the PS actors, through the configured transport."""
    from persia.store import shard_of

    transport: Transport
    if cluster.transport == "zmq":
        from persia.rpc.zmq_transport import ZmqTransport

        endpoints = [
            get_with_timeout(a.access.remote(), timeout_s, PARAMETER_SERVER, i)
            for i, a in enumerate(actors)
        ]
        transport = ZmqTransport(
            {PARAMETER_SERVER: endpoints}, timeout_s, liveness=_liveness({PARAMETER_SERVER: actors})
        )
    else:
        transport = RayTransport({PARAMETER_SERVER: actors}, timeout_s)
    return ParameterServerClient(transport, shard_of, wire=cluster.wire_compression)
