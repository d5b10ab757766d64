"""Where persia's Ray actors meet: the Ray namespace and the actor names (one definition).

Every process of persia joins Ray in the namespace :func:`namespace`: ``PERSIA_RAY_NAMESPACE``,
else :data:`DEFAULT_NAMESPACE` (``"persia"``). The named actors of a job are created in that
namespace and looked up there, so the roles of one job find each other whether they share a Ray
driver (``persia train --backend ray``, DDP NN workers) or not (``persia-launcher`` roles, data
loaders streaming to NN workers).

Names, for a job named ``<job>`` (``ClusterConfig.job_name``, ``PERSIA_JOB_NAME``):

* parameter server ``i``: ``persia-<job>-ps-<i>`` (:func:`ps_actor_name`);
* embedding worker ``i``: ``persia-<job>-ew-<i>`` (:func:`ew_actor_name`);
* NN worker of rank ``r``: ``persia-<job>-nn-<r>`` (:func:`nn_actor_name`);
* data loader ``d``: ``persia-<job>-loader-<d>`` (:func:`loader_actor_name`);
* the address book of streaming loader ``i`` of channel ``c``: ``persia-stream-<c>-loader-<i>``
  (:func:`stream_actor_name`).
"""

from __future__ import annotations

from persia import _settings

__all__ = [
    "DEFAULT_NAMESPACE",
    "namespace",
    "ps_actor_name",
    "ew_actor_name",
    "nn_actor_name",
    "loader_actor_name",
    "stream_actor_name",
]

#: The Ray namespace of persia's actors when ``PERSIA_RAY_NAMESPACE`` is not set.
DEFAULT_NAMESPACE = "persia"


def namespace() -> str:
    """``PERSIA_RAY_NAMESPACE``, default :data:`DEFAULT_NAMESPACE`."""
    return _settings.ray_namespace() or DEFAULT_NAMESPACE


def ps_actor_name(job: str, rank: int) -> str:
    """The name of parameter server ``rank`` of ``job``."""
    return f"persia-{job}-ps-{rank}"


def ew_actor_name(job: str, rank: int) -> str:
    """The name of embedding worker ``rank`` of ``job``."""
    return f"persia-{job}-ew-{rank}"


def nn_actor_name(job: str, rank: int) -> str:
    """The name of the NN worker of rank ``rank`` of ``job``."""
    return f"persia-{job}-nn-{rank}"


def loader_actor_name(job: str, index: int) -> str:
    """The name of data loader ``index`` of ``job``."""
    return f"persia-{job}-loader-{index}"


def stream_actor_name(channel: str, index: int) -> str:
    """The name of the address book of streaming data loader ``index`` of ``channel``."""
    return f"persia-stream-{channel}-loader-{index}"
