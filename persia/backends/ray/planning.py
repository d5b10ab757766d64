"""Resource planning: what a job asks of Ray, checked against the cluster before any actor starts.

Ray queues an actor whose resources no node can give; persia's roles would then wait for each
other until a timeout that says nothing about resources. :func:`check_job_fits` (``persia
train --backend ray``, :func:`persia.backends.ray.jobs.run_job`) and :func:`check_runtime_fits`
(``TrainCtx(backend="ray")``: the parameter servers and embedding workers a runtime starts)
compare the asks with the cluster's resources and raise :class:`ConfigError`, naming the short
resource, the asks per role, and by how much it is short:

* in total: the sum over roles of ``count x per-replica ask``, per resource (``CPU``,
  ``memory``, custom resources such as ``ps_host``), against the sum over the cluster's nodes;
* per replica: one actor runs on one node, so each role's per-replica ask must fit a node.

Both are checked against what the cluster has **free** now (``ray.available_resources()``, and
each node's free resources), not its total: the actors of other jobs (or of this job's own
data loaders, started before a runtime) hold theirs until they end. A job larger than the
cluster's total fails at once; a job that fits the total but not what is free now fails once
that persists for :data:`GRACE_S` (Ray frees the resources of ended actors a moment after they
end, and nodes may still be joining a cluster joined by address), the message giving both the
free and the total amount.

On a Ray cluster that persia starts itself (no ``address``, no ``RAY_ADDRESS``, no
``ClusterConfig(num_cpus=)``), the defaults fit the machine: :func:`local_cluster_cpus` gives
it as many logical CPUs as the job asks when that is more than the machine has (the requests
are scheduling shares; the fractional defaults already share cores), so a small job never
waits on a laptop.

Only the actors count: an NN worker that is this process (one NN worker) and the 0-CPU stream
announcement actors ask for nothing. :func:`shortfalls` is the pure function behind both checks.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from persia import _settings
from persia.backends.ray.config import ClusterConfig
from persia.errors import ConfigError

__all__ = [
    "RoleAsk",
    "check_job_fits",
    "check_runtime_fits",
    "job_asks",
    "local_cluster_cpus",
    "shortfalls",
]

_EPS = 1e-6  # Ray's own resource granularity is 1e-4


@dataclass(frozen=True)
class RoleAsk:
    """One role's replicas and what each asks Ray for.

    Attributes:
        role: the role, as messages name it (``"parameter servers"``).
        count: replicas.
        per_replica: resource name -> amount (``CPU``, ``memory`` in bytes, custom ones).
        fields: the settings that set it, for the message (``"--ps-cpus / ps.num_cpus"``).
    """

    role: str
    count: int
    per_replica: Mapping[str, float] = field(default_factory=dict)
    fields: str = ""


def _ask(role: str, count: int, spec: Any, fields: str) -> RoleAsk:
    per: dict[str, float] = {"CPU": float(spec.num_cpus)}
    if spec.memory_bytes is not None:
        per["memory"] = float(spec.memory_bytes)
    per.update({k: float(v) for k, v in spec.resources.items()})
    return RoleAsk(role, count, {k: v for k, v in per.items() if v > 0}, fields)


def job_asks(
    cluster: ClusterConfig,
    num_ps: int,
    *,
    nn_actors: bool | None = None,
    loaders: bool = True,
) -> list[RoleAsk]:
    """What a job with these settings asks Ray for, role by role.

    Args:
        cluster: the settings.
        num_ps: the parameter servers (``cluster.num_ps``, else the embedding spec's shards).
        nn_actors: whether the NN workers are actors (default: ``num_nn_workers > 1``).
        loaders: count the data-loader actors (False: only what a runtime starts).
    """
    if nn_actors is None:
        nn_actors = cluster.num_nn_workers > 1
    out = [_ask("parameter servers", num_ps, cluster.ps, "--ps-cpus / ClusterConfig.ps")]
    if cluster.num_embedding_workers:
        out.append(
            _ask(
                "embedding workers",
                cluster.num_embedding_workers,
                cluster.embedding_workers,
                "--embedding-worker-cpus / ClusterConfig.embedding_workers",
            )
        )
    if nn_actors:
        out.append(
            _ask(
                "NN workers",
                cluster.num_nn_workers,
                cluster.nn_workers,
                "--nn-cpus / ClusterConfig.nn_workers",
            )
        )
    if loaders and cluster.num_data_loaders:
        out.append(
            _ask(
                "data loaders",
                cluster.num_data_loaders,
                cluster.data_loaders,
                "--loader-cpus / ClusterConfig.data_loaders",
            )
        )
    return out


def _fmt(resource: str, amount: float) -> str:
    if resource == "memory":
        return f"{amount / 2**30:.3g} GiB"
    return f"{amount:g}"


def shortfalls(
    asks: Sequence[RoleAsk],
    total: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    free: Mapping[str, float] | None = None,
    free_nodes: Sequence[Mapping[str, float]] | None = None,
) -> list[str]:
    """What the cluster cannot give the job: one line per short resource (in total) and per
    role whose one replica fits no node. Empty when the job fits.

    Args:
        asks: the job's roles (:func:`job_asks`).
        total: the cluster's resources summed over its nodes (``ray.cluster_resources()``).
        nodes: each node's resources (for the per-replica check).
        free: what is free now, summed over the nodes (``ray.available_resources()``; None:
            everything, i.e. ``total``). A resource short of ``free`` but not of ``total`` is
            reported with both amounts.
        free_nodes: what is free now on each node (None: ``nodes``).
    """
    problems = []
    free = total if free is None else free
    free_nodes = nodes if free_nodes is None else free_nodes
    needed: dict[str, list[RoleAsk]] = {}
    for ask in asks:
        for res in ask.per_replica:
            needed.setdefault(res, []).append(ask)
    for res, roles in needed.items():
        need = sum(a.count * a.per_replica[res] for a in roles)
        have = float(total.get(res, 0.0))
        have_free = min(float(free.get(res, 0.0)), have)
        if need <= have_free + _EPS:
            continue
        parts = ", ".join(
            f"{a.role} {a.count} x {_fmt(res, a.per_replica[res])}" for a in roles if a.count
        )
        fields = "; ".join(a.fields for a in roles if a.count)
        if need > have + _EPS:
            problems.append(
                f"{res}: the job asks Ray for {_fmt(res, need)} ({parts}), the cluster has "
                f"{_fmt(res, have)}: short by {_fmt(res, need - have)}. Ask less per replica "
                f"({fields}), run fewer replicas, or add nodes with {res}"
            )
        else:
            problems.append(
                f"{res}: the job asks Ray for {_fmt(res, need)} ({parts}), the cluster has "
                f"{_fmt(res, have_free)} free of {_fmt(res, have)} (other actors hold "
                f"{_fmt(res, have - have_free)}): short by {_fmt(res, need - have_free)}. Wait "
                f"for them to end, ask less per replica ({fields}), run fewer replicas, or add "
                f"nodes with {res}"
            )
    for ask in asks:
        if not ask.count:
            continue
        for res, per in ask.per_replica.items():
            largest = max((float(n.get(res, 0.0)) for n in nodes), default=0.0)
            largest_free = max((float(n.get(res, 0.0)) for n in free_nodes), default=0.0)
            if per > largest + _EPS and per <= float(total.get(res, 0.0)) + _EPS:
                problems.append(
                    f"{res}: each of the {ask.role} asks for {_fmt(res, per)}, but no node has "
                    f"more than {_fmt(res, largest)} ({ask.fields})"
                )
            elif (
                largest + _EPS >= per > largest_free + _EPS
                and per <= float(free.get(res, 0.0)) + _EPS
            ):
                problems.append(
                    f"{res}: each of the {ask.role} asks for {_fmt(res, per)}, but no node has "
                    f"more than {_fmt(res, largest_free)} free now ({ask.fields})"
                )
    return problems


def _cluster_resources() -> tuple[
    dict[str, float], list[dict[str, float]], dict[str, float], list[dict[str, float]]
]:
    """(total, each node's total, free now, each node's free now) of the connected cluster."""
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    alive = [n for n in ray.nodes() if n.get("Alive", True)]
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in alive]
    free = {k: float(v) for k, v in ray.available_resources().items()}
    try:  # Ray has no public per-node view of free resources
        from ray._private.state import available_resources_per_node

        per_node = available_resources_per_node()
        free_nodes = [
            {k: float(v) for k, v in per_node.get(n.get("NodeID"), {}).items()} for n in alive
        ]
    except Exception:  # noqa: BLE001 - without it, each node's total stands in
        free_nodes = nodes
    return total, nodes, free, free_nodes


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems, source="the Ray cluster's resources")


#: How long a shortfall may last before it is an error, when the job fits the cluster's total
#: (resources of just-ended actors come back a moment later) or the cluster was joined by
#: address (a worker node started just before the driver may not have joined yet).
GRACE_S = 10.0


def _check(cluster: ClusterConfig, asks: Sequence[RoleAsk]) -> None:
    """Raises the shortfalls of ``asks`` against what is free: at once when the job is larger
    than the whole of a cluster persia started itself; otherwise only once they persist for
    :data:`GRACE_S` (capped by the cluster timeout)."""
    resources = _cluster_resources()
    problems = shortfalls(asks, *resources)
    joined = bool(cluster.address or _settings.ray_address())
    beyond_total = bool(shortfalls(asks, resources[0], resources[1]))
    if problems and (joined or not beyond_total):
        deadline = time.monotonic() + min(GRACE_S, cluster.resolved_timeout_s())
        while problems and time.monotonic() < deadline:
            time.sleep(0.5)
            problems = shortfalls(asks, *_cluster_resources())
    _raise(problems)


def check_job_fits(cluster: ClusterConfig, num_ps: int) -> None:
    """Raises :class:`ConfigError` when the whole job (parameter servers, embedding workers, NN
    workers if actors, data loaders) cannot be placed on the connected Ray cluster."""
    _check(cluster, job_asks(cluster, num_ps))


def check_runtime_fits(cluster: ClusterConfig, num_ps: int) -> None:
    """Raises :class:`ConfigError` when the actors one runtime starts (parameter servers and
    embedding workers) cannot be placed on the connected Ray cluster."""
    _check(cluster, job_asks(cluster, num_ps, nn_actors=False, loaders=False))


def local_cluster_cpus(
    cluster: ClusterConfig, asks: Sequence[RoleAsk], machine_cpus: int | None = None
) -> int | None:
    """The CPUs of a Ray cluster persia is about to start for ``asks``: ``cluster.num_cpus``
    when given; else, when the CPUs the job asks in all (rounded up) are more than the machine's
    (``machine_cpus``, default the CPUs this process may run on), that many; else None (Ray
    counts them itself, as it does when joining a cluster)."""
    if cluster.num_cpus is not None:
        return int(cluster.num_cpus)
    if cluster.address or _settings.ray_address():
        return None
    if machine_cpus is None:
        affinity = getattr(os, "sched_getaffinity", None)
        machine_cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    asked = math.ceil(sum(a.count * a.per_replica.get("CPU", 0.0) for a in asks) - _EPS)
    return asked if asked > machine_cpus else None
