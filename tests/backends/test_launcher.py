"""persia-launcher: a PERSIA Procfile's roles as separate processes against one Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from runtime._jobs import ListDataset, Net, embedding_file, make_batches

from persia.cli.launcher import main as launcher_main
from persia.ctx import TrainCtx
from persia.data import DataLoader
from persia.embedding.optim import Adagrad

ROOT = Path(__file__).resolve().parents[2]
TESTS = str(ROOT / "tests")

EMBEDDING_YML = """\
feature_index_prefix_bit: 12
slots_config:
  a: {dim: 4}
  b: {dim: 4, pooling: mean}
"""
GLOBAL_YML = """\
common_config: {job_type: Train}
embedding_parameter_server_config: {capacity: 100000, num_hashmap_internal_shards: 1}
"""
TRAIN_PY = """\
import json, sys
sys.path.insert(0, {tests!r})
import torch
from runtime._jobs import Net
from persia.ctx import TrainCtx
from persia.data import DataLoader, StreamingDataset
from persia.embedding.optim import Adagrad

torch.manual_seed(0)
model = Net()
losses = []
with TrainCtx(Adagrad(lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1), model=model) as ctx:
    for b in DataLoader(StreamingDataset(timeout_s=60), embedding_staleness=1):
        out, labels = ctx.forward(b)
        loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
        ctx.backward(loss)
        losses.append(loss.item())
    shards = ctx.get_embedding_size()
print(json.dumps({{"losses": losses, "shards": shards}}))
"""
LOADER_PY = """\
import sys
sys.path.insert(0, {tests!r})
from runtime._jobs import make_batches, to_persia
from persia.ctx import DataCtx

with DataCtx() as ctx:
    for b in make_batches(6, seed=21):
        ctx.send_data(to_persia(b))
"""


def test_a_procfile_of_persia_roles_trains_like_one_process(ray_cluster, tmp_path):
    (tmp_path / "embedding_config.yml").write_text(EMBEDDING_YML)
    (tmp_path / "global_config.yml").write_text(GLOBAL_YML)
    (tmp_path / "train.py").write_text(TRAIN_PY.format(tests=TESTS))
    (tmp_path / "loader.py").write_text(LOADER_PY.format(tests=TESTS))
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    env["PERSIA_JOB_NAME"] = "procfile-test"
    launcher = str(Path(sys.executable).parent / "persia-launcher")
    configs = ["--embedding-config", "embedding_config.yml", "--global-config", "global_config.yml"]
    procfile = {
        "ps0": [
            "embedding-parameter-server",
            *configs,
            "--replica-index",
            "0",
            "--replica-size",
            "2",
        ],
        "ps1": [
            "embedding-parameter-server",
            *configs,
            "--replica-index",
            "1",
            "--replica-size",
            "2",
        ],
        "embedding_worker": ["embedding-worker", *configs],
        "data_loader": ["data-loader", "loader.py", "--replica-index", "0", "--replica-size", "1"],
        "nn_worker": ["nn-worker", "train.py", "--nproc-per-node", "1", *configs],
    }
    procs = {
        name: subprocess.Popen(
            [launcher, *cmd],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, cmd in procfile.items()
    }
    try:
        out, err = procs["nn_worker"].communicate(timeout=180)
        assert procs["nn_worker"].returncode == 0, err[-3000:]
        assert procs["data_loader"].wait(timeout=60) == 0
        for name in ("ps0", "ps1", "embedding_worker"):
            assert procs[name].poll() is None, f"{name} ended early"
            procs[name].send_signal(signal.SIGTERM)
        for name in ("ps0", "ps1", "embedding_worker"):
            assert procs[name].wait(timeout=60) == 0, procs[name].stderr.read()[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["shards"]) == 2 and sum(result["shards"]) > 0
    # The same batches and seeds in one process, local backend: the launched servers took the
    # NN worker's optimizer and row settings, so training is bit-identical.
    torch.manual_seed(0)
    model = Net()
    with TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(),
    ) as ctx:
        want = []
        for b in DataLoader(ListDataset(make_batches(6, seed=21)), embedding_staleness=1):
            out_t, labels = ctx.forward(b)
            loss = torch.nn.functional.binary_cross_entropy(out_t, labels[0])
            ctx.backward(loss)
            want.append(loss.item())
    assert result["losses"] == want


def test_launcher_refuses_bad_arguments(capsys):
    assert (
        launcher_main(["data-loader", "x.py", "--replica-index", "2", "--replica-size", "2"]) == 2
    )
    assert "--replica-index must be in" in capsys.readouterr().err
    assert launcher_main(["nn-worker", "x.py", "--nproc-per-node", "0"]) == 2
