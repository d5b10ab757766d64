"""persia.env, persia.utils, persia.logger."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from persia import _settings
from persia.env import get_local_rank, get_rank, get_world_size
from persia.errors import ConfigError
from persia.logger import (
    get_default_logger,
    get_logger,
    reset_warn_once,
    set_logger,
    warn_once,
)
from persia.utils import load_yaml, setup_seed

# --- env ----------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in (_settings.RANK, _settings.WORLD_SIZE, _settings.LOCAL_RANK):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_env_defaults(clean_env):
    assert (get_rank(), get_world_size(), get_local_rank()) == (0, 1, 0)


def test_env_from_variables(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    assert (get_rank(), get_world_size(), get_local_rank()) == (3, 4, 1)


def test_env_not_an_int(clean_env):
    clean_env.setenv("RANK", "abc")
    with pytest.raises(ConfigError, match=r"RANK: expected an integer, got 'abc'"):
        get_rank()


def test_env_negative_local_rank(clean_env):
    clean_env.setenv("LOCAL_RANK", "-1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK: expected an integer >= 0, got -1"):
        get_local_rank()


def test_env_zero_world_size(clean_env):
    clean_env.setenv("WORLD_SIZE", "0")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE: expected an integer >= 1, got 0"):
        get_world_size()


def test_env_rank_not_below_world_size(clean_env):
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"RANK: expected a rank below WORLD_SIZE=2, got 2"):
        get_rank()


def test_env_uses_initialised_process_group(clean_env, tmp_path):
    import torch.distributed as dist

    clean_env.setenv("RANK", "5")  # ignored once a process group exists
    clean_env.setenv("WORLD_SIZE", "9")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert (get_rank(), get_world_size()) == (0, 1)
    finally:
        dist.destroy_process_group()


# --- utils --------------------------------------------------------------------------------------


def test_setup_seed_makes_every_generator_repeat():
    import torch

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    try:
        setup_seed(123)
        first = draw()
        setup_seed(123)
        assert draw() == first
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_setup_seed_rejects_bad_seed(seed):
    with pytest.raises(ConfigError, match=r"seed: expected an int in \[0, 2\*\*32\)"):
        setup_seed(seed)


def test_load_yaml(tmp_path):
    path = tmp_path / "a.yml"
    path.write_text("a: [1, 2]\n")
    assert load_yaml(path) == {"a": [1, 2]}


def test_load_yaml_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yml.*file not found"):
        load_yaml(tmp_path / "nope.yml")


def test_load_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yml.*not valid YAML"):
        load_yaml(path)


# --- logger -------------------------------------------------------------------------------------


def _ours(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if getattr(h, "_persia_handler_kind", None)]


def test_default_logger_is_a_singleton_without_duplicate_handlers():
    a = get_default_logger()
    b = get_default_logger("ignored-on-second-call")
    assert a is b and isinstance(a, logging.Logger)
    assert len(_ours(a)) == 1


def test_set_logger_twice_adds_one_stream_handler(tmp_path):
    name = "persia-test-set-logger"
    log_file = tmp_path / "train.log"
    for _ in range(2):
        logger = set_logger(name, enable_file_logger=True, log_filename=str(log_file))
    assert sorted(getattr(h, "_persia_handler_kind", "") for h in _ours(logger)) == [
        "file",
        "stream",
    ]
    logger.info("hello file")
    for h in logger.handlers:
        h.flush()
    assert "hello file" in log_file.read_text()
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def test_get_logger_one_line_format():
    logger = get_logger("persia.test_logger_format")
    get_logger("persia.test_logger_format")
    handlers = _ours(logging.getLogger("persia"))
    assert len(handlers) == 1
    record = logger.makeRecord(logger.name, logging.WARNING, "x.py", 7, "one line please", (), None)
    line = handlers[0].format(record)
    assert "\n" not in line
    assert "WARNING" in line and "[x.py:7] persia.test_logger_format: one line please" in line


def test_warn_once(caplog):
    reset_warn_once()
    logger = get_logger("persia.test_warn_once")
    with caplog.at_level(logging.WARNING, logger="persia"):
        assert warn_once(logger, "k", "no effect")
        assert not warn_once(logger, "k", "no effect")
        assert warn_once(logger, "other", "no effect either")
    assert [r.getMessage() for r in caplog.records] == ["no effect", "no effect either"]
    reset_warn_once()
    assert warn_once(logger, "k", "again")
