"""PERSIA's API names that issue 15 lists, with PERSIA's signatures, and what they do here.

The expected signatures are PERSIA's (its ``persia/distributed.py``, ``env.py``, ``utils.py``,
``logger.py``, ``ctx.py``, ``data.py``), written down as parameter names and defaults.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from persia import _settings
from persia.errors import BatchError, ConfigError, PersiaError

_REQUIRED = inspect.Parameter.empty
_VAR_KW = "**"

#: (module, name) -> PERSIA's parameters in order: (name, default) or (name, "**") for **kwargs.
PERSIA_SIGNATURES: dict[tuple[str, str], list[tuple[str, object]]] = {
    ("persia.distributed", "DistributedBaseOption.__init__"): [
        ("self", _REQUIRED),
        ("master_port", _REQUIRED),
        ("master_addr", None),
    ],
    ("persia.distributed", "DDPOption.__init__"): [
        ("self", _REQUIRED),
        ("initialization_method", "tcp"),
        ("backend", "nccl"),
        ("options", _VAR_KW),
    ],
    ("persia.distributed", "DDPOption.convert2distributed_model"): [
        ("self", _REQUIRED),
        ("model", _REQUIRED),
        ("world_size", _REQUIRED),
        ("rank_id", _REQUIRED),
        ("device_id", None),
        ("master_addr", None),
        ("optimizer", None),
    ],
    ("persia.distributed", "DDPOption.init_with_env_file"): [("self", _REQUIRED)],
    ("persia.distributed", "BaguaDistributedOption.__init__"): [
        ("self", _REQUIRED),
        ("algorithm", _REQUIRED),
        ("options", _VAR_KW),
    ],
    ("persia.distributed", "get_default_distributed_option"): [("device_id", None)],
    ("persia.env", "get_replica_index"): [],
    ("persia.env", "get_replica_size"): [],
    ("persia.env", "get_rank"): [],
    ("persia.env", "get_world_size"): [],
    ("persia.env", "get_local_rank"): [],
    ("persia.env", "reload_env"): [],
    ("persia.env", "set_env"): [("kwargs", _VAR_KW)],
    ("persia.utils", "dump_yaml"): [("content", _REQUIRED), ("filepath", _REQUIRED)],
    ("persia.utils", "find_free_port"): [("port", 10000), ("interval", 1)],
    ("persia.utils", "load_yaml"): [("filepath", _REQUIRED)],
    ("persia.utils", "setup_seed"): [("seed", _REQUIRED)],
    ("persia.logger", "setLogger"): [
        ("name", _REQUIRED),
        ("log_level", logging.INFO),  # PERSIA: DEBUG; persia logs INFO and up by default
        ("log_filename", "train.log"),
        ("enable_file_logger", False),
        ("err_redirect_filepath", "error.log"),
        ("enable_err_redirect", False),
        ("err_redirect_level", logging.INFO),
    ],
    ("persia.logger", "get_logger"): [("name", _REQUIRED)],
    ("persia.logger", "get_default_logger"): [("name", None), ("kwargs", _VAR_KW)],
    ("persia.logger", "levelFilter.__init__"): [("self", _REQUIRED), ("level", _REQUIRED)],
    ("persia.data", "IterableDatasetBase.__init__"): [("self", _REQUIRED), ("buffer_size", 10)],
    ("persia.ctx", "EmbeddingCtx.get_embedding_from_data"): [
        ("self", _REQUIRED),
        ("persia_batch", _REQUIRED),
        ("device_id", None),
    ],
    ("persia.ctx", "TrainCtx.wait_servers_ready"): [("self", _REQUIRED)],
}

#: Names PERSIA's modules define that are not functions (constants, classes, modules).
PERSIA_NAMES = {
    "persia.distributed": ["DDPOption", "BaguaDistributedOption", "DistributedBaseOption"],
    "persia.logger": [
        "DEFAULT_LOGGER_NAME",
        "STREAM_LOG_FORMAT",
        "FILE_LOG_FORMAT",
        "LOG_COLOR",
        "COLOR_FORMATTER",
        "FORMATTER",
        "levelFilter",
    ],
    "persia.utils": ["MAXIMUM_LOCAL_PORT_NUM"],
    "persia.data": ["IterableDatasetBase", "IterableDataset", "StreamingDataset", "DataLoader"],
    "persia.version": ["__version__"],
}


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("where", sorted(PERSIA_SIGNATURES), ids=lambda w: f"{w[0]}.{w[1]}")
def test_persia_signature(where):
    module, name = where
    params = list(inspect.signature(_resolve(module, name)).parameters.values())
    expected = PERSIA_SIGNATURES[where]
    assert len(params) >= len(expected), params
    for param, (exp_name, exp_default) in zip(params, expected, strict=False):
        assert param.name == exp_name, (name, params)
        if exp_default == _VAR_KW:
            assert param.kind is inspect.Parameter.VAR_KEYWORD, (name, param)
        else:
            assert param.default == exp_default, (name, param)
    # anything persia adds comes after PERSIA's parameters and has a default
    for extra in params[len(expected) :]:
        assert extra.default is not _REQUIRED or extra.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ), (name, extra)


@pytest.mark.parametrize("module", sorted(PERSIA_NAMES))
def test_persia_names_import(module):
    mod = importlib.import_module(module)
    missing = [n for n in PERSIA_NAMES[module] if not hasattr(mod, n)]
    assert not missing


def test_version_module():
    import persia
    from persia.version import __version__

    assert __version__ == persia.__version__


# --- persia.distributed -------------------------------------------------------------------------


@pytest.fixture
def no_master_env(monkeypatch):
    monkeypatch.delenv(_settings.MASTER_ADDR, raising=False)
    monkeypatch.delenv(_settings.MASTER_PORT, raising=False)
    return monkeypatch


def test_ddp_option_defaults_are_persias(no_master_env):
    from persia.distributed import DEFAULT_MASTER_PORT, DDPOption

    opt = DDPOption()
    assert (opt.initialization_method, opt.backend) == ("tcp", "nccl")
    assert (opt.master_port, opt.master_addr) == (23456, None) == (DEFAULT_MASTER_PORT, None)
    assert not opt.init_with_env_file()
    with pytest.raises(ConfigError, match="needs master_addr= or MASTER_ADDR"):
        opt.resolved_init_method()
    assert opt.resolved_init_method("10.0.0.1") == "tcp://10.0.0.1:23456"


def test_ddp_option_master_from_arguments_and_environment(no_master_env):
    from persia.distributed import DDPOption

    given = DDPOption(backend="gloo", master_port=23333, master_addr="localhost")
    assert given.resolved_init_method("10.0.0.1") == "tcp://localhost:23333"
    no_master_env.setenv(_settings.MASTER_ADDR, "10.1.2.3")
    no_master_env.setenv(_settings.MASTER_PORT, "29500")
    # what persia-launcher nn-worker / torchrun set is used when the option names nothing...
    assert DDPOption(backend="gloo").resolved_init_method() == "tcp://10.1.2.3:29500"
    # ...and an explicit port or address wins over it
    assert given.resolved_init_method() == "tcp://localhost:23333"
    no_master_env.setenv(_settings.MASTER_PORT, "http")
    with pytest.raises(ConfigError, match="MASTER_PORT: expected a port, got 'http'"):
        DDPOption(backend="gloo").resolved_init_method()


def test_ddp_option_file(tmp_path):
    from persia.distributed import DDPOption

    sync = tmp_path / "sync"
    opt = DDPOption("file", backend="gloo", sync_file=str(sync))
    assert opt.init_with_env_file()
    assert opt.resolved_init_method() == f"file://{sync}"
    sync.write_text("")
    with pytest.raises(ConfigError, match="already exists"):
        opt.resolved_init_method()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "mpi"}, "backend must be one of \\['nccl', 'gloo'\\], got 'mpi'"),
        ({"initialization_method": "env"}, "initialization_method must be one of"),
        ({"initialization_method": "file"}, 'initialization_method="file" needs sync_file'),
        ({"master_port": 0}, "master_port must be an int in \\[1, 65535\\], got 0"),
        ({"bucket_cap_mb": 25}, "unknown options \\['bucket_cap_mb'\\]"),
    ],
)
def test_ddp_option_refuses(kwargs, message):
    from persia.distributed import DDPOption

    with pytest.raises(ConfigError, match=message):
        DDPOption(**kwargs)


def test_default_distributed_option():
    from persia.distributed import DDPOption, get_default_distributed_option

    cpu = get_default_distributed_option()
    assert isinstance(cpu, DDPOption) and cpu.backend == "gloo"
    assert get_default_distributed_option(0).backend == "nccl"


def test_bagua_is_not_available():
    from persia.distributed import BaguaDistributedOption, BaguaNotAvailableError

    with pytest.raises(BaguaNotAvailableError) as info:
        BaguaDistributedOption("gradient_allreduce", enable_bagua_net=True)
    assert isinstance(info.value, ImportError) and isinstance(info.value, PersiaError)
    assert "Bagua is not available in persia" in str(info.value)
    assert "DDPOption" in str(info.value)


def test_ddp_option_wraps_a_model_in_one_process_group(tmp_path):
    from persia.distributed import DDPOption

    assert not dist.is_initialized()
    opt = DDPOption("file", backend="gloo", sync_file=str(tmp_path / "pg"))
    model = torch.nn.Linear(3, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        wrapped, optimizer = opt.convert2distributed_model(model, 1, 0, optimizer=sgd)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        assert optimizer is sgd and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_nccl_without_cuda_is_a_config_error(no_master_env):
    from persia.distributed import DDPOption
    from persia.runtime.distributed import wrap_ddp

    with pytest.raises(ConfigError, match="backend 'nccl' needs a CUDA device"):
        wrap_ddp(torch.nn.Linear(2, 1), DDPOption(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="distributed_option must be a persia.distributed"):
        wrap_ddp(torch.nn.Linear(2, 1), object(), torch.device("cpu"))
    assert not dist.is_initialized()


# --- persia.env ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    from persia import env

    for name in (
        _settings.RANK,
        _settings.WORLD_SIZE,
        _settings.LOCAL_RANK,
        _settings.REPLICA_INDEX,
        _settings.REPLICA_SIZE,
    ):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    env._overrides.clear()


def test_replica_index_and_size(clean_env):
    from persia.env import get_replica_index, get_replica_size

    assert (get_replica_index(), get_replica_size()) == (0, 1)
    clean_env.setenv(_settings.REPLICA_INDEX, "2")
    clean_env.setenv(_settings.REPLICA_SIZE, "3")
    assert (get_replica_index(), get_replica_size()) == (2, 3)
    clean_env.setenv(_settings.REPLICA_SIZE, "2")
    with pytest.raises(ConfigError, match="REPLICA_INDEX: expected an index below REPLICA_SIZE=2"):
        get_replica_index()
    clean_env.setenv(_settings.REPLICA_SIZE, "x")
    with pytest.raises(ConfigError, match="REPLICA_SIZE: expected an integer, got 'x'"):
        get_replica_size()


def test_set_env_and_reload_env(clean_env):
    from persia import env

    clean_env.setenv(_settings.WORLD_SIZE, "4")
    clean_env.setenv(_settings.RANK, "3")
    env.set_env(rank=1, replica_index=5, replica_size=8)
    assert env.get_rank() == 1 and env.get_world_size() == 4  # world size: still the variable
    assert (env.get_replica_index(), env.get_replica_size()) == (5, 8)
    env.reload_env()
    assert env.get_rank() == 3 and (env.get_replica_index(), env.get_replica_size()) == (0, 1)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['node'\\]"):
        env.set_env(node=1)
    with pytest.raises(ConfigError, match="set_env\\(world_size=...\\): expected an int >= 1"):
        env.set_env(world_size=0)
    clean_env.setenv(_settings.RANK, "9")
    with pytest.raises(ConfigError, match="RANK: expected a rank below WORLD_SIZE=4, got 9"):
        env.reload_env()  # checks the environment at once


# --- persia.utils -------------------------------------------------------------------------------


def test_dump_yaml_round_trip(tmp_path):
    from persia.utils import dump_yaml, load_yaml

    content = {"slots_config": {"user_id": {"dim": 8}}, "feature_index_prefix_bit": 12}
    dump_yaml(content, tmp_path / "e.yml")
    assert load_yaml(tmp_path / "e.yml") == content
    with pytest.raises(ConfigError, match="cannot write as YAML"):
        dump_yaml({"x": object()}, tmp_path / "bad.yml")


def test_find_free_port():
    from persia.utils import MAXIMUM_LOCAL_PORT_NUM, find_free_port

    with socket.socket() as taken:
        taken.bind(("", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        port = find_free_port(busy)
        assert port > busy
        with socket.socket() as s:
            s.bind(("", port))  # it really is free
    with pytest.raises(ValueError, match="no free port"):
        find_free_port(MAXIMUM_LOCAL_PORT_NUM + 1)
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        find_free_port(10000, 0)


# --- persia.logger ------------------------------------------------------------------------------


def test_level_filter():
    from persia.logger import FORMATTER, levelFilter

    keep = levelFilter(logging.INFO)
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "m", None, None)
    low = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert keep.filter(rec) and not keep.filter(low)
    assert "WARNING" in FORMATTER.format(rec)


# --- exceptions PERSIA raised as built-ins --------------------------------------------------------


def test_training_batch_without_labels_is_a_runtime_error():
    from persia.embedding.data import IDTypeFeature, PersiaBatch

    with pytest.raises(RuntimeError) as info:
        PersiaBatch(id_type_features=[IDTypeFeature("test_name", [np.array([1], dtype=np.uint64)])])
    assert isinstance(info.value, BatchError)


# --- IterableDatasetBase, get_embedding_from_data, wait_servers_ready -----------------------------


def test_iterable_dataset_base_get_embedding_from_data_and_wait_servers_ready(monkeypatch):
    from runtime._jobs import Net, embedding_file, make_batches, to_persia

    from persia.ctx import TrainCtx
    from persia.data import DataLoader, IterableDataset, IterableDatasetBase
    from persia.embedding.optim import Adagrad

    for name in (_settings.WORLD_SIZE, _settings.RANK, _settings.PERSIA_BACKEND):
        monkeypatch.delenv(name, raising=False)
    batches = make_batches(4)

    class PersiaStyle(IterableDatasetBase):  # PERSIA's way: __iter__ (+ consume_dataset)
        def __iter__(self):
            for b in batches[:2]:
                yield to_persia(b)

        def consume_dataset(self):  # PERSIA's abstract method; persia never calls it
            raise AssertionError("not called")

    assert issubclass(IterableDataset, IterableDatasetBase)
    model = Net()
    ctx = TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(),
    )
    with pytest.raises(PersiaError, match="enter the context first"):
        ctx.wait_servers_ready()
    with ctx:
        ctx.wait_servers_ready()
        trained = 0
        for batch in DataLoader(PersiaStyle()):
            out, labels = ctx.forward(batch)
            ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))
            trained += 1
        assert trained == 2
        ctx.runtime.flush()
        applied = ctx.runtime.batches_applied
        direct = ctx.get_embedding_from_data(to_persia(batches[2]))
        assert direct.training and direct.lookup.summed.shape == (16, 8)
        out, labels = ctx.forward(direct)
        ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))
        ctx.runtime.flush()
        assert ctx.runtime.batches_applied == applied + 1  # its gradients were applied
        frozen = ctx.get_embedding_from_data(to_persia(batches[3], requires_grad=False))
        assert not frozen.training
        with pytest.raises(BatchError, match="expects a PersiaBatch, got list"):
            ctx.get_embedding_from_data([1, 2])
        with pytest.raises(PersiaError, match="device_id=3"):
            ctx.get_embedding_from_data(to_persia(batches[3]), device_id=3)
