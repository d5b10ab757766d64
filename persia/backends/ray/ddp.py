"""Several NN workers on the cluster backend: Ray actors forming one DDP (gloo) group.

:func:`run_job_ddp` is ``persia train JOB --backend ray --num-nn-workers W``:

* the driver (this process) starts the job's parameter-server actors once, named
  ``persia-<job>-ps-<rank>``, and keeps them until every NN worker is done;
* W :class:`NNWorker` actors (``ClusterConfig.nn_num_cpus`` each, fractional by default, plus
  ``nn_resources`` for placement) each run the job's training loop (the function handed to
  :func:`run_job_ddp`, :func:`persia.job.runner.train_loop`) with ``RANK`` / ``WORLD_SIZE`` set: each one joins the
  parameter servers by name (``ClusterConfig.attach_ps``), has its own embedding worker, lookup
  thread, applier and staleness gate (the staleness bound holds per NN worker), reads the
  batches ``i`` with ``i % W == rank`` of each epoch, and wraps the dense model in
  DistributedDataParallel over a gloo group whose master is rank 0's node address and a free
  port there. A trailing group of fewer than W batches is dropped, so every rank trains the
  same number of batches (DDP's allreduce needs every rank at every step);
* checkpoints (``training.checkpoint_dir``): at each checkpoint every NN worker applies its
  pending gradients, then rank 0 writes the checkpoint (dense model unwrapped from DDP, the
  shared embedding rows, the data position and the number of NN workers) while the others wait
  at a barrier. ``--resume`` needs as many NN workers as wrote the checkpoint: rank 0 restores the
  rows, every rank the dense model and optimizer, and each skips its own share of the batches
  already trained. The checkpoint directory must be reachable from every NN worker's node;
* ``--export DIR`` (an ``on_trained`` hook): rank 0 runs it at the end, once every rank's
  gradients are applied (DIR on rank 0's node);
* the driver waits for all of them; the first failure (an exception, a dead actor) stops every
  NN worker and ends the job with that error (a dead one as :class:`BackendError` naming
  ``nn-worker`` and its rank).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from persia import _settings
from persia.backends.ray.backend import (
    ClusterConfig,
    attach_parameter_servers,
    get_with_timeout,
    init_ray,
    new_job_id,
)
from persia.backends.ray.naming import namespace, nn_actor_name
from persia.backends.ray.stream import stream_of
from persia.errors import BackendError, CheckpointError

__all__ = ["NN_WORKER", "NNWorker", "attach_parameter_servers", "run_job_ddp"]

NN_WORKER = "nn-worker"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NNWorker:
    """One NN worker as a Ray actor (created by :func:`run_job_ddp`).

    Args:
        rank: this worker's rank in the DDP group.
        world_size: the number of NN workers.
        master_host: the address rank 0 offers the gloo rendezvous on (None: its node's Ray
            address, or 127.0.0.1 on a local cluster).
    """

    def __init__(self, rank: int, world_size: int, master_host: str | None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.master_host = master_host

    def rendezvous(self) -> tuple[str, int]:
        """(host, free port) for the gloo group's master (asked of rank 0)."""
        host = self.master_host
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        return host, _free_port(host)

    def run(
        self,
        train_fn: Callable[..., dict[str, Any]],
        job: Any,
        cluster: ClusterConfig,
        master: tuple[str, int],
        options: dict[str, Any],
    ) -> dict[str, Any]:
        """Joins the gloo group and runs ``train_fn(job, cluster=cluster, **options)`` as rank
        ``self.rank`` (options: ``resume``, ``on_trained``, ...)."""
        _settings.ensure_numba_cache_dir()
        # Writes, for torch.distributed and persia.env in this actor (reads: persia._settings).
        os.environ[_settings.RANK] = str(self.rank)
        os.environ[_settings.WORLD_SIZE] = str(self.world_size)
        os.environ[_settings.LOCAL_RANK] = str(self.rank)
        os.environ[_settings.MASTER_ADDR] = master[0]
        os.environ[_settings.MASTER_PORT] = str(master[1])
        # A gloo group binds on the interface of the master's address (never loopback by
        # accident on a multi-node cluster); a variable set empty is removed (gloo chooses).
        ifname = _settings.gloo_socket_ifname()
        if ifname is None:
            ifname = _ifname_of(master[0])
            if ifname:
                os.environ[_settings.GLOO_SOCKET_IFNAME] = ifname
        elif not ifname:
            del os.environ[_settings.GLOO_SOCKET_IFNAME]
        import torch.distributed as dist

        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    "gloo",
                    init_method=f"tcp://{master[0]}:{master[1]}",
                    rank=self.rank,
                    world_size=self.world_size,
                )
            except Exception as exc:
                raise BackendError(
                    f"could not join the dense allreduce group at {master[0]}:{master[1]}: {exc}",
                    NN_WORKER,
                    self.rank,
                ) from exc
        options = dict(options)
        if cluster.num_data_loaders > 0:  # this rank's own loaders (see _rank_cluster)
            options["stream"] = stream_of(cluster)
        try:
            return train_fn(job, cluster=cluster, **options)
        finally:
            dist.destroy_process_group()


def _ifname_of(address: str) -> str | None:
    """The network interface holding ``address`` (Linux; None when unknown)."""
    try:
        import fcntl
        import struct

        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(
                        s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15])
                    )  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == address:
                    return name
    except (OSError, ImportError, AttributeError):
        return None
    return None


def run_job_ddp(
    train_fn: Callable[..., dict[str, Any]],
    job: Any,
    cluster: ClusterConfig,
    resume: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Trains ``job`` with ``cluster.num_nn_workers`` NN-worker actors, each running
    ``train_fn`` (see the module doc); ``options`` go to ``train_fn`` (``on_trained``, ...;
    ``stderr`` stays with the driver).

    Returns:
        Rank 0's result (test metrics, final and ``evals`` during training, are computed by
        every rank on the same model between barriers; rank 0's are reported) with ``train_samples`` / ``train_batches`` summed over
        the workers, ``staleness_max`` the largest of any worker, ``samples_per_s`` all samples over the
        slowest worker's training seconds (``train_s``),
        and ``nn_workers`` each worker's own result fields (rank, samples, staleness); with
        data-loader actors, ``data_loaders_sent``: the batches each loader sent.

    Raises:
        CheckpointError: ``resume`` is not a directory, or (raised by the workers) not a
            checkpoint written by as many NN workers.
        BackendError: a dead NN worker or parameter server.
    """
    import ray

    from persia.backends.ray.runtime import ray_runtime_from_spec

    if resume is not None and not os.path.isdir(resume):
        raise CheckpointError(f"--resume: checkpoint directory {str(resume)!r} does not exist")
    resume = str(resume) if resume is not None else None
    options.pop("stderr", None)  # the workers' progress goes to their own logs
    options["resume"] = resume
    world = cluster.num_nn_workers
    init_ray(cluster.address, cluster.num_cpus)
    job_name = cluster.job_name or new_job_id()
    # The driver owns the parameter servers; its runtime stays idle until the workers finish.
    runtime = ray_runtime_from_spec(
        job.embedding, cluster=cluster.replace(job_name=job_name).wired(attach_ps=False)
    )
    worker_cluster = cluster.replace(job_name=job_name, num_nn_workers=1).wired(attach_ps=True)
    actor_options: dict[str, Any] = {"num_cpus": cluster.nn_num_cpus, "max_restarts": 0}
    if cluster.nn_resources:
        actor_options["resources"] = dict(cluster.nn_resources)
    master_host = cluster.bind_host
    if master_host is None and not (cluster.address or _settings.ray_address()):
        master_host = "127.0.0.1"
    actor_cls: Any = ray.remote(NNWorker)
    workers: list[Any] = [
        actor_cls.options(
            name=nn_actor_name(job_name, r), namespace=namespace(), **actor_options
        ).remote(r, world, master_host)
        for r in range(world)
    ]
    timeout_s = cluster.resolved_timeout_s()
    loaders: list[Any] = []
    loader_counts: list[int] | None = None
    try:
        if cluster.num_data_loaders > 0:
            from persia.backends.ray.loaders import start_data_loaders

            loaders = start_data_loaders(job, cluster.replace(job_name=job_name), job_name)
        master = get_with_timeout(workers[0].rendezvous.remote(), timeout_s, NN_WORKER, 0)
        refs = [
            w.run.remote(
                train_fn, job, _rank_cluster(worker_cluster, job_name, r), tuple(master), options
            )
            for r, w in enumerate(workers)
        ]
        results: dict[int, dict[str, Any]] = {}
        pending = {ref: r for r, ref in enumerate(refs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                rank = pending.pop(ref)
                results[rank] = get_with_timeout(ref, timeout_s, NN_WORKER, rank)
        if loaders:
            from persia.backends.ray.loaders import wait_data_loaders

            loader_counts = wait_data_loaders(loaders, timeout_s)
    finally:
        if loaders:
            from persia.backends.ray.loaders import stop_data_loaders

            stop_data_loaders(loaders)
        for w in workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        rows = None
        ew_stats = None
        try:
            rows = sum(int(s["rows"]) for s in runtime.store.shard_stats())
            if cluster.num_embedding_workers > 0:
                ew_stats = runtime.worker.stats()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - reported by the error in flight, if any
            pass
        runtime.close()
    merged = _merge(results, world, rows)
    if ew_stats is not None:
        merged["embedding_workers"] = ew_stats
    if loader_counts is not None:
        merged["data_loaders_sent"] = loader_counts
    return merged


def _rank_cluster(cluster: ClusterConfig, job_name: str, rank: int) -> ClusterConfig:
    """NN worker ``rank``'s settings: with data loaders, the channel of its own loaders."""
    if cluster.num_data_loaders == 0:
        return cluster
    from persia.backends.ray.loaders import data_channel

    return cluster.wired(data_channel=data_channel(job_name, rank))


def _merge(results: dict[int, dict[str, Any]], world: int, rows: int | None) -> dict[str, Any]:
    out = dict(results[0])
    per = [results[r] for r in range(world)]
    out["train_samples"] = sum(int(r["train_samples"]) for r in per)
    out["train_batches"] = sum(int(r["train_batches"]) for r in per)
    # the job's throughput, as each worker's (persia.job.runner): samples over training seconds
    slowest = max((float(r.get("train_s") or 0.0) for r in per), default=0.0)
    out["samples_per_s"] = out["train_samples"] / slowest if slowest > 0 else None
    out["train_s"] = slowest
    maxima = [r["staleness_max"] for r in per if r["staleness_max"] is not None]
    out["staleness_max"] = max(maxima) if maxima else None
    means = [r["staleness_mean"] for r in per if r["staleness_mean"] is not None]
    out["staleness_mean"] = sum(means) / len(means) if means else None
    if rows is not None:
        out["embedding_rows"] = rows
    out["nn_workers"] = [
        {
            "rank": r,
            "train_samples": per[r]["train_samples"],
            "train_batches": per[r]["train_batches"],
            "staleness_max": per[r]["staleness_max"],
            "staleness_mean": per[r]["staleness_mean"],
            "test_auc": per[r]["test_auc"],
        }
        for r in range(world)
    ]
    return out
