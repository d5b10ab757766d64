"""Data loaders as Ray actors of ``persia train JOB --backend ray --num-data-loaders D``.

Each of the D :class:`DataLoaderActor` actors reads the job's training input with the job's own
reader (:class:`persia.job.readers.JobReader`, same batch size, seeds and ``max_samples`` as the
NN worker would use) and keeps the batches ``i`` with ``i % D == d`` of every epoch (rank-strided
over the job's batches), then hands them to an NN worker through the stream machinery of
:mod:`persia.backends.ray.stream` (``PersiaBatch.to_arrays`` over ZeroMQ, no pickle).

Any D feeds any number W of NN workers (DDP), as in PERSIA. The rule:

* batch ``i`` of an epoch is built by loader ``i % D`` and trained by NN worker ``i % W``, the
  same batches each NN worker reads without loaders (:func:`persia.job.runner._rank_strided`);
* a *round* is W consecutive batches (one per NN worker); a batch is sent only once its round is
  complete, so **the last incomplete round of each epoch is dropped** and every NN worker trains
  as many batches (DDP's allreduce cannot wait on a rank that has run out of data). An epoch of
  B batches trains ``B - B % W`` of them;
* NN worker ``r`` pulls from its own channel ``<job>-data-<r>``. With ``g = gcd(D, W)``, loader
  ``d`` feeds the W / g channels ``r`` with ``r % g == d % g`` and each channel is fed by D / g
  loaders, so no loader sits idle (as long as an epoch has at least D batches) and no NN worker
  waits on a loader that has nothing for it.
"""

from __future__ import annotations

import math
from typing import Any

from persia.backends.ray.naming import loader_actor_name, namespace
from persia.errors import ConfigError

__all__ = [
    "DataLoaderActor",
    "check_loader_config",
    "data_channel",
    "loader_batches",
    "loader_channels",
    "loader_routes",
    "start_data_loaders",
    "stop_data_loaders",
    "wait_data_loaders",
]


def data_channel(job_name: str, nn_rank: int) -> str:
    """The stream channel NN worker ``nn_rank`` of ``job_name`` pulls its batches from."""
    return f"{job_name}-data-{nn_rank}"


def check_loader_config(num_data_loaders: int, num_nn_workers: int) -> None:
    """Raises :class:`ConfigError` for counts no rule can serve (negative loaders, no NN
    worker); any ``num_data_loaders >= 0`` feeds any ``num_nn_workers >= 1``."""
    if num_data_loaders < 0 or num_nn_workers < 1:
        raise ConfigError(
            f"num_data_loaders must be >= 0 and num_nn_workers >= 1, got {num_data_loaders} "
            f"and {num_nn_workers}",
            source="num_data_loaders",
        )


def loader_channels(index: int, size: int, world: int) -> list[int]:
    """The NN workers (channels) loader ``index`` of ``size`` feeds: ``r % g == index % g``,
    ``g = gcd(size, world)``."""
    g = math.gcd(size, world)
    return [r for r in range(world) if r % g == index % g]


def loader_routes(batches: Any, index: int, size: int, world: int) -> Any:
    """``(i % world, batch i)`` for the batches ``i % size == index`` of ``batches``, each held
    back until its round of ``world`` batches is complete (the last incomplete round is
    dropped)."""
    pending: list[tuple[int, Any]] = []
    for i, batch in enumerate(batches):
        if i % size == index:
            pending.append((i % world, batch))
        if i % world == world - 1:
            yield from pending
            pending = []


def loader_batches(batches: Any, index: int, size: int, world: int) -> Any:
    """The batches of :func:`loader_routes`, without their NN worker."""
    for _, batch in loader_routes(batches, index, size, world):
        yield batch


def _job_batches(job: Any, index: int, size: int, world: int) -> Any:
    """``(NN worker, batch)`` for the batches loader ``index`` of ``size`` sends, over every
    epoch of the job."""
    from persia.job.readers import JobReader

    t = job.training
    reader = JobReader(job.data)
    produced = 0
    for epoch in range(t.epochs):
        left = None if t.max_samples is None else t.max_samples - produced
        if left is not None and left <= 0:
            return
        counted = _Counted(
            reader.batches(
                job.data.train, t.batch_size, training=True, seed=t.seed + epoch, max_samples=left
            )
        )
        yield from loader_routes(counted, index, size, world)
        produced += counted.samples


class _Counted:
    """Iterates ``batches``, counting their samples (all of them, sent here or not)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches
        self.samples = 0

    def __iter__(self) -> Any:
        for batch in self.batches:
            self.samples += batch.batch_size
            yield batch


class DataLoaderActor:
    """One data loader (a Ray actor started by :func:`start_data_loaders`).

    Args:
        index: this loader's rank among the D loaders.
        size: D.
        world: the number of NN workers.
        bind_host: the address its ZeroMQ socket binds (None: the node's Ray address).
        security: its channel's mechanism (``ClusterConfig.channel_security``).
        metrics: where to push this actor's metrics (None: metrics off here).
    """

    def __init__(
        self,
        index: int,
        size: int,
        world: int,
        bind_host: str | None,
        security: str = "curve",
        metrics: dict[str, Any] | None = None,
    ) -> None:
        self.index, self.size, self.world, self.bind_host = index, size, world, bind_host
        self.security = security
        if metrics is not None:
            from persia import telemetry

            telemetry.configure(telemetry.LOADER, index, push=metrics)

    def run(self, job: Any, job_name: str, timeout_s: float) -> int:
        """Sends this loader's batches to their NN workers (module doc); returns how many it
        sent."""
        from persia import _settings

        _settings.ensure_numba_cache_dir()
        import ray

        from persia.backends.ray.stream import StreamSender

        host = self.bind_host or ray.util.get_node_ip_address()
        g = math.gcd(self.size, self.world)
        senders: dict[int, Any] = {}
        try:
            for r in loader_channels(self.index, self.size, self.world):
                senders[r] = StreamSender(
                    replica_index=self.index // g,
                    replica_size=self.size // g,
                    channel=data_channel(job_name, r),
                    consumers=1,
                    bind_host=host,
                    timeout_s=timeout_s,
                    security=self.security,
                )
            for r, batch in _job_batches(job, self.index, self.size, self.world):
                senders[r].send(batch)
        finally:
            for sender in senders.values():
                sender.close()
            from persia import telemetry

            telemetry.push_now()  # the last push: the loader is done
        return sum(sender.sent for sender in senders.values())


def start_data_loaders(job: Any, cluster: Any, job_name: str) -> list[tuple[Any, Any]]:
    """Starts ``cluster.num_data_loaders`` loader actors for ``job``; returns (actor, the ref
    of its run) pairs for :func:`wait_data_loaders`."""

    import ray

    from persia import _settings

    world = cluster.num_nn_workers
    size = cluster.num_data_loaders
    check_loader_config(size, world)
    bind_host = cluster.bind_host
    if bind_host is None and not (cluster.address or _settings.ray_address()):
        bind_host = "127.0.0.1"  # a local cluster started by persia: loopback only
    options: dict[str, Any] = {"num_cpus": cluster.loader_num_cpus, "max_restarts": 0}
    if cluster.loader_resources:
        options["resources"] = dict(cluster.loader_resources)
    actor_cls: Any = ray.remote(DataLoaderActor)
    from persia import telemetry

    metrics = telemetry.settings()  # each actor pushes its own, where this process does
    # the stream's read side waits longer than the slowest training step; the job's timeout
    # bounds how long a loader waits for its NN worker to ask for the next batch
    timeout_s = max(cluster.resolved_timeout_s(), 600.0)
    out = []
    for d in range(size):
        actor = actor_cls.options(
            name=loader_actor_name(job_name, d), namespace=namespace(), **options
        ).remote(d, size, world, bind_host, cluster.channel_security, metrics)
        out.append((actor, actor.run.remote(job, job_name, timeout_s)))
    return out


def wait_data_loaders(loaders: list[tuple[Any, Any]], timeout_s: float) -> list[int]:
    """Waits for every loader to finish; returns the batches each sent.

    Raises:
        BackendError: a loader failed, died or did not finish within ``timeout_s``.
    """
    from persia.backends.ray.backend import get_with_timeout
    from persia.backends.ray.stream import DATA_LOADER

    return [
        int(get_with_timeout(ref, timeout_s, DATA_LOADER, d)) for d, (_, ref) in enumerate(loaders)
    ]


def stop_data_loaders(loaders: list[tuple[Any, Any]]) -> None:
    """Kills the loader actors (those still running after a failure)."""
    import ray

    for actor, _ in loaders:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
