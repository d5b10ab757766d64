"""Embedding workers as Ray actors: same losses as the local backend, DDP Adult job, failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from runtime._jobs import Net, make_batches, run, train_ctx

from persia.backends.ray.backend import ClusterConfig
from persia.errors import BackendError, ConfigError

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"


def test_cluster_config_checks_the_embedding_worker_fields():
    with pytest.raises(ConfigError) as info:
        ClusterConfig(num_embedding_workers=-1, ew_num_cpus=-1)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError, match="recover"):
        ClusterConfig(num_embedding_workers=1, recover=True)


@pytest.mark.parametrize("num_ew", [1, 2])
def test_losses_match_the_local_backend_with_embedding_worker_actors(ray_cluster, num_ew):
    from persia.backends.ray.embedding_workers import RemoteEmbeddingWorker

    batches = make_batches(10, seed=7)
    torch.manual_seed(0)
    with train_ctx(Net()) as ctx:
        local = run(ctx, batches)
        local_rows = sum(ctx.get_embedding_size())
    torch.manual_seed(0)
    cluster = ClusterConfig(num_ps=2, num_embedding_workers=num_ew, ew_num_cpus=0.1, timeout_s=30)
    with train_ctx(Net(), backend="ray", cluster=cluster) as ctx:
        remote = run(ctx, batches)
        worker = ctx.runtime.worker
        assert isinstance(worker, RemoteEmbeddingWorker)
        assert len(worker.actors) == num_ew
        assert sum(ctx.get_embedding_size()) == local_rows
        ctx.runtime.flush(30)
        stats = worker.stats()
        # every context was dropped after its backward; batches went round robin
        assert [s["contexts"] for s in stats] == [0] * num_ew
        assert [s["backward_batches"] for s in stats] == [10 // num_ew] * num_ew
        assert all(s["expired"] == 0 for s in stats)
        actors = list(worker.actors)
        runtime = ctx.runtime
    assert remote == local
    runtime.close()  # the runtime that started the actors stops them
    for a in actors:  # ray.kill is asynchronous: wait (bounded) until each actor is gone
        deadline = time.monotonic() + 20
        while True:
            try:
                ray_cluster.get(a.ping.remote(), timeout=5)
            except Exception:  # Ray's actor-died (or timeout) error: stopped
                break
            assert time.monotonic() < deadline, "an embedding-worker actor outlived its runtime"
            time.sleep(0.2)


def test_a_dead_embedding_worker_actor_is_a_typed_error(ray_cluster):
    batches = make_batches(6, seed=3)
    cluster = ClusterConfig(num_ps=1, num_embedding_workers=2, ew_num_cpus=0.1, timeout_s=20)
    with train_ctx(Net(), backend="ray", cluster=cluster) as ctx:
        run(ctx, batches[:2])
        ctx.runtime.flush(20)
        ray_cluster.kill(ctx.runtime.worker.actors[1])
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"embedding-worker\[1\]") as info:
            run(ctx, batches[2:])
        assert time.monotonic() - t0 < 20
        assert (info.value.role, info.value.rank) == ("embedding-worker", 1)


def test_adult_job_two_ps_one_embedding_worker_two_ddp_nn_workers(ray_cluster):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    job = load_job(ADULT, ["training.backend=ray", "training.progress=none"])
    cluster = ClusterConfig(
        num_ps=2,
        num_embedding_workers=1,
        num_nn_workers=2,
        num_data_loaders=2,
        ps_num_cpus=0.1,
        ew_num_cpus=0.1,
        nn_num_cpus=0.2,
        loader_num_cpus=0.1,
        timeout_s=120,
    )
    result = run_job(job, cluster=cluster)
    print("adult, 2 PS, 1 EW, 2 NN, 2 loaders:", result["test_auc"], result["wall_s"])
    assert result["test_auc"] >= 0.90
    assert [w["train_batches"] for w in result["nn_workers"]] == [127, 127]
    # every training batch of both NN workers went through the one embedding-worker actor
    (ew,) = result["embedding_workers"]
    assert ew["backward_batches"] == 254
    assert ew["forward_batches"] >= 254
    assert (ew["contexts"], ew["expired"]) == (0, 0)


def test_persia_train_option_becomes_the_cluster_config():
    import argparse

    from persia.cli.train import add_parser, cluster_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "j.yaml", "--num-embedding-workers", "2", "--embedding-worker-cpus", "0.1"]
    )
    cfg = cluster_config(args, "ray")
    assert (cfg.num_embedding_workers, cfg.ew_num_cpus) == (2, 0.1)
    with pytest.raises(ConfigError, match="--num-embedding-workers need --backend ray"):
        cluster_config(
            parser.parse_args(["train", "j.yaml", "--num-embedding-workers", "2"]), "local"
        )
