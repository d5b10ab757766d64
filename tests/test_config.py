"""persia.embedding.config: PERSIA's YAML files, strict validation listing every problem, warnings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from persia import _settings
from persia.embedding.config import (
    GlobalConfig,
    load_embedding_config,
    load_global_config,
    parse_embedding_config,
    parse_global_config,
)
from persia.errors import ConfigError
from persia.logger import reset_warn_once

DATA = Path(__file__).parent / "data"
ADULT_SLOTS = [
    "workclass",
    "education",
    "marital_status",
    "occupation",
    "relationship",
    "race",
    "gender",
    "native_country",
]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    reset_warn_once()
    yield
    reset_warn_once()


def _problems(data, parse=parse_embedding_config) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


def _one_problem(data, parse=parse_embedding_config) -> str:
    problems = _problems(data, parse)
    assert len(problems) == 1, problems
    return problems[0]


def _slots(**slots) -> dict:
    return {"slots_config": slots}


# --- embedding_config.yml: PERSIA's files ----------------------------------------------------


def test_persia_adult_income_file_loads(caplog):
    with caplog.at_level(logging.WARNING, logger="persia"):
        cfg = load_embedding_config(DATA / "persia_adult_income_embedding_config.yml")
    assert cfg.slot_names == tuple(ADULT_SLOTS)
    assert cfg.feature_index_prefix_bit == 12
    assert all(s.dim == 8 and s.pooling == "sum" and s.capacity == 100000 for s in cfg.slots)
    # no groups: each slot its own prefix, numbered in file order from 1
    assert [cfg.prefix_of(n) for n in ADULT_SLOTS] == list(range(1, 9))
    assert [cfg.slot(n).index_prefix >> 52 for n in ADULT_SLOTS] == list(range(1, 9))
    assert cfg.key_mask == 2**52 - 1
    # per-slot capacity is accepted, with a warning per slot
    assert (
        sum("capacity: accepted, but has no effect" in r.getMessage() for r in caplog.records) == 8
    )


def test_persia_docs_file_with_groups_and_misspelled_slot_config(caplog):
    with caplog.at_level(logging.WARNING, logger="persia"):
        cfg = load_embedding_config(DATA / "persia_docs_embedding_config.yml")
    assert any("the right key is 'slots_config'" in r.getMessage() for r in caplog.records)
    # groups first in file order, then ungrouped slots in file order (PERSIA's rule)
    expected = {
        "workclass": 1,
        "education": 1,
        "race": 1,
        "marital_status": 2,
        "occupation": 2,
        "relationship": 3,
        "gender": 4,
        "native_country": 5,
    }
    assert {n: cfg.prefix_of(n) for n in ADULT_SLOTS} == expected
    assert {n: cfg.slot(n).index_prefix >> 56 for n in ADULT_SLOTS} == expected
    assert cfg.group_of("race") == "group1" and cfg.group_of("gender") == "gender"
    assert cfg.feature_groups == (
        ("group1", ("workclass", "education", "race")),
        ("group2", ("marital_status", "occupation")),
    )


def test_every_slot_option():
    cfg = load_embedding_config(DATA / "sequence_embedding_config.yml")
    pooling = {s.name: s.pooling for s in cfg.slots}
    assert pooling == {
        "user_id": "sum",
        "clicked_items": "raw",
        "tags": "sqrt",
        "genres": "mean",
        "item_id": "sum",
    }
    assert cfg.slot("clicked_items").sample_fixed_size == 20
    assert not cfg.slot("clicked_items").embedding_summation
    assert cfg.slot("user_id").hash_stack_config.enabled
    assert cfg.slot("user_id").hash_stack_config.embedding_size == 1_000_000
    assert cfg.prefix_of("item_id") == cfg.prefix_of("clicked_items") == 1
    assert cfg.prefix_of("user_id") == 2 and cfg.slot("user_id").index_prefix == 2 << 56


@pytest.mark.parametrize(
    "name",
    [
        "persia_adult_income_embedding_config.yml",
        "persia_docs_embedding_config.yml",
        "sequence_embedding_config.yml",
    ],
)
def test_embedding_config_round_trip(name):
    cfg = load_embedding_config(DATA / name)
    again = parse_embedding_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    assert again == cfg


def test_defaults_of_a_minimal_slot():
    slot = parse_embedding_config(_slots(a={"dim": 4})).slot("a")
    assert (slot.embedding_summation, slot.sample_fixed_size, slot.sqrt_scaling) == (
        True,
        10,
        False,
    )
    assert not slot.hash_stack_config.enabled
    assert parse_embedding_config(_slots(a={"dim": 4})).feature_index_prefix_bit == 12


def test_unknown_slot_lookup():
    cfg = parse_embedding_config(_slots(a={"dim": 4}))
    with pytest.raises(ConfigError, match=r"unknown slot 'b': not in slots_config \(slots: a\)"):
        cfg.slot("b")


# --- embedding_config.yml: every error ---------------------------------------------------------


def test_dim_zero():
    assert (
        _one_problem(_slots(age={"dim": 0})) == "slots_config.age.dim: expected an int > 0, got 0"
    )


def test_dim_missing():
    assert _one_problem(_slots(age={})) == (
        "slots_config.age.dim: expected an int >= 1 (required), got nothing"
    )


def test_dim_wrong_type():
    assert _one_problem(_slots(age={"dim": "8"})) == (
        "slots_config.age.dim: expected an int > 0, got '8'"
    )


def test_bool_field_wrong_type():
    problem = _one_problem(_slots(age={"dim": 8, "embedding_summation": 1}))
    assert problem == "slots_config.age.embedding_summation: expected true or false, got 1"


def test_sample_fixed_size_zero():
    problem = _one_problem(_slots(age={"dim": 8, "sample_fixed_size": 0}))
    assert problem == "slots_config.age.sample_fixed_size: expected an int > 0, got 0"


def test_unknown_top_level_key():
    problem = _one_problem({**_slots(a={"dim": 1}), "slot_cfg": {}})
    assert problem.startswith("slot_cfg: unknown key; expected one of feature_index_prefix_bit")


def test_unknown_slot_key():
    problem = _one_problem(_slots(age={"dim": 8, "dimension": 8}))
    assert problem.startswith("slots_config.age.dimension: unknown key; expected one of dim,")


def test_slots_config_missing():
    assert _one_problem({"feature_index_prefix_bit": 8}) == (
        "slots_config: expected a mapping of slot name -> slot config (required), got nothing"
    )


def test_slots_config_empty():
    assert _one_problem({"slots_config": {}}) == (
        "slots_config: expected at least one slot, got {}"
    )


def test_slots_config_not_a_mapping():
    assert _one_problem({"slots_config": [1]}) == "slots_config: expected a mapping, got [1]"


def test_top_level_not_a_mapping():
    assert _one_problem([1, 2]) == "<top level>: expected a mapping, got [1, 2]"


def test_group_with_unknown_slot():
    problem = _one_problem({**_slots(a={"dim": 1}), "feature_groups": {"g": ["a", "zz"]}})
    assert problem == "feature_groups.g: unknown slot 'zz' (not in slots_config)"


def test_slot_in_two_groups():
    data = {**_slots(a={"dim": 1}, b={"dim": 1}), "feature_groups": {"g1": ["a"], "g2": ["a", "b"]}}
    assert _one_problem(data) == "feature_groups.g2: slot 'a' is already in group 'g1'"


def test_group_not_a_list():
    problem = _one_problem({**_slots(a={"dim": 1}), "feature_groups": {"g": "a"}})
    assert problem == "feature_groups.g: expected a non-empty list of slot names, got 'a'"


def test_group_named_like_an_ungrouped_slot():
    data = {**_slots(a={"dim": 1}, b={"dim": 1}), "feature_groups": {"b": ["a"]}}
    assert "feature_groups.b: a group may not share its name" in _one_problem(data)


def test_too_many_prefixes_for_the_bits():
    data = {
        "feature_index_prefix_bit": 2,
        **_slots(a={"dim": 1}, b={"dim": 1}, c={"dim": 1}, d={"dim": 1}),
    }
    problem = _one_problem(data)
    assert problem.startswith("feature_index_prefix_bit: expected enough bits for 4 prefixes")
    assert problem.endswith("2 bits give 3, got 2")


def test_prefix_bits_out_of_range():
    problem = _one_problem({"feature_index_prefix_bit": 64, **_slots(a={"dim": 1})})
    assert problem == "feature_index_prefix_bit: expected an int in [1, 63], got 64"


def test_index_prefix_set_by_hand():
    problem = _one_problem(_slots(a={"dim": 1, "index_prefix": 5}))
    assert (
        problem.startswith("slots_config.a.index_prefix: expected 0 or no value")
        and "got 5" in problem
    )


def test_hash_stack_half_configured():
    problem = _one_problem(_slots(a={"dim": 1, "hash_stack_config": {"hash_stack_rounds": 2}}))
    assert problem.startswith("slots_config.a.hash_stack_config: expected hash_stack_rounds and")
    assert "'embedding_size': 0" in problem


def test_hash_stack_unknown_key():
    problem = _one_problem(_slots(a={"dim": 1, "hash_stack_config": {"rounds": 2}}))
    assert problem.startswith("slots_config.a.hash_stack_config.rounds: unknown key")


def test_pooling_unknown_value():
    problem = _one_problem(_slots(a={"dim": 1, "pooling": "max"}))
    assert problem == "slots_config.a.pooling: expected one of sum, mean, sqrt, raw, got 'max'"


def test_pooling_contradicts_embedding_summation():
    problem = _one_problem(_slots(a={"dim": 1, "pooling": "raw", "embedding_summation": True}))
    assert problem == (
        "slots_config.a.pooling: expected a pooling that agrees with embedding_summation: True, "
        "got 'raw'"
    )


def test_pooling_contradicts_sqrt_scaling():
    problem = _one_problem(_slots(a={"dim": 1, "pooling": "mean", "sqrt_scaling": True}))
    assert problem == "slots_config.a.pooling: expected sqrt (sqrt_scaling is true), got 'mean'"


def test_raw_with_sqrt_scaling_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="persia"):
        cfg = parse_embedding_config(
            _slots(a={"dim": 1, "embedding_summation": False, "sqrt_scaling": True})
        )
    assert cfg.slot("a").pooling == "raw" and not cfg.slot("a").sqrt_scaling
    assert any(
        "sqrt_scaling: accepted, but has no effect" in r.getMessage() for r in caplog.records
    )


def test_every_problem_listed_at_once():
    data = {
        "feature_index_prefix_bit": "eight",
        "slots_config": {
            "age": {"dim": 0, "sample_fixed_size": -1},
            "city": {"dim": 4, "embedding_summation": "yes", "colour": 1},
        },
        "feature_groups": {"g": ["age", "nope"]},
        "extra": 1,
    }
    problems = _problems(data)
    expected_starts = [
        "extra: unknown key",
        "feature_index_prefix_bit: expected an int in [1, 63], got 'eight'",
        "slots_config.age.dim: expected an int > 0, got 0",
        "slots_config.age.sample_fixed_size: expected an int > 0, got -1",
        "slots_config.city.colour: unknown key",
        "slots_config.city.embedding_summation: expected true or false, got 'yes'",
        "feature_groups.g: unknown slot 'nope'",
    ]
    assert len(problems) == len(expected_starts), problems
    for start in expected_starts:
        assert any(p.startswith(start) for p in problems), (start, problems)
    with pytest.raises(ConfigError, match=r"7 problems"):
        parse_embedding_config(data)


# --- global_config.yml -----------------------------------------------------------------------


def test_global_defaults():
    cfg = parse_global_config({})
    assert cfg == GlobalConfig() == parse_global_config(None)
    ps = cfg.embedding_parameter_server_config
    assert (ps.capacity, ps.num_hashmap_internal_shards, ps.enable_incremental_update) == (
        1_000_000_000,
        1,
        False,
    )
    assert (
        cfg.common_config.job_type == "train"
        and cfg.embedding_worker_config.forward_buffer_size == 1000
    )


def test_persia_getting_started_global_config(caplog):
    with caplog.at_level(logging.WARNING, logger="persia"):
        cfg = load_global_config(DATA / "persia_getting_started_global_config.yml")
    assert cfg.embedding_parameter_server_config.capacity == 1_000_000
    assert cfg.common_config.metrics_config.push_interval_seconds == 10
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "push_interval_sec: accepted as common_config.metrics_config.push_interval_seconds" in m
        and "the right key is 'push_interval_seconds'" in m
        for m in messages
    )
    # incremental_buffer_size is honoured (persia.store.delta): no warning any more
    assert not any("incremental_buffer_size" in m for m in messages)
    assert cfg.embedding_parameter_server_config.incremental_buffer_size != 1_000_000
    assert any("num_embedding_io_workers: accepted, but has no effect" in m for m in messages)
    assert len(cfg.warnings) == len(messages) == 3


def test_persia_infer_global_config(caplog):
    with caplog.at_level(logging.WARNING, logger="persia"):
        cfg = load_global_config(DATA / "persia_infer_global_config.yml")
    common = cfg.common_config
    assert common.job_type == "infer"
    assert common.infer_config is not None
    assert common.infer_config.servers == ("embedding_parameter_server:8888",)
    assert common.infer_config.embedding_checkpoint == "/cache/adult_income_ckpt/"
    assert common.metrics_config.enable_metrics
    messages = [r.getMessage() for r in caplog.records]
    # metrics are built (persia.telemetry): enable_metrics is honoured, no warning
    assert not any("enable_metrics" in m for m in messages)
    assert any(
        "checkpointing_config.num_workers: accepted, but has no effect" in m for m in messages
    )


def test_warnings_are_logged_once_per_file_and_key(caplog):
    path = DATA / "persia_getting_started_global_config.yml"
    with caplog.at_level(logging.WARNING, logger="persia"):
        load_global_config(path)
        first = len(caplog.records)
        load_global_config(path)
    assert first == 3 and len(caplog.records) == 3  # incremental_buffer_size is honoured


@pytest.mark.parametrize(
    "name", ["persia_getting_started_global_config.yml", "persia_infer_global_config.yml"]
)
def test_global_config_round_trip(name):
    cfg = load_global_config(DATA / name)
    assert (
        parse_global_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))) == cfg
    )


def test_old_section_names_accepted(caplog):
    data = {"shard_server_config": {"capacity": 5}, "middleware_config": {"forward_buffer_size": 7}}
    with caplog.at_level(logging.WARNING, logger="persia"):
        cfg = parse_global_config(data)
    assert cfg.embedding_parameter_server_config.capacity == 5
    assert cfg.embedding_worker_config.forward_buffer_size == 7
    assert any(
        "the right key is 'embedding_parameter_server_config'" in r.getMessage()
        for r in caplog.records
    )


def test_misspelling_and_right_key_together_is_an_error():
    data = {
        "common_config": {"metrics_config": {"push_interval_sec": 1, "push_interval_seconds": 2}}
    }
    assert _one_problem(data, parse_global_config) == (
        "common_config.metrics_config.push_interval_sec: old name of "
        "common_config.metrics_config.push_interval_seconds; give only one of them"
    )


def test_bad_job_type():
    problem = _one_problem({"common_config": {"job_type": "Eval"}}, parse_global_config)
    assert problem == "common_config.job_type: expected one of train, infer, got 'Eval'"


def test_bad_capacity():
    problem = _one_problem(
        {"embedding_parameter_server_config": {"capacity": 0}}, parse_global_config
    )
    assert problem == "embedding_parameter_server_config.capacity: expected an int > 0, got 0"


def test_bad_infer_servers():
    data = {"common_config": {"job_type": "Infer", "infer_config": {"servers": "a:1"}}}
    problem = _one_problem(data, parse_global_config)
    assert (
        problem
        == "common_config.infer_config.servers: expected a list of 'host:port' strings, got 'a:1'"
    )


def test_global_every_problem_listed_at_once():
    data = {
        "common_config": {"job_type": 3, "metrics_config": {"enable_metrics": "no"}, "mystery": 1},
        "embedding_worker_config": {"forward_buffer_size": -5},
        "embedding_parameter_server_config": {
            "capacity": "big",
            "num_hashmap_internal_shards": 0,
            "storage": "S3",
        },
        "nn_worker_config": {},
    }
    problems = _problems(data, parse_global_config)
    expected_starts = [
        "nn_worker_config: unknown key",
        "common_config.mystery: unknown key",
        "common_config.job_type: expected a non-empty string, got 3",
        "common_config.metrics_config.enable_metrics: expected true or false, got 'no'",
        "embedding_worker_config.forward_buffer_size: expected an int > 0, got -5",
        "embedding_parameter_server_config.capacity: expected an int > 0, got 'big'",
        "embedding_parameter_server_config.num_hashmap_internal_shards: expected an int > 0, got 0",
        "embedding_parameter_server_config.storage: expected one of ceph, hdfs, got 'S3'",
    ]
    assert len(problems) == len(expected_starts), problems
    for start in expected_starts:
        assert any(p.startswith(start) for p in problems), (start, problems)


# --- files and environment variables ---------------------------------------------------------


def test_embedding_config_from_environment(monkeypatch):
    monkeypatch.setenv(
        _settings.PERSIA_EMBEDDING_CONFIG, str(DATA / "sequence_embedding_config.yml")
    )
    assert load_embedding_config().slot_names[0] == "user_id"


def test_embedding_config_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(
        _settings.PERSIA_EMBEDDING_CONFIG, str(DATA / "sequence_embedding_config.yml")
    )
    cfg = load_embedding_config(DATA / "persia_adult_income_embedding_config.yml")
    assert cfg.slot_names[0] == "workclass"


def test_embedding_config_nowhere(monkeypatch):
    monkeypatch.delenv(_settings.PERSIA_EMBEDDING_CONFIG, raising=False)
    with pytest.raises(ConfigError, match=r"no embedding config: .*PERSIA_EMBEDDING_CONFIG"):
        load_embedding_config()


def test_global_config_from_environment(monkeypatch):
    monkeypatch.setenv(_settings.PERSIA_GLOBAL_CONFIG, str(DATA / "persia_infer_global_config.yml"))
    assert load_global_config().common_config.job_type == "infer"


def test_global_config_nowhere_gives_defaults(monkeypatch):
    monkeypatch.delenv(_settings.PERSIA_GLOBAL_CONFIG, raising=False)
    assert load_global_config() == GlobalConfig()


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"in .*absent.yml: file not found"):
        load_global_config(tmp_path / "absent.yml")


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("slots_config:\n  a: {dim: 1\n")
    with pytest.raises(ConfigError, match=r"in .*broken.yml: not valid YAML"):
        load_embedding_config(path)


def test_problems_name_the_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("slots_config:\n  age:\n    dim: 0\n")
    with pytest.raises(
        ConfigError, match=r"in .*bad.yml: slots_config.age.dim: expected an int > 0, got 0"
    ):
        load_embedding_config(path)
