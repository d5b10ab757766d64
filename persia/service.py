"""PERSIA's ``persia.service``: where a serving handler finds its embedding workers.

``get_embedding_worker_services()`` gives the one address in ``EMBEDDING_WORKER_SERVICE``, else
PERSIA's default ``embedding_worker:8887`` (the service name of PERSIA's docker-compose and
Kubernetes files). persia has no embedding-worker network service yet (its embedding workers run
inside each NN worker), so :class:`persia.ctx.InferCtx` serves in process when given an empty
list; a handler written for PERSIA passes this function's list and gets a clear error instead.
"""

from __future__ import annotations

from persia import _settings

__all__ = ["get_embedding_worker_services"]


def get_embedding_worker_services() -> list[str]:
    """The embedding-worker services of this serving process: ``[$EMBEDDING_WORKER_SERVICE]``
    when the variable is set and not empty, else ``["embedding_worker:8887"]`` (PERSIA's)."""
    return [_settings.embedding_worker_service()]
