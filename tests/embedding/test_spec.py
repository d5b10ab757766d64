"""persia.embedding.spec: both front ends parse into one EmbeddingSpec; the builders take it."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest

from persia.embedding import EmbeddingConfig
from persia.embedding._problems import Problems
from persia.embedding.config import (
    embedding_spec,
    load_spec,
    parse_embedding_config,
    parse_global_config,
    persia_configs,
)
from persia.embedding.optim import SGD, Adagrad, Adam, build_optimizer, optimizer_spec
from persia.embedding.spec import (
    POOLINGS,
    EmbeddingSpec,
    SlotSpec,
    assign_prefixes,
    per_shard_capacity,
)
from persia.errors import ConfigError
from persia.job.config import parse_job

_EMBEDDING_YML = {
    "slots_config": {
        "user": {"dim": 8},
        "item": {"dim": 8, "sqrt_scaling": True},
        "history": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 5},
    }
}
_GLOBAL_YML = {
    "embedding_parameter_server_config": {"capacity": 5000, "num_hashmap_internal_shards": 2}
}
_JOB = {
    "data": {"train": "train.csv", "ids": ["user", "item", "history"], "label": "y"},
    "embedding": {
        "dim": 8,
        "slots": {
            "item": {"pooling": "sqrt"},
            "history": {"dim": 4, "pooling": "raw", "sample_fixed_size": 5},
        },
        "optimizer": {"type": "adam", "lr": 0.01},
        "capacity": 5000,
        "shards": 2,
        "admit_probability": 0.5,
        "init": [-0.1, 0.1],
        "weight_bound": 3,
    },
}


def _persia_spec() -> EmbeddingSpec:
    return embedding_spec(
        parse_embedding_config(_EMBEDDING_YML),
        parse_global_config(_GLOBAL_YML),
        EmbeddingConfig(emb_initialization=(-0.1, 0.1), admit_probability=0.5, weight_bound=3),
        Adam(lr=0.01),
    )


def test_yaml_pair_and_job_file_give_equal_specs(tmp_path) -> None:
    from_yaml = _persia_spec()
    from_job = parse_job(_JOB, tmp_path).embedding
    assert from_yaml == from_job
    assert isinstance(from_job, EmbeddingSpec)
    assert [(s.name, s.dim, s.pooling, s.prefix, s.group) for s in from_job.slots] == [
        ("user", 8, "sum", 1, "user"),
        ("item", 8, "sqrt", 2, "item"),
        ("history", 4, "raw", 3, "history"),
    ]
    assert from_job.slot("history").sample_fixed_size == 5
    assert from_job.dims == (4, 8)
    assert (from_job.optimizer, dict(from_job.optimizer_args)) == ("adam", {"lr": 0.01})


def test_spec_round_trips_through_persia_files(tmp_path) -> None:
    spec = parse_job(_JOB, tmp_path).embedding
    emb, glob = persia_configs(spec)
    assert emb.prefix_of("history") == spec.prefix_of("history") == 3
    assert glob.embedding_parameter_server_config.num_hashmap_internal_shards == 2
    again = embedding_spec(
        emb,
        glob,
        EmbeddingConfig(emb_initialization=spec.init, admit_probability=0.5, weight_bound=3),
        build_optimizer("adam", spec.optimizer_args),
    )
    assert again == spec


def test_load_spec_reads_paths_and_objects(tmp_path) -> None:
    import yaml

    emb_path, glob_path = tmp_path / "embedding.yml", tmp_path / "global.yml"
    emb_path.write_text(yaml.safe_dump(_EMBEDDING_YML, sort_keys=False))
    glob_path.write_text(yaml.safe_dump(_GLOBAL_YML))
    hyper = EmbeddingConfig(emb_initialization=(-0.1, 0.1), admit_probability=0.5, weight_bound=3)
    assert load_spec(emb_path, glob_path, hyper, Adam(lr=0.01)) == _persia_spec()
    spec = load_spec(parse_embedding_config(_EMBEDDING_YML))  # no global file: defaults
    assert (spec.capacity, spec.shards, spec.optimizer) == (1_000_000_000, 1, None)


def test_feature_groups_share_a_prefix() -> None:
    emb = parse_embedding_config(
        {
            "slots_config": {"a": {"dim": 4}, "b": {"dim": 4}, "c": {"dim": 4}},
            "feature_groups": {"g": ["c", "a"]},
        }
    )
    spec = embedding_spec(emb)
    assert [(s.name, s.group, s.prefix) for s in spec.slots] == [
        ("a", "g", 1),
        ("b", "b", 2),
        ("c", "g", 1),
    ]
    assert spec.slots == assign_prefixes(
        [SlotSpec("a", 4), SlotSpec("b", 4), SlotSpec("c", 4)], [("g", ("c", "a"))]
    )
    assert spec.feature_groups == (("g", ("c", "a")),)


def test_job_file_refuses_too_few_prefix_bits(tmp_path) -> None:
    job = {**_JOB, "embedding": {**_JOB["embedding"], "feature_index_prefix_bit": 1}}
    with pytest.raises(ConfigError) as info:
        parse_job(job, tmp_path)
    assert info.value.problems == [
        "embedding.feature_index_prefix_bit: expected enough bits for 3 prefixes "
        "(feature groups + ungrouped slots); 1 bits give 1, got 1"
    ]


def test_spec_lists_every_problem_with_field_names() -> None:
    with pytest.raises(ConfigError) as info:
        EmbeddingSpec(
            slots=(SlotSpec("age", 0, prefix=1), SlotSpec("job", 4, pooling="max", prefix=2)),
            capacity=0,
            optimizer="rmsprop",
            init=(0.1, -0.1),
            admit_probability=2.0,
        )
    assert info.value.problems == [
        "slot 'age': dim must be > 0, got 0",
        "slot 'job': pooling must be one of sum, mean, sqrt, raw, got 'max'",
        "capacity must be an int > 0, got 0",
        "optimizer must be one of sgd, adagrad, rowwise_adagrad, adam or None, got 'rmsprop'",
        "admit_probability must be a number in [0, 1], got 2.0",
        "init must be (low, high) with finite low < high, got (0.1, -0.1)",
    ]


def test_shared_collector_reports_every_problem_at_once() -> None:
    p = Problems()
    d = p.section({"dim": 0, "pooling": 3, "extra": 1}, "slots_config.age", ("dim", "pooling"))
    assert p.int_(d, "dim", "slots_config.age", 8) == 8
    assert p.str_(d, "pooling", "slots_config.age", "sum", POOLINGS) == "sum"
    p.warn("slots_config.age.capacity", "accepted, but has no effect")
    with pytest.raises(ConfigError) as info:
        p.finish("embedding_config.yml", logging.getLogger("test"))
    assert info.value.problems == [
        "slots_config.age.extra: unknown key; expected one of dim, pooling",
        "slots_config.age.dim: expected an int > 0, got 0",
        "slots_config.age.pooling: expected a non-empty string, got 3",
    ]
    assert "3 problems" in str(info.value)


def test_collector_dialects_of_the_two_front_ends() -> None:
    persia, job = Problems(), Problems(positive_int="an int >= 1", null_is_absent=True)
    for p in (persia, job):
        assert p.int_({"n": None}, "n", "s", None) is None
        assert p.int_({"n": 0}, "n", "s", 5) == 5
    assert persia.problems == [
        "s.n: expected an int > 0, got None",
        "s.n: expected an int > 0, got 0",
    ]
    assert job.problems == ["s.n: expected an int >= 1, got 0"]


def test_both_front_ends_list_several_problems(tmp_path) -> None:
    with pytest.raises(ConfigError) as yml:
        parse_embedding_config({"slots_config": {"a": {"dim": 0}, "b": {"dim": 4, "x": 1}}})
    assert len(yml.value.problems) == 2
    job = {**_JOB, "embedding": {"dim": 0, "capacity": -1, "shards": "two"}}
    with pytest.raises(ConfigError) as jf:
        parse_job(job, tmp_path)
    assert jf.value.problems == [
        "embedding.dim: expected an int >= 1, got 0",
        "embedding.capacity: expected an int >= 1, got -1",
        "embedding.shards: expected an int >= 1, got 'two'",
    ]


@pytest.mark.parametrize(
    "opt",
    [
        SGD(lr=0.1),
        SGD(lr=0.1, momentum=0.9),
        Adagrad(),
        Adagrad(lr=0.05, vectorwise_shared=True, eps=1e-6),
        Adam(lr=0.01, betas=(0.8, 0.99)),
    ],
)
def test_optimizer_names_round_trip(opt) -> None:
    name, args = optimizer_spec(opt)
    assert name == opt.name
    assert build_optimizer(name, args) == opt


def test_capacity_split_and_store_options() -> None:
    from persia.store.build import build_store, shard_options, store_options

    assert [per_shard_capacity(10, n) for n in (1, 3, 4, 10, 11)] == [10, 4, 3, 1, 1]
    spec = _persia_spec()
    assert spec.shard_capacity(3) == per_shard_capacity(5000, 3) == 1667
    kw = store_options(spec)
    assert kw["capacity"] == 5000 and kw["dims"] == [4, 8]
    assert kw["optimizer"] == Adam(lr=0.01)
    assert (kw["init"].low, kw["init"].high, kw["admission"].probability) == (-0.1, 0.1, 0.5)
    assert shard_options(spec, 3)["capacity"] == 1667
    store = build_store(spec)
    assert (store.num_shards, store.capacity, store.adopt_optimizer) == (2, 5000, False)
    assert [s.capacity for s in store.shards] == [2500, 2500]
    placeholder = store_options(embedding_spec(parse_embedding_config(_EMBEDDING_YML)))
    assert placeholder["optimizer"] == SGD(lr=0.01)
    assert math.isclose(placeholder["weight_bound"], 10.0)


def test_one_definition_of_shared_names() -> None:
    from persia import hashing
    from persia.job import config as job_config
    from persia.job import readers
    from persia.serving.export import MISSING_TOKEN as serving_token
    from persia.worker import embedding_worker

    assert readers.MISSING_TOKEN is serving_token is hashing.MISSING_TOKEN
    assert embedding_worker.SlotSpec is job_config.SlotSpec is SlotSpec
    assert job_config.EmbeddingSpec is EmbeddingSpec
    assert embedding_worker.POOLINGS is job_config.POOLINGS is POOLINGS


def test_ray_namespace_has_one_default(monkeypatch) -> None:
    from persia import _settings
    from persia.backends.ray import naming

    monkeypatch.delenv(_settings.PERSIA_RAY_NAMESPACE, raising=False)
    assert naming.namespace() == naming.DEFAULT_NAMESPACE == "persia"
    monkeypatch.setenv(_settings.PERSIA_RAY_NAMESPACE, " team ")
    assert naming.namespace() == "team"
    assert naming.ps_actor_name("j", 3) == "persia-j-ps-3"


def test_a_spec_round_trips_through_json():
    """What checkpoints record for serving (spec_to_dict) reads back to an equal spec."""
    import json
    import math

    from persia.embedding.spec import EmbeddingSpec, SlotSpec, spec_from_dict, spec_to_dict
    from persia.errors import ConfigError

    spec = EmbeddingSpec(
        slots=(
            SlotSpec("a", 8, "sum", 1, group="g"),
            SlotSpec("b", 8, "mean", 1, group="g"),
            SlotSpec("c", 4, "raw", 2, sample_fixed_size=3, hash_stack_rounds=2, hash_stack_size=9),
        ),
        optimizer="adam",
        optimizer_args={"lr": 0.01, "betas": (0.9, 0.99)},
        weight_bound=math.inf,
        feature_groups=(("g", ("a", "b")),),
        seed=7,
    )
    data = json.loads(json.dumps(spec_to_dict(spec), allow_nan=False))
    assert spec_from_dict(data) == spec
    with pytest.raises(ConfigError, match="exactly the fields"):
        spec_from_dict({**data, "slots": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="missing field"):
        spec_from_dict({"slots": data["slots"]})


# --- PERSIA's admission and weight-bound settings reach the store -------------------------------


def _store_of(spec):
    from persia.store.build import build_store

    return build_store(spec, num_shards=1)


def test_admit_min_count_from_global_config_and_job_file(tmp_path) -> None:
    import yaml

    server = {**_GLOBAL_YML["embedding_parameter_server_config"], "admit_min_count": 3}
    glob = {"embedding_parameter_server_config": server}
    glob_path = tmp_path / "global_config.yml"
    glob_path.write_text(yaml.safe_dump(glob))
    hyper = EmbeddingConfig(emb_initialization=(-0.1, 0.1), admit_probability=0.5, weight_bound=3)
    from_yaml = load_spec(parse_embedding_config(_EMBEDDING_YML), glob_path, hyper, Adam(lr=0.01))
    job = {**_JOB, "embedding": {**_JOB["embedding"], "admit_min_count": 3}}
    from_job = parse_job(job, tmp_path).embedding
    assert from_yaml.admit_min_count == from_job.admit_min_count == 3
    assert from_yaml == from_job
    # and back through PERSIA's files (what the Ray backend hands its roles)
    emb, glob_cfg = persia_configs(from_job)
    assert glob_cfg.embedding_parameter_server_config.admit_min_count == 3
    assert embedding_spec(emb, glob_cfg, hyper, Adam(lr=0.01)) == from_job
    assert parse_global_config(glob_cfg.to_dict()) == glob_cfg
    # the store's admission: a key gets a row on its third training miss, not before
    store = _store_of(replace(from_job, admit_probability=1.0))
    assert store.admission.min_count == 3
    keys = np.array([7, 8], dtype=np.uint64)
    for miss in (1, 2):
        assert not store.lookup(keys, 8, training=True).any(), f"miss {miss} made a row"
        assert store.rows == 0
    assert store.lookup(keys, 8, training=True).any()
    assert store.rows == 2


def test_admit_min_count_refused_when_bad(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"admit_min_count: expected an int >= 0, got -1"):
        parse_global_config({"embedding_parameter_server_config": {"admit_min_count": -1}})
    job = {**_JOB, "embedding": {**_JOB["embedding"], "admit_min_count": 1.5}}
    with pytest.raises(ConfigError, match=r"embedding.admit_min_count: expected an int >= 0"):
        parse_job(job, tmp_path)


def test_persia_weight_bound_zero_turns_clipping_off(tmp_path) -> None:
    # PERSIA: weight_bound > 0 enables the bound; 0 (or less) turns it off
    keys = np.array([5], dtype=np.uint64)
    big = np.full((1, 8), -100.0, np.float32)  # SGD lr 0.5: the value moves by +50
    values = {}
    for bound in (3, 0, -1):
        hyper = EmbeddingConfig(weight_bound=bound)
        spec = embedding_spec(parse_embedding_config(_EMBEDDING_YML), None, hyper, SGD(lr=0.5))
        store = _store_of(spec)
        store.lookup(keys, 8, training=True)
        store.apply_gradients(keys, big)
        values[bound] = store.lookup(keys, 8, training=False)
    assert np.allclose(values[3], 3.0)
    assert values[0].min() > 49 and np.array_equal(values[0], values[-1])
    job = {**_JOB, "embedding": {**_JOB["embedding"], "weight_bound": 0}}
    assert parse_job(job, tmp_path).embedding.weight_bound == 0.0


def test_persia_admit_probability_zero_makes_no_row(tmp_path, caplog) -> None:
    from persia.logger import reset_warn_once

    reset_warn_once()
    job = {**_JOB, "embedding": {**_JOB["embedding"], "admit_probability": 0}}
    with caplog.at_level(logging.WARNING):
        spec = parse_job(job, tmp_path).embedding
    assert spec.admit_probability == 0.0
    assert "admit_probability is 0: no key will ever get a row" in caplog.text
    store = _store_of(spec)
    keys = np.arange(50, dtype=np.uint64)
    for _ in range(3):
        assert not store.lookup(keys, 8, training=True).any()
    assert store.rows == 0
    for bad in (-0.5, 1.5):
        job = {**_JOB, "embedding": {**_JOB["embedding"], "admit_probability": bad}}
        with pytest.raises(ConfigError, match=r"admit_probability: expected a number in \[0, 1\]"):
            parse_job(job, tmp_path)
