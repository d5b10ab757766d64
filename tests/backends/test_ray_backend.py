"""The Ray backend: parameter-server actors against the embedded backend, failures, store ops."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime._jobs import ListDataset, Net, make_batches, run, train_ctx

from persia.backends.ray.backend import ClusterConfig, RayStore
from persia.checkpoint.job import read as read_checkpoint
from persia.checkpoint.job import restore_store
from persia.ctx import eval_ctx
from persia.data import DataLoader
from persia.embedding.optim import Adagrad
from persia.errors import BackendError, ConfigError, PersiaError
from persia.store import ShardedStore

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_config_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        ClusterConfig(num_ps=0, ps_num_cpus=-1, transport="grpc", timeout_s=0)
    assert len(info.value.problems) == 4
    with pytest.raises(PersiaError, match="backend must be"):
        train_ctx(Net(), backend="mpi")
    with pytest.raises(PersiaError, match="cluster= needs backend='ray'"):
        train_ctx(Net(), cluster=ClusterConfig())


@pytest.mark.parametrize("transport", ["zmq", "ray"])
def test_synchronous_run_is_bit_identical_to_the_local_backend(ray_cluster, transport, tmp_path):
    batches = make_batches(12, seed=4)
    with train_ctx(Net()) as ctx:
        local = run(ctx, batches)
        ctx.dump_checkpoint(tmp_path / "local")
        local_rows = ctx.get_embedding_size()
    cluster = ClusterConfig(num_ps=2, transport=transport, timeout_s=30)
    with train_ctx(Net(), backend="ray", cluster=cluster) as ctx:
        remote = run(ctx, batches)
        assert isinstance(ctx.runtime.store, RayStore)
        assert sum(ctx.get_embedding_size()) == sum(local_rows)
        ctx.dump_checkpoint(tmp_path / "ray")
        with eval_ctx() as ectx:  # reuses the cluster runtime; eval lookups create nothing
            rows_before = sum(ectx.get_embedding_size())
            for b in DataLoader(ListDataset(make_batches(2, seed=99), requires_grad=False)):
                ectx.forward  # noqa: B018 - eval lookups ran in the loader
                assert b.staleness is None
            assert sum(ectx.get_embedding_size()) == rows_before
    assert remote == local
    # The cluster's checkpoint has the store's layout: it loads into a local 3-shard store.
    a = ShardedStore(3, 1000, Adagrad(lr=0.1), dims=[4])
    b = ShardedStore(3, 1000, Adagrad(lr=0.1), dims=[4])
    restore_store(a, read_checkpoint(tmp_path / "local"))
    restore_store(b, read_checkpoint(tmp_path / "ray"))
    keys = np.concatenate([s.export_rows()[4]["keys"] for s in a.shards])
    np.testing.assert_array_equal(a.lookup(keys, 4, False), b.lookup(keys, 4, False))


def test_load_and_clear_go_to_the_actors(ray_cluster, tmp_path):
    batches = make_batches(4, seed=1)
    with train_ctx(Net()) as ctx:
        run(ctx, batches)
        ctx.dump_checkpoint(tmp_path)
        want = ctx.get_embedding_size()
    with train_ctx(Net(), backend="ray", cluster=ClusterConfig(num_ps=2)) as ctx:
        assert sum(ctx.get_embedding_size()) == 0
        ctx.load_checkpoint(tmp_path)
        assert sum(ctx.get_embedding_size()) == sum(want)
        stats = ctx.runtime.store.stats()
        assert stats["num_shards"] == 2 and stats["rows"] == sum(want)
        ctx.clear_embeddings()
        assert ctx.get_embedding_size() == [0, 0]


@pytest.mark.parametrize("transport", ["zmq", "ray"])
def test_a_killed_parameter_server_ends_the_run_with_a_typed_error(ray_cluster, transport):
    timeout_s = 5.0
    cluster = ClusterConfig(num_ps=2, transport=transport, timeout_s=timeout_s)
    batches = make_batches(400, seed=2)
    killed_at = None
    # Both the lookup thread and the gradient applier may see the dead shard first; either way
    # the loop (or the context's exit, which flushes) ends with the typed error, not a hang.
    with pytest.raises(BackendError) as info:
        with train_ctx(Net(), backend="ray", cluster=cluster) as ctx:
            for i, b in enumerate(DataLoader(ListDataset(batches), embedding_staleness=2)):
                out, labels = ctx.forward(b)
                ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))
                if i == 5:
                    ray_cluster.kill(ctx.runtime.store.actors[1])
                    killed_at = time.perf_counter()
    assert killed_at is not None, f"failed before the kill (a loaded machine?): {info.value!r}"
    assert time.perf_counter() - killed_at < timeout_s + 2
    assert info.value.role == "parameter-server" and info.value.rank == 1


ADULT = ROOT / "examples" / "adult_income" / "job.yaml"


@pytest.mark.slow
def test_adult_job_on_two_parameter_servers_matches_the_local_backend(ray_cluster):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    overrides = ["training.staleness=1", "training.reproducible=true", "training.progress=none"]
    local = run_job(load_job(ADULT, [*overrides, "training.backend=local"]))
    job = load_job(ADULT, [*overrides, "training.backend=ray"])
    remote = run_job(job, cluster=ClusterConfig(num_ps=2, timeout_s=60))
    assert remote["test_auc"] >= 0.90
    assert abs(remote["test_auc"] - local["test_auc"]) <= 1e-4
    assert remote["train_samples"] == local["train_samples"]
    assert remote["embedding_rows"] == local["embedding_rows"]
    assert remote["staleness_max"] == 0  # staleness 1: every batch saw every earlier gradient


def test_persia_train_cli_joins_a_running_cluster(ray_cluster):
    import json
    import os
    import subprocess
    import sys

    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "persia.cli.main",
        "train",
        str(ADULT),
        "--backend",
        "ray",
        "--num-ps",
        "2",
        "--address",
        address,
        "--set",
        "training.max_samples=1500",
        "--progress",
        "none",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["train_samples"] == 1500 and result["test_auc"] > 0.5
    bad = subprocess.run(
        [sys.executable, "-m", "persia.cli.main", "train", str(ADULT), "--num-ps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--num-ps need --backend ray" in bad.stderr
