"""A job file's training loop on the Ray backend (``persia train JOB --backend ray``).

:func:`run_job` is handed the job's training loop as a plain function
(:func:`persia.job.runner.train_loop`) and places it: with one NN worker it runs here, in the
driver, over parameter-server actors (and embedding-worker and data-loader actors when
``ClusterConfig`` asks for them); with several it runs in each NN-worker actor of a DDP group
(:func:`persia.backends.ray.ddp.run_job_ddp`). With ``ClusterConfig(recover=...)`` the parameter
servers write incremental deltas that a dead shard is restored from
(:mod:`persia.backends.ray.recovery`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from persia.backends.ray.backend import ClusterConfig, init_ray, new_job_id
from persia.backends.ray.recovery import RecoveryConfig
from persia.backends.ray.stream import stream_of
from persia.errors import ConfigError

__all__ = ["run_job"]


def run_job(
    train_fn: Callable[..., dict[str, Any]],
    job: Any,
    *,
    cluster: ClusterConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Runs ``train_fn(job, cluster=..., **options)`` as ``cluster`` places it.

    ``options`` are those of :func:`persia.job.runner.train_loop` (``stderr``, ``resume``,
    ``on_trained``); this adds ``stream`` / ``on_data_end`` (data-loader actors) and
    ``incremental_dir`` (recovery).

    Raises:
        ConfigError: checkpoints or ``--resume`` with data-loader actors; a job the Ray cluster
            cannot hold (:mod:`persia.backends.ray.planning`), before any actor starts.
    """
    t = job.training
    if cluster is not None and cluster.num_data_loaders > 0:
        if options.get("resume") is not None or t.checkpoint_dir:
            raise ConfigError(
                "--resume and training.checkpoint_dir are not supported with num_data_loaders > 0"
            )
    if cluster is not None:  # before any actor starts: can the cluster hold the whole job?
        from persia.backends.ray.planning import check_job_fits, job_asks, local_cluster_cpus
        from persia.ctx._stack import close_last_runtime

        close_last_runtime("job")  # the previous job's servers give their resources back

        num_ps = cluster.num_ps if cluster.num_ps is not None else job.embedding.shards
        init_ray(cluster.address, local_cluster_cpus(cluster, job_asks(cluster, num_ps)))
        check_job_fits(cluster, num_ps)
    if cluster is not None and cluster.num_nn_workers > 1:  # (ClusterConfig refuses recover)
        from persia.backends.ray.ddp import run_job_ddp

        return run_job_ddp(train_fn, job, cluster, **options)
    loaders: list[Any] = []
    scratch: str | None = None
    try:
        if cluster is not None and cluster.num_data_loaders > 0:
            cluster, loaders = _with_data_loaders(job, cluster, options)
        if cluster is not None and cluster.recover:
            cluster, incremental_dir, scratch = _with_recovery(job, cluster)
            options["incremental_dir"] = incremental_dir
        return train_fn(job, cluster=cluster, **options)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if loaders:
            from persia.backends.ray.loaders import stop_data_loaders

            stop_data_loaders(loaders)


def _with_data_loaders(
    job: Any, cluster: ClusterConfig, options: dict[str, Any]
) -> tuple[ClusterConfig, list[Any]]:
    """Starts the job's data-loader actors (unless this process is one NN worker of a group
    whose driver started them) and sets ``options``' stream to their channel."""
    from persia.backends.ray.loaders import data_channel, start_data_loaders, wait_data_loaders

    loaders: list[Any] = []
    if cluster.data_channel is None:  # this process is the only NN worker: start them
        init_ray(cluster.address, cluster.num_cpus)
        job_name = cluster.job_name or new_job_id()
        cluster = cluster.replace(job_name=job_name)
        loaders = start_data_loaders(job, cluster, job_name)
        cluster = cluster.wired(data_channel=data_channel(job_name, 0))
        timeout_s = cluster.resolved_timeout_s()
        options["on_data_end"] = lambda: wait_data_loaders(loaders, timeout_s)
    options["stream"] = stream_of(cluster)
    return cluster, loaders


def _with_recovery(job: Any, cluster: ClusterConfig) -> tuple[ClusterConfig, str, str | None]:
    """Recovery restores a dead shard from the newest checkpoint in ``training.checkpoint_dir``
    (if any) plus the deltas written since: kept beside the checkpoints, or in a scratch folder
    for this run. Returns the cluster settings, the delta folder and the scratch folder."""
    t = job.training
    recover = cluster.recover if isinstance(cluster.recover, RecoveryConfig) else None
    if recover is None or (recover.checkpoint_dir is None and t.checkpoint_dir):
        base = recover or RecoveryConfig()
        cluster = cluster.replace(recover=replace(base, checkpoint_dir=t.checkpoint_dir))
    if t.checkpoint_dir:
        return cluster, str(Path(t.checkpoint_dir) / "incremental"), None
    scratch = tempfile.mkdtemp(prefix="persia-deltas-")
    return cluster, scratch, scratch
