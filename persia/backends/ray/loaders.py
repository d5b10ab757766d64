"""Data loaders as Ray actors of ``persia train JOB --backend ray --num-data-loaders D``.

Each of the D :class:`DataLoaderActor` actors reads the job's training input with the job's own
reader (:class:`persia.job.readers.JobReader`, same batch size, seeds and ``max_samples`` as the
NN worker would use) and keeps the batches ``i`` with ``i % D == d`` of every epoch (rank-strided
over the job's batches), then hands them to an NN worker through the stream machinery of
:mod:`persia.backends.ray.stream` (``PersiaBatch.to_arrays`` over ZeroMQ, no pickle).

With W NN workers (DDP), D must be a multiple of W: NN worker ``r`` pulls from its own channel
``<job>-data-<r>``, fed by the loaders ``d`` with ``d % W == r``, so it receives exactly the
batches ``i % W == r``. Each loader sends a batch only once the group of W batches holding it is
complete, so a trailing group of fewer than W batches is dropped and every NN worker trains as
many batches (as :func:`persia.job.runner._rank_strided` does without loaders): DDP's allreduce
cannot wait on a rank that has run out of data.
"""

from __future__ import annotations

from typing import Any

from persia.backends.ray.naming import loader_actor_name, namespace
from persia.errors import ConfigError

__all__ = [
    "DataLoaderActor",
    "check_loader_config",
    "data_channel",
    "loader_batches",
    "start_data_loaders",
    "stop_data_loaders",
    "wait_data_loaders",
]


def data_channel(job_name: str, nn_rank: int) -> str:
    """The stream channel NN worker ``nn_rank`` of ``job_name`` pulls its batches from."""
    return f"{job_name}-data-{nn_rank}"


def check_loader_config(num_data_loaders: int, num_nn_workers: int) -> None:
    """Raises :class:`ConfigError` for a loader count that cannot feed ``num_nn_workers``."""
    if num_data_loaders > 0 and num_data_loaders % num_nn_workers:
        raise ConfigError(
            f"num_data_loaders must be a multiple of num_nn_workers={num_nn_workers} (each NN "
            f"worker pulls from its own loaders), got {num_data_loaders}",
            source="num_data_loaders",
        )


def loader_batches(batches: Any, index: int, size: int, world: int) -> Any:
    """Batch ``i`` of ``batches`` when ``i % size == index``, held back until the group of
    ``world`` batches holding it is complete (a trailing group of fewer is dropped)."""
    pending: list[Any] = []
    for i, batch in enumerate(batches):
        if i % size == index:
            pending.append(batch)
        if i % world == world - 1:
            yield from pending
            pending = []


def _job_batches(job: Any, index: int, size: int, world: int) -> Any:
    """The batches loader ``index`` of ``size`` sends, over every epoch of the job."""
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
        yield from loader_batches(counted, index, size, world)
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
    """

    def __init__(self, index: int, size: int, world: int, bind_host: str | None) -> None:
        self.index, self.size, self.world, self.bind_host = index, size, world, bind_host

    def run(self, job: Any, job_name: str, timeout_s: float) -> int:
        """Sends this loader's batches to its NN worker; returns how many it sent."""
        from persia import _settings

        _settings.ensure_numba_cache_dir()
        import ray

        from persia.backends.ray.stream import StreamSender

        host = self.bind_host or ray.util.get_node_ip_address()
        per_worker = self.size // self.world
        sender = StreamSender(
            replica_index=self.index // self.world,
            replica_size=per_worker,
            channel=data_channel(job_name, self.index % self.world),
            consumers=1,
            bind_host=host,
            timeout_s=timeout_s,
        )
        try:
            for batch in _job_batches(job, self.index, self.size, self.world):
                sender.send(batch)
        finally:
            sender.close()
        return sender.sent


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
    # the stream's read side waits longer than the slowest training step; the job's timeout
    # bounds how long a loader waits for its NN worker to ask for the next batch
    timeout_s = max(cluster.resolved_timeout_s(), 600.0)
    out = []
    for d in range(size):
        actor = actor_cls.options(
            name=loader_actor_name(job_name, d), namespace=namespace(), **options
        ).remote(d, size, world, bind_host)
        out.append((actor, actor.run.remote(job, job_name, timeout_s)))
    return out


def wait_data_loaders(loaders: list[tuple[Any, Any]], timeout_s: float) -> int:
    """Waits for every loader to finish; returns the batches they sent together.

    Raises:
        BackendError: a loader failed, died or did not finish within ``timeout_s``.
    """
    from persia.backends.ray.backend import get_with_timeout
    from persia.backends.ray.stream import DATA_LOADER

    return sum(
        int(get_with_timeout(ref, timeout_s, DATA_LOADER, d)) for d, (_, ref) in enumerate(loaders)
    )


def stop_data_loaders(loaders: list[tuple[Any, Any]]) -> None:
    """Kills the loader actors (those still running after a failure)."""
    import ray

    for actor, _ in loaders:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
