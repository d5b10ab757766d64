"""PERSIA's ``persia.service``: where a serving handler finds its embedding workers.

``get_embedding_worker_services()`` gives the one address in ``EMBEDDING_WORKER_SERVICE``, else
PERSIA's default ``embedding_worker:8887`` (the service name of PERSIA's docker-compose and
Kubernetes files). persia has no embedding-worker network service (its embedding worker runs in
the NN worker's or the serving handler's process), so :class:`persia.ctx.InferCtx` serves in
process when given an empty list; a handler written for PERSIA passes this function's list and
looks up through the job's inference-mode parameter servers on Ray (``PERSIA_JOB_NAME``), with a
warning that the addresses themselves are not used.
"""

from __future__ import annotations

from persia import _settings

__all__ = ["get_embedding_worker_services"]


def get_embedding_worker_services() -> list[str]:
    """The embedding-worker services of this serving process: ``[$EMBEDDING_WORKER_SERVICE]``
    when the variable is set and not empty, else ``["embedding_worker:8887"]`` (PERSIA's)."""
    return [_settings.embedding_worker_service()]
