"""ClusterConfig: one RoleSpec per role, persia 0.1's flat keywords as aliases, private wiring
(no Ray needed)."""

from __future__ import annotations

import pickle

import pytest

from persia.backends.ray import ClusterConfig, RecoveryConfig
from persia.backends.ray.config import RoleSpec
from persia.errors import ConfigError


def test_flat_keywords_and_role_specs_are_the_same_settings():
    flat = ClusterConfig(
        num_ps=2,
        ps_num_cpus=0.5,
        ps_memory_bytes=1 << 30,
        ps_resources={"ps_host": 1},
        num_nn_workers=2,
        nn_num_cpus=1,
        nn_resources={"gpu_host": 1},
        num_data_loaders=4,
        loader_num_cpus=0.1,
        num_embedding_workers=1,
        ew_num_cpus=0.2,
        ew_resources={"ew": 1},
    )
    specs = ClusterConfig(
        ps=RoleSpec(2, 0.5, {"ps_host": 1}, 1 << 30),
        nn_workers=RoleSpec(2, 1, {"gpu_host": 1}),
        data_loaders=RoleSpec(4, 0.1),
        embedding_workers=RoleSpec(1, 0.2, {"ew": 1}),
    )
    assert flat == specs
    assert (flat.num_ps, flat.ps_num_cpus, flat.ps_memory_bytes) == (2, 0.5, 1 << 30)
    assert flat.ps_resources == {"ps_host": 1} and flat.nn_resources == {"gpu_host": 1}
    assert (flat.num_nn_workers, flat.nn_num_cpus) == (2, 1)
    assert (flat.num_data_loaders, flat.loader_num_cpus, flat.loader_resources) == (4, 0.1, {})
    assert (flat.num_embedding_workers, flat.ew_num_cpus, flat.ew_resources) == (1, 0.2, {"ew": 1})


def test_defaults_are_those_of_persia_0_1():
    c = ClusterConfig()
    assert c.num_ps is None and c.ps_num_cpus == 0.25 and c.ps_memory_bytes is None
    assert (c.num_nn_workers, c.nn_num_cpus) == (1, 0.5)
    assert (c.num_data_loaders, c.loader_num_cpus) == (0, 0.25)
    assert (c.num_embedding_workers, c.ew_num_cpus) == (0, 0.25)
    assert c.transport == "zmq" and c.recover is False and c.job_name is None
    assert not c.attach_ps and c.data_channel is None


def test_replace_and_wiring_copy_and_leave_the_original_alone():
    c = ClusterConfig(num_ps=2, timeout_s=5)
    d = c.replace(job_name="j", num_nn_workers=1).wired(attach_ps=True, data_channel="ch")
    assert (d.job_name, d.num_ps, d.timeout_s, d.attach_ps, d.data_channel) == (
        "j",
        2,
        5,
        True,
        "ch",
    )
    assert c.job_name is None and not c.attach_ps and c.data_channel is None
    assert d.replace(timeout_s=7).attach_ps  # replace keeps the wiring
    with pytest.raises(AttributeError, match="frozen"):
        c.num_ps = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown wiring"):
        c.wired(num_ps=3)
    with pytest.raises(ConfigError, match="attach_ps needs job_name"):
        c.wired(attach_ps=True)


def test_pickles_with_its_wiring():
    d = ClusterConfig(num_ps=2, recover=RecoveryConfig(max_recoveries=2), job_name="j").wired(
        attach_ps=True
    )
    e = pickle.loads(pickle.dumps(d))
    assert e == d and e.attach_ps and e.recover == RecoveryConfig(max_recoveries=2)


def test_every_problem_at_once_naming_the_field():
    with pytest.raises(ConfigError) as info:
        ClusterConfig(num_ps=0, ps_num_cpus=-1, transport="grpc", timeout_s=0, bogus=1)
    text = str(info.value)
    assert len(info.value.problems) == 5
    for part in (
        "num_ps must be",
        "ps_num_cpus must be",
        "transport must be",
        "timeout_s",
        "bogus",
    ):
        assert part in text
    with pytest.raises(ConfigError, match="not both"):
        ClusterConfig(ps=RoleSpec(count=1), num_ps=2)
    with pytest.raises(ConfigError, match="must be a RoleSpec"):
        ClusterConfig(ps={"count": 2})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="parameter servers only"):
        ClusterConfig(nn_workers=RoleSpec(count=1, memory_bytes=10))


def test_recover_needs_one_nn_worker_checked_once_in_the_settings():
    with pytest.raises(ConfigError, match="--recover works with one NN worker"):
        ClusterConfig(num_nn_workers=2, recover=True)
    with pytest.raises(ConfigError, match="--recover works with one NN worker"):
        ClusterConfig(num_nn_workers=1, recover=True).replace(num_nn_workers=2)
