"""The job-file schema: defaults, strict errors (all at once), overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from persia.errors import ConfigError
from persia.job.config import apply_overrides, load_job, parse_job

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"


def _minimal() -> dict:
    return {
        "data": {
            "train": "train.csv",
            "header": True,
            "ids": ["user", "item"],
            "dense": {"age": {"log1p": True}},
            "label": {"column": "click"},
        }
    }


def test_minimal_job_gets_documented_defaults(tmp_path: Path) -> None:
    job = parse_job(_minimal(), tmp_path)
    assert job.data.train.patterns == (str(tmp_path / "train.csv"),)
    assert job.data.test is None
    assert [s.name for s in job.embedding.slots] == ["user", "item"]
    assert {s.dim for s in job.embedding.slots} == {8}
    assert job.embedding.optimizer == "adagrad"
    assert job.embedding.optimizer_args == {"lr": 0.05}
    assert job.model.type == "dnn"
    t = job.training
    assert (t.backend, t.batch_size, t.epochs, t.staleness, t.seed) == ("local", 128, 1, 8, 0)
    assert t.dense_optimizer == "adam" and t.dense_optimizer_args == {"lr": 0.005}
    assert job.data.dense[0].log1p and job.data.dense[0].standardize
    assert job.data.missing_ids == "empty" and job.data.missing_label == "drop"


def test_slot_overrides_and_sources(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["test"] = {"paths": ["/abs/t-*.csv", "rel.csv"], "skip_rows": 1}
    raw["embedding"] = {"dim": 4, "slots": {"item": {"dim": 16, "pooling": "mean"}}}
    job = parse_job(raw, tmp_path)
    assert job.data.test is not None
    assert job.data.test.patterns == ("/abs/t-*.csv", str(tmp_path / "rel.csv"))
    assert job.data.test.skip_rows == 1 and job.data.train.skip_rows == 0
    slots = {s.name: s for s in job.embedding.slots}
    assert (slots["user"].dim, slots["user"].pooling) == (4, "sum")
    assert (slots["item"].dim, slots["item"].pooling) == (16, "mean")


def test_broken_job_lists_every_problem_at_once(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["colums"] = ["a"]  # unknown key (typo)
    raw["embedding"] = {"dim": "eight", "slots": {"nope": {"dim": 4}}}
    raw["training"] = {"staleness": 0, "batch_size": 12.5, "epochs": True, "progres": "bar"}
    raw["model"] = {"type": "not a model"}
    with pytest.raises(ConfigError) as info:
        parse_job(raw, tmp_path)
    problems = info.value.problems
    text = str(info.value)
    for needle in (
        "data.colums: unknown key",
        "embedding.dim: expected an int >= 1, got 'eight'",
        "embedding.slots.nope: not an ID column",
        "training.staleness: expected an int >= 1, got 0",
        "training.batch_size: expected an int >= 1, got 12.5",
        "training.epochs: expected an int >= 1, got True",
        "training.progres: unknown key",
        "model.type: expected one of dnn, dlrm, dcn_v2 or 'package.module:Class'",
    ):
        assert any(needle in p for p in problems), (needle, text)
    assert len(problems) == 8


def test_missing_sections_and_label(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_job({"data": {"ids": ["a"]}}, tmp_path)
    text = str(info.value)
    assert "data.train: expected a path" in text and "data.label: expected" in text
    with pytest.raises(ConfigError, match="data: expected a mapping"):
        parse_job({"training": {}}, tmp_path)


def test_bad_optimizer_options(tmp_path: Path) -> None:
    raw = _minimal()
    raw["embedding"] = {"optimizer": {"type": "adam", "lr": -1, "momentum": 0.9}}
    raw["training"] = {"dense_optimizer": {"type": "rmsprop"}}
    with pytest.raises(ConfigError) as info:
        parse_job(raw, tmp_path)
    text = str(info.value)
    assert "embedding.optimizer.lr: expected a number >= 0, got -1" in text
    assert "embedding.optimizer.momentum: unknown option of adam" in text
    assert "training.dense_optimizer.type: expected one of adam, adamw, sgd, adagrad" in text


def test_backend_is_local_or_ray(tmp_path: Path) -> None:
    raw = _minimal()
    raw["training"] = {"backend": "ray"}
    assert parse_job(raw, tmp_path).training.backend == "ray"
    raw["training"] = {"backend": "mpi"}
    with pytest.raises(ConfigError, match="training.backend"):
        parse_job(raw, tmp_path)


def test_columns_must_contain_used_columns(tmp_path: Path) -> None:
    raw = _minimal()
    del raw["data"]["header"]
    raw["data"]["columns"] = ["user", "click"]
    with pytest.raises(ConfigError) as info:
        parse_job(raw, tmp_path)
    assert "column 'item' is not in data.columns" in str(info.value)
    assert "column 'age' is not in data.columns" in str(info.value)


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    job = load_job(ADULT, ["training.staleness=1", "training.epochs=2", "embedding.dim=4"])
    assert job.training.staleness == 1 and job.training.epochs == 2
    assert {s.dim for s in job.embedding.slots} == {4}
    job = load_job(ADULT, ["embedding.slots.race.dim=3", "model.args={hidden: [32]}"])
    assert {s.name: s.dim for s in job.embedding.slots}["race"] == 3
    assert job.model.args == {"hidden": [32]}
    with pytest.raises(ConfigError) as info:
        load_job(ADULT, ["training.staleness=zero", "training.bogus=1"])
    text = str(info.value)
    assert "training.staleness: expected an int >= 1, got 'zero'" in text
    assert "training.bogus: unknown key" in text


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["training.staleness"])
    with pytest.raises(ConfigError, match="training.seed is 3, not a mapping"):
        apply_overrides({"training": {"seed": 3}}, ["training.seed.x=1"])
    out = apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d.e=null"])
    assert out == {"a": {"b": 1, "c": [1, 2]}, "d": {"e": None}}


def test_load_job_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)
    good = tmp_path / "job.yaml"
    good.write_text(yaml.safe_dump(_minimal()))
    assert load_job(good).source == str(good)
