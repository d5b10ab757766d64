"""``persia serve``: an HTTP (FastAPI under uvicorn) and gRPC (TorchServe's inference API)
server for a job-file export or a PERSIA-API checkpoint. See docs/server.md.

* :func:`open_model`: the model, whichever kind the directory holds
  (:func:`persia.serving.open_model` with the command line's defaults for a checkpoint);
* :func:`persia.server.app.create_app`: the FastAPI application over a model;
* :func:`persia.server.grpc_api.start_grpc_server`: the gRPC front end;
* :func:`persia.server.run.serve_model`: both, until interrupted (what ``persia serve`` runs).

Importing this package is light (``persia serve --help`` loads no torch): the names below load
their module on first use. FastAPI, uvicorn and grpcio are imported only by the submodules above
(``pip install persia[serve]``); the Ray Serve deployment lives in
:mod:`persia.backends.ray.serve`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persia.server.settings import ServerSettings

if TYPE_CHECKING:
    from persia.server._core import InFlight, RequestError
    from persia.server._model import RowsNotSupported, ServedModel, open_model

__all__ = [
    "InFlight",
    "RequestError",
    "RowsNotSupported",
    "ServedModel",
    "ServerSettings",
    "open_model",
]


def __getattr__(name: str) -> Any:
    if name in ("InFlight", "RequestError"):
        from persia.server import _core

        return getattr(_core, name)
    if name in ("RowsNotSupported", "ServedModel", "open_model"):
        from persia.server import _model

        return getattr(_model, name)
    raise AttributeError(f"module 'persia.server' has no attribute {name!r}")
