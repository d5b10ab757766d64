"""Data loaders as Ray actors of ``persia train --num-data-loaders D``."""

from __future__ import annotations

from pathlib import Path

import pytest

from persia.backends.ray.backend import ClusterConfig
from persia.backends.ray.loaders import loader_batches, loader_channels, loader_routes
from persia.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"


def _twin(n: int, index: int, size: int, world: int) -> list[int]:
    complete = n - n % world
    return [i for i in range(complete) if i % size == index]


@pytest.mark.parametrize("n", [0, 1, 7, 12, 13, 23])
@pytest.mark.parametrize(
    ("size", "world"), [(1, 1), (2, 1), (3, 1), (2, 2), (4, 2), (6, 3), (1, 2), (3, 2), (2, 3)]
)
def test_loaders_partition_the_batches_and_every_nn_worker_gets_as_many(n, size, world):
    routes = [list(loader_routes(iter(range(n)), d, size, world)) for d in range(size)]
    parts = [[i for _, i in r] for r in routes]
    assert parts == [_twin(n, d, size, world) for d in range(size)]
    assert parts == [list(loader_batches(iter(range(n)), d, size, world)) for d in range(size)]
    # batch i goes to NN worker i % world, over a channel its loader serves
    for d, route in enumerate(routes):
        assert all(r == i % world and r in loader_channels(d, size, world) for r, i in route)
    per_worker = [sorted(i for route in routes for r, i in route if r == w) for w in range(world)]
    # NN worker r gets exactly the batches i % world == r of the complete rounds
    assert per_worker == [[i for i in range(n - n % world) if i % world == r] for r in range(world)]
    # no loader idle once an epoch has a complete round per loader
    if n - n % world >= size:
        assert all(parts)


def test_channels_of_the_loaders():
    assert [loader_channels(d, 1, 2) for d in range(1)] == [[0, 1]]
    assert [loader_channels(d, 3, 2) for d in range(3)] == [[0, 1]] * 3
    assert [loader_channels(d, 4, 2) for d in range(4)] == [[0], [1], [0], [1]]
    assert [loader_channels(d, 4, 6) for d in range(4)] == [[0, 2, 4], [1, 3, 5]] * 2


def test_any_loader_count_is_accepted_for_any_nn_worker_count():
    assert ClusterConfig(num_nn_workers=2, num_data_loaders=3).num_data_loaders == 3
    assert ClusterConfig(num_nn_workers=2, num_data_loaders=1).num_data_loaders == 1
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


@pytest.mark.parametrize("loaders", [1, 3])
def test_loaders_that_are_not_a_multiple_of_the_two_nn_workers(ray_cluster, loaders):
    """1 loader for 2 NN workers, and 3 for 2: 6 500 samples are 51 batches (the last of 100
    samples); rounds of 2 batches, so the last incomplete round (batch 50) is dropped: 25
    batches per NN worker, 6 400 samples, and every loader sent its share of batches 0-49."""
    from persia.job.config import load_job
    from persia.job.runner import run_job

    job = load_job(
        ADULT,
        ["training.backend=ray", "training.progress=none", "training.max_samples=6500"],
    )
    cluster = ClusterConfig(
        num_ps=1,
        num_nn_workers=2,
        num_data_loaders=loaders,
        nn_num_cpus=0.25,
        loader_num_cpus=0.1,
        timeout_s=120,
    )
    result = run_job(job, cluster=cluster)
    assert [w["train_batches"] for w in result["nn_workers"]] == [25, 25]
    assert result["train_samples"] == 50 * 128
    assert result["data_loaders_sent"] == [len(range(d, 50, loaders)) for d in range(loaders)]
    assert all(result["data_loaders_sent"])
