"""Shared by the server tests: an Adult export, a PERSIA-API checkpoint with the predictions
``eval_ctx`` gives on it, and real ``persia serve`` processes on 127.0.0.1 (free ports)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
import yaml

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install .[serve])")
pytest.importorskip("httpx", reason="httpx is in the dev extra")

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"
START_TIMEOUT_S = 120.0  # generous: a loaded machine imports torch slowly


class Server:
    """``persia serve ARGS`` in a child process; ``url`` / ``grpc`` from its ready line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="persia-serve-", suffix=".log")
        cmd = [sys.executable, "-m", "persia.cli.main", "serve", *args]
        if "--host" not in args:
            cmd += ["--host", "127.0.0.1"]
        if "--port" not in args:
            cmd += ["--port", "0"]
        if "--grpc-port" not in args and "--no-grpc" not in args:
            cmd += ["--grpc-port", "0"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        self.info = self._ready_line()
        self.url: str = self.info["http"]
        self.grpc: str | None = self.info["grpc"]

    def _ready_line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                log = self.stderr()
                self.close()
                pytest.fail(f"persia serve did not start in {START_TIMEOUT_S} s: {log}")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                rc = self.proc.wait(10)
                pytest.fail(f"persia serve exited ({rc}) before listening: {self.stderr()}")
            line += chunk
        return json.loads(line.decode().splitlines()[0])

    def stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode


def raw_test_rows(job: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the Adult test file as JSON rows (text values, as read)."""
    path = job.data.test.files()[0]
    cols = list(job.data.columns)
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=cols, skip_rows=job.data.test.skip_rows),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in cols}),
    )
    return table.slice(0, n).drop_columns(["income_bracket"]).to_pylist()


@pytest.fixture(scope="session")
def export(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """An Adult export (2,048 training samples) and its job."""
    from persia.job.config import load_job
    from persia.serving import run_and_export

    tmp = tmp_path_factory.mktemp("server-export")
    job = load_job(ADULT, ["training.max_samples=2048", "training.progress=none"])
    run_and_export(job, tmp / "export")
    return SimpleNamespace(dir=tmp / "export", job=job)


@pytest.fixture(scope="session")
def export_server(export: SimpleNamespace):
    server = Server([str(export.dir), "--max-batch", "1100", "--max-request-bytes", "1048576"])
    yield server
    server.close()


class JitNet(torch.nn.Module):
    """Dense features + pooled embeddings, scriptable (dump_checkpoint scripts it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(3 + 8, 8)
        self.l2 = torch.nn.Linear(8, 1)

    def forward(self, non_id: list[torch.Tensor], embeddings: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([non_id[0]] + [e.flatten(1) for e in embeddings], dim=1)
        return torch.sigmoid(self.l2(torch.tanh(self.l1(x))))


def eval_predictions(model: torch.nn.Module, batches: list[Any]) -> list[np.ndarray]:
    """``eval_ctx``'s predictions of ``batches`` on the runtime of the last TrainCtx."""
    from persia.ctx import eval_ctx

    out = []
    model.eval()
    with eval_ctx(model=model) as ectx, torch.no_grad():
        for i, pb in enumerate(batches):
            item = ectx.runtime.lookup(pb, False, i, None)
            pred, _ = ectx.forward(item)
            out.append(pred.numpy().reshape(-1).copy())
        ectx.current_batch = None
    model.train()
    return out


def write_embedding_config(path: Path) -> Path:
    from runtime._jobs import PREFIX_BITS, SLOTS

    path.write_text(
        yaml.safe_dump({"feature_index_prefix_bit": PREFIX_BITS, "slots_config": SLOTS})
    )
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A TrainCtx job (30 batches) dumped with its TorchScript model, PERSIA's embedding config,
    request batches (one with IDs never trained) and eval_ctx's predictions of them."""
    from runtime._jobs import make_batches, run, to_persia, train_ctx

    from persia.ctx._stack import last_runtime

    tmp = tmp_path_factory.mktemp("server-ckpt")
    ckpt = tmp / "ckpt"
    model = JitNet()
    batches = [to_persia(b, requires_grad=False) for b in make_batches(3, seed=7)]
    batches.append(to_persia(make_batches(1, batch_size=5, seed=99)[0], requires_grad=False))
    with train_ctx(model) as ctx:
        run(ctx, make_batches(30))
        ctx.dump_checkpoint(ckpt, with_jit_model=True)
        expected = eval_predictions(model, batches)
    runtime = last_runtime()
    if runtime is not None:
        runtime.close()
    return SimpleNamespace(
        dir=ckpt,
        embedding_config=write_embedding_config(tmp / "embedding_config.yml"),
        batches=batches,
        expected=expected,
    )


@pytest.fixture(scope="session")
def checkpoint_server(checkpoint: SimpleNamespace):
    server = Server(
        [str(checkpoint.dir), "--embedding-config", str(checkpoint.embedding_config)]
        + ["--model-name", "adult_income"]
    )
    yield server
    server.close()
