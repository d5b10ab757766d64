"""torchrun (``RANK`` / ``WORLD_SIZE > 1``) with the local backend is refused at once: every rank
would build and train its own embedding table. The cluster backend's DDP path (NN-worker actors
that set ``WORLD_SIZE`` themselves) is tested in tests/backends/test_ray_ddp.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from persia import _settings
from persia.ctx import TrainCtx
from persia.embedding.optim import Adagrad
from persia.errors import PersiaError
from runtime._jobs import Net, embedding_file


def _train_ctx(**kwargs):
    model = Net()
    return TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(),
        **kwargs,
    )


@pytest.fixture
def torchrun_env(monkeypatch):
    for name in (_settings.PERSIA_BACKEND, _settings.MASTER_ADDR, _settings.MASTER_PORT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(_settings.WORLD_SIZE, "2")
    return monkeypatch


@pytest.mark.parametrize("rank", [0, 1])
def test_local_backend_refuses_world_size_above_one(torchrun_env, rank):
    torchrun_env.setenv(_settings.RANK, str(rank))
    torchrun_env.setenv(_settings.LOCAL_RANK, str(rank))
    with pytest.raises(PersiaError) as info:
        _train_ctx()
    msg = str(info.value)
    assert f"WORLD_SIZE=2 (rank {rank}" in msg
    assert "its own embedding table" in msg
    assert "--backend ray" in msg and 'backend="ray"' in msg
    assert not dist.is_initialized()  # refused before joining any process group


def test_explicit_local_backend_is_refused_too(torchrun_env):
    torchrun_env.setenv(_settings.RANK, "0")
    with pytest.raises(PersiaError, match="--backend ray"):
        _train_ctx(backend="local")


def test_world_size_one_still_trains_locally(torchrun_env):
    torchrun_env.setenv(_settings.WORLD_SIZE, "1")
    torchrun_env.setenv(_settings.RANK, "0")
    with _train_ctx() as ctx:
        assert ctx.world_size == 1
        assert not isinstance(ctx.model, torch.nn.parallel.DistributedDataParallel)


_RANK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from persia.ctx import TrainCtx
    from persia.embedding.optim import Adagrad
    from persia.errors import PersiaError
    from runtime._jobs import Net, embedding_file
    model = Net()
    try:
        TrainCtx(Adagrad(lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                 embedding_config_file=embedding_file())
    except PersiaError as exc:
        print("REFUSED", exc)
        sys.exit(3)
    print("STARTED")
    """
)


def test_two_torchrun_style_processes_are_refused(tmp_path):
    """Two processes as torchrun starts them (RANK / WORLD_SIZE / MASTER_* set): both stop at
    once with the refusal, neither waits for the other at a rendezvous."""
    import pathlib

    tests = str(pathlib.Path(__file__).resolve().parents[1])
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(tests=tests))
    base = _settings.environment()
    base.pop(_settings.PERSIA_BACKEND, None)
    procs = []
    for rank in range(2):
        env = dict(base)
        env.update(
            {
                _settings.RANK: str(rank),
                _settings.LOCAL_RANK: str(rank),
                _settings.WORLD_SIZE: "2",
                _settings.MASTER_ADDR: "127.0.0.1",
                _settings.MASTER_PORT: "29599",
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 3, out
        assert "REFUSED" in out and f"rank {rank}" in out and "--backend ray" in out, out
