"""``persia serve``: an HTTP (FastAPI under uvicorn) and gRPC (TorchServe's inference API)
server for a job-file export or a PERSIA-API checkpoint. See docs/server.md.

* :func:`open_model`: the model, whichever kind the directory holds (an interim adapter until
  ``persia.serving.open_model`` lands; same interface);
* :func:`persia.server.app.create_app`: the FastAPI application over a model;
* :func:`persia.server.grpc_api.start_grpc_server`: the gRPC front end;
* :func:`persia.server.run.serve_model`: both, until interrupted (what ``persia serve`` runs).

This package imports FastAPI, uvicorn and grpcio only in those submodules (``pip install
persia[serve]``); the Ray Serve deployment lives in :mod:`persia.backends.ray.serve`.
"""

from persia.server._core import RequestError, ServerSettings, Stats
from persia.server._model import JIT_FILENAME, RowsNotSupported, ServedModel, open_model

__all__ = [
    "JIT_FILENAME",
    "RequestError",
    "RowsNotSupported",
    "ServedModel",
    "ServerSettings",
    "Stats",
    "open_model",
]
