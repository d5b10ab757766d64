"""Data loaders as Ray actors of ``persia train --num-data-loaders D``."""

from __future__ import annotations

from pathlib import Path

import pytest

from persia.backends.ray.backend import ClusterConfig
from persia.backends.ray.loaders import loader_batches
from persia.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"


def _twin(n: int, index: int, size: int, world: int) -> list[int]:
    complete = n - n % world
    return [i for i in range(complete) if i % size == index]


@pytest.mark.parametrize("n", [0, 1, 7, 12, 13, 23])
@pytest.mark.parametrize(("size", "world"), [(1, 1), (2, 1), (3, 1), (2, 2), (4, 2), (6, 3)])
def test_loaders_partition_the_batches_and_every_nn_worker_gets_as_many(n, size, world):
    parts = [list(loader_batches(iter(range(n)), d, size, world)) for d in range(size)]
    assert parts == [_twin(n, d, size, world) for d in range(size)]
    per_worker = [
        sorted(sum((parts[d] for d in range(size) if d % world == r), [])) for r in range(world)
    ]
    # NN worker r gets exactly the batches i % world == r of the complete groups
    assert per_worker == [[i for i in range(n - n % world) if i % world == r] for r in range(world)]


def test_loader_counts_that_cannot_feed_the_nn_workers_are_refused():
    with pytest.raises(ConfigError, match="multiple of num_nn_workers=2"):
        ClusterConfig(num_nn_workers=2, num_data_loaders=3)
    with pytest.raises(ConfigError, match="num_data_loaders must be an int >= 0"):
        ClusterConfig(num_data_loaders=-1)


def test_persia_train_loader_options_become_the_cluster_config():
    import argparse

    from persia.cli.train import add_parser, cluster_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "j.yaml", "--num-data-loaders", "2", "--loader-cpus", "0.5"])
    cfg = cluster_config(args, "ray")
    assert (cfg.num_data_loaders, cfg.loader_num_cpus) == (2, 0.5)
    assert cluster_config(parser.parse_args(["train", "j.yaml"]), "ray").num_data_loaders == 0
    with pytest.raises(ConfigError, match="--num-data-loaders need --backend ray"):
        cluster_config(parser.parse_args(["train", "j.yaml", "--num-data-loaders", "2"]), "local")


def test_adult_job_fed_by_two_data_loader_actors(ray_cluster):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    job = load_job(ADULT, ["training.backend=ray", "training.progress=none"])
    result = run_job(job, cluster=ClusterConfig(num_ps=2, num_data_loaders=2, timeout_s=120))
    print("two data loaders:", {k: result[k] for k in ("test_auc", "wall_s", "train_samples")})
    assert result["test_auc"] >= 0.90
    # every batch of one epoch of adult.data (32 561 rows, batch 128: 255 batches), once
    assert result["train_batches"] == 255
    assert result["train_samples"] == 32561
    assert result["staleness_max"] <= 7
    # the loader actors are gone
    import ray

    names = [a.get("name", "") for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if "-loader-" in str(n)]


def test_two_ddp_nn_workers_each_fed_by_its_own_data_loader(ray_cluster):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    job = load_job(ADULT, ["training.backend=ray", "training.progress=none"])
    # small CPU requests: 2 PS + 2 NN workers + 2 loaders at the defaults would fill the 2-CPU
    # test cluster exactly, and actors of an earlier test still leaving would make them wait
    cluster = ClusterConfig(
        num_ps=2,
        num_nn_workers=2,
        num_data_loaders=2,
        nn_num_cpus=0.25,
        loader_num_cpus=0.1,
        timeout_s=120,
    )
    result = run_job(job, cluster=cluster)
    print("2 NN workers, 2 loaders:", {k: result[k] for k in ("test_auc", "wall_s")})
    assert result["test_auc"] >= 0.90
    # the same batches as the NN workers' own rank-strided reading: 127 each, the tail dropped
    assert [w["train_batches"] for w in result["nn_workers"]] == [127, 127]
    assert result["train_samples"] == 254 * 128
