"""Resource planning: a job the Ray cluster cannot hold fails before any actor starts, naming the
short resource, the asks per role and by how much it is short."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from persia.backends.ray.config import ClusterConfig, RoleSpec
from persia.backends.ray.planning import RoleAsk, job_asks, shortfalls
from persia.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"
TWO_CPUS = {"CPU": 2.0, "memory": 4.0 * 2**30}


def test_the_issues_job_is_short_of_a_quarter_cpu():
    # --num-ps 2 --num-embedding-workers 1 --num-nn-workers 2 --num-data-loaders 2, defaults
    cluster = ClusterConfig(num_ps=2, num_embedding_workers=1, num_nn_workers=2, num_data_loaders=2)
    asks = job_asks(cluster, 2)
    assert [(a.role, a.count, dict(a.per_replica)) for a in asks] == [
        ("parameter servers", 2, {"CPU": 0.25}),
        ("embedding workers", 1, {"CPU": 0.25}),
        ("NN workers", 2, {"CPU": 0.5}),
        ("data loaders", 2, {"CPU": 0.25}),
    ]
    (problem,) = shortfalls(asks, TWO_CPUS, [TWO_CPUS])
    assert problem.startswith(
        "CPU: the job asks Ray for 2.25 (parameter servers 2 x 0.25, embedding workers 1 x 0.25, "
        "NN workers 2 x 0.5, data loaders 2 x 0.25), the cluster has 2: short by 0.25."
    )
    assert "--nn-cpus / ClusterConfig.nn_workers" in problem
    # the same job with one NN worker: the driver is the NN worker and asks for nothing
    one_nn = job_asks(cluster.replace(num_nn_workers=1, num_data_loaders=2), 2)
    assert shortfalls(one_nn, TWO_CPUS, [TWO_CPUS]) == []


def test_custom_resources_memory_and_the_largest_node():
    cluster = ClusterConfig(
        ps=RoleSpec(count=4, num_cpus=1, resources={"ps_host": 1}, memory_bytes=2 * 2**30),
        nn_workers=RoleSpec(count=2, num_cpus=3),
    )
    nodes = [{"CPU": 4.0, "ps_host": 2.0, "memory": 4.0 * 2**30}, {"CPU": 2.0, "memory": 2**30}]
    total = {"CPU": 6.0, "ps_host": 2.0, "memory": 5.0 * 2**30}
    problems = shortfalls(job_asks(cluster, 4), total, nodes)
    starts = [
        "CPU: the job asks Ray for 10 (parameter servers 4 x 1, NN workers 2 x 3), "
        "the cluster has 6: short by 4.",
        "ps_host: the job asks Ray for 4 (parameter servers 4 x 1), the cluster has 2: short by 2.",
        "memory: the job asks Ray for 8 GiB (parameter servers 4 x 2 GiB), the cluster has "
        "5 GiB: short by 3 GiB.",
    ]
    for start in starts:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == 3
    # 3 CPUs per NN worker: 6 CPUs in all, but no node has more than 4... 3 fits the first
    assert not any("each of the NN workers" in p for p in problems)
    wide = shortfalls([RoleAsk("NN workers", 1, {"CPU": 5.0}, "--nn-cpus")], total, nodes)
    assert wide == [
        "CPU: each of the NN workers asks for 5, but no node has more than 4 (--nn-cpus)"
    ]
    assert shortfalls(job_asks(ClusterConfig(num_ps=2), 2), total, nodes) == []


def _actor_names(ray) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


def test_persia_train_fails_at_once_on_a_short_cluster(ray_cluster):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    job = load_job(ADULT, ["training.backend=ray", "training.progress=none"])
    cluster = ClusterConfig(
        num_ps=2, num_nn_workers=2, nn_num_cpus=0.75, num_data_loaders=2, timeout_s=60
    )
    before = _actor_names(ray_cluster)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        run_job(job, cluster=cluster)
    assert time.monotonic() - start < 10  # not the 60 s timeout of a queued actor
    msg = str(info.value)
    assert "CPU: the job asks Ray for 2.5 (parameter servers 2 x 0.25, NN workers 2 x 0.75, " in msg
    assert "the cluster has 2: short by 0.5" in msg
    assert _actor_names(ray_cluster) <= before  # no actor was started


def test_train_ctx_on_ray_fails_at_once_when_its_servers_cannot_fit(ray_cluster):
    import torch
    from runtime._jobs import Net, embedding_file

    from persia.ctx import TrainCtx
    from persia.embedding.optim import Adagrad

    model = Net()
    ctx = TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(),
        backend="ray",
        cluster=ClusterConfig(num_ps=3, ps_num_cpus=1.0),
    )
    want = r"asks Ray for 3 \(parameter servers 3 x 1\), the cluster has 2: short by 1"
    with pytest.raises(ConfigError, match=want):
        with ctx:
            pass


def test_a_cluster_persia_starts_itself_fits_the_defaults(monkeypatch):
    from persia.backends.ray.planning import local_cluster_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    issue = ClusterConfig(num_ps=2, num_embedding_workers=1, num_nn_workers=2, num_data_loaders=2)
    asks = job_asks(issue, 2)  # 2.25 CPUs
    assert local_cluster_cpus(issue, asks, machine_cpus=2) == 3
    assert local_cluster_cpus(issue, asks, machine_cpus=4) is None  # Ray's own count
    assert local_cluster_cpus(issue.replace(num_cpus=2), asks, machine_cpus=2) == 2  # the user's
    assert local_cluster_cpus(issue.replace(address="10.0.0.1:6379"), asks, 2) is None  # joined
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert local_cluster_cpus(issue, asks, machine_cpus=2) is None


def test_a_joined_cluster_gets_a_grace_period_for_nodes_still_joining(monkeypatch):
    """Joining a cluster by address: a node started just before the driver may not have joined
    yet, so a shortfall is an error only once it persists; on a cluster persia starts itself it
    is an error at once."""
    from persia.backends.ray import planning
    from persia.backends.ray.config import ClusterConfig
    from persia.errors import ConfigError

    small = ({"CPU": 1.0}, [{"CPU": 1.0}]) * 2  # (total, nodes, free, free per node)
    grown = ({"CPU": 3.0}, [{"CPU": 1.0}, {"CPU": 2.0}]) * 2
    answers = [small, small, grown]
    monkeypatch.setattr(
        planning, "_cluster_resources", lambda: answers.pop(0) if answers else grown
    )
    monkeypatch.setattr(planning.time, "sleep", lambda s: None)
    joined = ClusterConfig(num_ps=2, num_nn_workers=2, address="10.0.0.1:6379", timeout_s=30)
    planning.check_job_fits(joined, 2)  # fits once the second node joined
    assert answers == []
    answers[:] = [small]
    local = ClusterConfig(num_ps=2, num_nn_workers=2, timeout_s=30)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="short by"):
        planning.check_job_fits(local, 2)
    monkeypatch.setattr(planning, "GRACE_S", 0.0)
    monkeypatch.setattr(planning, "_cluster_resources", lambda: small)
    with pytest.raises(ConfigError, match="short by"):
        planning.check_job_fits(joined, 2)  # still short when the grace ends


def test_free_resources_not_the_total_decide():
    """Other actors hold part of the cluster: the job is compared with what is free, and the
    message gives the free and the total amounts."""
    asks = job_asks(ClusterConfig(num_ps=2, ps_num_cpus=1.0), 2)  # 2 CPUs
    total, nodes = {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}]
    assert shortfalls(asks, total, nodes) == []  # the old check: fits the total
    free, free_nodes = {"CPU": 1.5}, [{"CPU": 0.5}, {"CPU": 1.0}]
    problems = shortfalls(asks, total, nodes, free, free_nodes)
    assert problems[0].startswith(
        "CPU: the job asks Ray for 2 (parameter servers 2 x 1), the cluster has 1.5 free of 4 "
        "(other actors hold 2.5): short by 0.5. Wait for them to end"
    )
    assert len(problems) == 1
    # one replica that fits a node's total but no node's free part
    wide = [RoleAsk("NN workers", 1, {"CPU": 1.25}, "--nn-cpus")]
    assert shortfalls(wide, total, nodes, free, free_nodes) == [
        "CPU: each of the NN workers asks for 1.25, but no node has more than 1 free now "
        "(--nn-cpus)"
    ]
    assert shortfalls(wide, total, nodes, {"CPU": 3.0}, [{"CPU": 1.0}, {"CPU": 2.0}]) == []


def test_a_job_short_of_free_resources_waits_the_grace_then_fails(monkeypatch):
    from persia.backends.ray import planning

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(planning.time, "sleep", lambda s: None)
    busy = ({"CPU": 4.0}, [{"CPU": 4.0}], {"CPU": 0.5}, [{"CPU": 0.5}])
    freed = ({"CPU": 4.0}, [{"CPU": 4.0}], {"CPU": 4.0}, [{"CPU": 4.0}])
    answers = [busy, busy, freed]  # an ended job's actors give their CPUs back a moment later
    monkeypatch.setattr(planning, "_cluster_resources", lambda: answers.pop(0))
    cluster = ClusterConfig(num_ps=2, ps_num_cpus=1.0, timeout_s=30)
    planning.check_runtime_fits(cluster, 2)
    assert answers == []
    monkeypatch.setattr(planning, "_cluster_resources", lambda: busy)
    monkeypatch.setattr(planning, "GRACE_S", 0.0)
    with pytest.raises(ConfigError, match=r"0.5 free of 4 \(other actors hold 3.5\): short by 1.5"):
        planning.check_runtime_fits(cluster, 2)


def test_train_ctx_on_ray_fails_when_other_actors_hold_the_cpus(ray_cluster, monkeypatch):
    import torch
    from runtime._jobs import Net, embedding_file

    from persia.backends.ray import planning
    from persia.ctx import TrainCtx
    from persia.embedding.optim import Adagrad

    monkeypatch.setattr(planning, "GRACE_S", 1.0)

    @ray_cluster.remote(num_cpus=1.5)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        ray_cluster.get(holder.ready.remote(), timeout=60)
        cluster = ClusterConfig(num_ps=2, ps_num_cpus=0.5)
        model = Net()
        ctx = TrainCtx(
            Adagrad(lr=0.1),
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            embedding_config_file=embedding_file(),
            backend="ray",
            cluster=cluster,
        )
        want = r"asks Ray for 1 \(parameter servers 2 x 0.5\), the cluster has 0.5 free of 2"
        with pytest.raises(ConfigError, match=want):
            with ctx:
                pass
    finally:
        ray_cluster.kill(holder)
    planning.check_runtime_fits(cluster, 2)  # fits once the holder is gone (within the grace)
