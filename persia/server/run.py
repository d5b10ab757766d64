"""Run ``persia serve`` in this process: the HTTP application under uvicorn and the gRPC front end
on the same model, until SIGINT or SIGTERM."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from persia.logger import get_default_logger
from persia.server._model import ServedModel
from persia.server.settings import ServerSettings

__all__ = ["serve_model", "bind"]

_logger = get_default_logger()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port).

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_model(
    model: ServedModel,
    settings: ServerSettings,
    *,
    log_level: str = "warning",
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serves ``model`` until interrupted, then stops both front ends (the caller closes the
    model).

    Once both front ends listen, ``on_ready`` gets ``{"http": URL (``https://`` with TLS),
    "grpc": "host:port" or None,
    "kind": ...}``; by default that object is printed as one JSON line on stdout. Setting
    ``stop`` ends the server as a signal does (for a server run on another thread, where uvicorn
    installs no signal handler).

    Raises:
        OSError: a port cannot be bound.
    """
    import uvicorn

    from persia.server.app import create_app

    sock = bind(settings.host, settings.port)  # before the app starts any thread
    app = create_app(model, settings)
    grpc_server, grpc_port = None, None
    try:
        if settings.grpc_port is not None:
            from persia.server.grpc_api import start_grpc_server

            grpc_server, grpc_port = start_grpc_server(model, settings, app.state.in_flight)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if settings.tls else "http"
        info = {
            "http": f"{scheme}://{shown}:{port}",
            "grpc": None if grpc_port is None else f"{shown}:{grpc_port}",
            "kind": model.kind,
        }
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
        )
        server = uvicorn.Server(config)
        if stop is not None:

            def watch() -> None:
                stop.wait()
                server.should_exit = True

            threading.Thread(target=watch, name="persia-serve-stop", daemon=True).start()
        if on_ready is None:
            sys.stdout.write(json.dumps(info) + "\n")
            sys.stdout.flush()
        else:
            on_ready(info)
        _logger.info(
            "persia serve: %s model on %s (gRPC %s)", model.kind, info["http"], info["grpc"]
        )
        server.run(sockets=[sock])
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2).wait()
        if app.state.coalescer is not None:
            app.state.coalescer.close()
        sock.close()
