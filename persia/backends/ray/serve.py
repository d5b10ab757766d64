"""``persia serve DIR --backend ray --replicas N``: the same HTTP application on Ray Serve.

Each replica is a Ray Serve deployment replica that opens the model itself
(:func:`persia.server.open_model`) and serves :func:`persia.server.app.create_app` over it; Ray
Serve's proxy spreads the requests over the replicas; each answer names its replica in the
``x-persia-replica`` header.

**Deltas: every replica follows them itself.** With ``--follow`` each replica's own model
(:func:`persia.serving.open_model`) polls the delta directory and applies every complete delta in order, exactly as a
single server does; no replica waits for another. Replicas therefore hold the same rows up to one
poll interval apart, and two requests sent at the same moment to two replicas may see two
consecutive deltas. The alternative, one shared set of inference parameter servers, would add a
network hop to every lookup and a role to keep alive; a replica's rows fit its memory for the
models persia serves. The model directory and the delta directory must be readable at the same
path on every node (a shared file system).

The gRPC front end is not deployed on Ray Serve (Ray Serve's gRPC proxy needs generated
servicer code); run ``persia serve`` without ``--backend ray`` for it.

Each replica turns :mod:`persia.telemetry` on for the ``server`` role with its rank as
``replica``; ``GET /metrics`` through Ray Serve's proxy answers the metrics of the replica that
took the request.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from ray import serve

from persia.backends.ray.backend import init_ray
from persia.errors import ConfigError
from persia.server.settings import ServerSettings

__all__ = ["PersiaServer", "application", "deploy", "run_ray_serve", "APP_NAME"]

#: The Ray Serve application name of ``persia serve --backend ray``.
APP_NAME = "persia"


@serve.ingress()
class PersiaServer:
    """One replica: the model and the HTTP application over it."""

    def __init__(
        self, path: str, settings: ServerSettings, open_kwargs: dict[str, Any] | None = None
    ) -> None:
        from persia import telemetry
        from persia.server import open_model

        telemetry.configure(telemetry.SERVER, _replica_rank())  # this replica's GET /metrics
        self.settings = settings
        self.model = open_model(path, **(open_kwargs or {}))

    def __serve_build_asgi_app__(self) -> Any:
        from persia.server.app import create_app

        app = create_app(self.model, self.settings)
        replica = serve.get_replica_context().replica_id.unique_id
        return _with_header(app, (b"x-persia-replica", replica.encode()))

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


def _replica_rank() -> int:
    """This replica's rank in the deployment (0 where Ray Serve does not say)."""
    rank: Any = getattr(serve.get_replica_context(), "rank", 0)
    rank = getattr(rank, "rank", rank)  # Ray 2.5x: a ReplicaRank; earlier: an int
    return rank if isinstance(rank, int) else 0


def _with_header(app: Any, header: tuple[bytes, bytes]) -> Any:
    """``app`` answering every HTTP response with ``header`` too (which replica answered)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def add(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await app(scope, receive, add)

    return wrapped


def application(
    path: str | os.PathLike[str],
    settings: ServerSettings,
    *,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    open_kwargs: dict[str, Any] | None = None,
) -> Any:
    """The Ray Serve application (bound deployment) serving ``path`` with ``replicas`` replicas
    of ``replica_cpus`` logical CPUs each.

    Raises:
        ConfigError: a replica count below 1 or a CPU share that is not positive.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"--replicas must be an int >= 1, got {replicas!r}")
    if isinstance(replica_cpus, bool) or not (
        isinstance(replica_cpus, (int, float)) and replica_cpus > 0
    ):
        raise ConfigError(f"--replica-cpus must be > 0, got {replica_cpus!r}")
    deployment: Any = serve.deployment(
        PersiaServer,
        name="persia-server",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": float(replica_cpus)},
        # persia's own limits answer 503 past max_concurrent + max_queue in each replica
        max_ongoing_requests=settings.max_concurrent + settings.max_queue + 1,
    )
    return deployment.bind(os.fspath(path), settings, dict(open_kwargs or {}))


def deploy(
    path: str | os.PathLike[str],
    settings: ServerSettings,
    *,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    open_kwargs: dict[str, Any] | None = None,
) -> str:
    """Starts Ray Serve's HTTP proxy on ``settings.host:settings.port`` (this process joins or
    starts a Ray cluster as :func:`persia.backends.ray.backend.init_ray` does), deploys the
    application and returns its URL once every replica is up.

    Raises:
        ConfigError: bad replica settings, or ``settings.port`` 0 (Ray Serve needs a port).
    """
    if settings.port == 0:
        raise ConfigError("--port: Ray Serve needs a port number, not 0")
    app = application(
        path, settings, replicas=replicas, replica_cpus=replica_cpus, open_kwargs=open_kwargs
    )
    init_ray()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def run_ray_serve(
    path: str | os.PathLike[str],
    settings: ServerSettings,
    *,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    open_kwargs: dict[str, Any] | None = None,
) -> None:
    """:func:`deploy`, print ``{"http": URL, "grpc": null, "kind": "ray-serve", "replicas": N}`` as
    one JSON line, then wait for SIGINT or SIGTERM and shut the application down."""
    url = deploy(
        path, settings, replicas=replicas, replica_cpus=replica_cpus, open_kwargs=open_kwargs
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = {"http": url, "grpc": None, "kind": "ray-serve", "replicas": replicas}
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    try:
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
