"""persia-launcher: a PERSIA Procfile's roles as separate processes against one Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from runtime._jobs import ListDataset, Net, embedding_file, make_batches

from persia import _settings
from persia.cli.launcher import _entry, build_parser
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
import pytest
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_persias_procfile_runs_unchanged_with_a_ray_head_line(tmp_path):
    """PERSIA's adult-income Procfile, its nats_server line replaced by ``persia-launcher
    ray-head``: no RAY_ADDRESS, no config files for the NN worker (it takes them from the
    parameter servers), the data loader's script from PERSIA_DATALOADER_ENTRY; the parameter
    servers' data channels on given ports (``--port``)."""
    (tmp_path / "embedding_config.yml").write_text(EMBEDDING_YML)
    (tmp_path / "global_config.yml").write_text(GLOBAL_YML)
    (tmp_path / "train.py").write_text(TRAIN_PY.format(tests=TESTS))
    (tmp_path / "loader.py").write_text(LOADER_PY.format(tests=TESTS))
    env = dict(os.environ)
    for name in (
        "RAY_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
        "PERSIA_EMBEDDING_CONFIG",
        "PERSIA_GLOBAL_CONFIG",
        "PERSIA_BACKEND",
    ):
        env.pop(name, None)
    temp_dir = tempfile.mkdtemp(prefix="persia-head-")  # short: Ray's socket paths
    env["PERSIA_RAY_TEMP_DIR"] = temp_dir
    env["PERSIA_JOB_NAME"] = "procfile-test"
    env["PERSIA_DATALOADER_ENTRY"] = "loader.py"
    launcher = str(Path(sys.executable).parent / "persia-launcher")
    configs = ["--embedding-config", "embedding_config.yml", "--global-config", "global_config.yml"]
    ps_ports = [_free_port(), _free_port()]
    procfile = {
        "ray_head": ["ray-head", "--port", str(_free_port()), "--num-cpus", "2"],
        "ps0": ["embedding-parameter-server", *configs, "--replica-index", "0", "--replica-size"]
        + ["2", "--port", str(ps_ports[0])],
        "ps1": ["embedding-parameter-server", *configs, "--replica-index", "1", "--replica-size"]
        + ["2", "--port", str(ps_ports[1])],
        "embedding_worker": ["embedding-worker", *configs],
        "data_loader": ["data-loader", "--replica-index", "0", "--replica-size", "1"],
        "nn_worker": ["nn-worker", "train.py"],
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
    outputs: dict[str, str] = {}
    try:
        out, err = procs["nn_worker"].communicate(timeout=240)
        assert procs["nn_worker"].returncode == 0, err[-3000:]
        assert procs["data_loader"].wait(timeout=60) == 0
        servers = ("ps0", "ps1", "embedding_worker", "ray_head")
        for name in servers:
            assert procs[name].poll() is None, f"{name} ended early"
        for name in servers:  # the head last: the others leave it first
            procs[name].send_signal(signal.SIGTERM)
            pout, perr = procs[name].communicate(timeout=60)
            assert procs[name].returncode == 0, perr[-2000:]
            outputs[name] = pout
    finally:
        for p in procs.values():  # SIGTERM first: ray-head then stops its Ray processes
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
    for rank, port in enumerate(ps_ports):
        assert f":{port}" in outputs[f"ps{rank}"], outputs[f"ps{rank}"]
    assert "persia-launcher ray-head: Ray head at " in outputs["ray_head"]
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


def test_entry_files_fall_back_to_persias_variables(monkeypatch, capsys):
    monkeypatch.delenv(_settings.PERSIA_NN_WORKER_ENTRY, raising=False)
    monkeypatch.delenv(_settings.PERSIA_DATALOADER_ENTRY, raising=False)
    assert launcher_main(["nn-worker"]) == 2
    assert "FILE: give the script to run, or set PERSIA_NN_WORKER_ENTRY" in capsys.readouterr().err
    assert launcher_main(["data-loader"]) == 2
    assert "or set PERSIA_DATALOADER_ENTRY" in capsys.readouterr().err
    monkeypatch.setenv(_settings.PERSIA_NN_WORKER_ENTRY, "train.py")
    monkeypatch.setenv(_settings.PERSIA_DATALOADER_ENTRY, "data_loader.py")
    parser = build_parser()
    nn = parser.parse_args(["nn-worker"])
    assert _entry(nn, _settings.PERSIA_NN_WORKER_ENTRY) == "train.py"
    dl = parser.parse_args(["data-loader", "--replica-index", "0", "--replica-size", "1"])
    assert _entry(dl, _settings.PERSIA_DATALOADER_ENTRY) == "data_loader.py"
    given = parser.parse_args(["nn-worker", "mine.py"])  # the command line wins
    assert _entry(given, _settings.PERSIA_NN_WORKER_ENTRY) == "mine.py"
    assert parser.parse_args(["embedding-worker", "--port", "8887"]).port == 8887


def test_roles_without_a_ray_cluster_fail_with_the_way_out(monkeypatch, tmp_path):
    from persia.backends.ray.launch import role_ray_env
    from persia.errors import BackendError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PERSIA_RAY_TEMP_DIR", str(tmp_path))
    with pytest.raises(BackendError, match="persia-launcher ray-head"):
        role_ray_env(0.3)
    (tmp_path / "head_address").write_text(f"127.0.0.1:{_free_port()}\n")  # a dead head
    with pytest.raises(BackendError, match="does not answer"):
        role_ray_env(0.3)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert role_ray_env(0.3) == {"RAY_ADDRESS": "10.0.0.1:6379"}


def test_ray_head_command_starts_or_joins(monkeypatch, tmp_path):
    from persia.backends.ray.launch import ray_head_command

    monkeypatch.setenv("PERSIA_RAY_TEMP_DIR", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.setenv(name, "")  # recorded, so the token path set below is undone after
        monkeypatch.delenv(name)
    cmd, env = ray_head_command("ray", 6390, None, 2, None)
    assert cmd[:3] == ["ray", "start", "--block"]
    assert {"--head", "--port=6390", "--num-cpus=2"} <= set(cmd)
    assert not [c for c in cmd if c.startswith("--node-ip-address")]  # Ray's choice
    assert f"--temp-dir={tmp_path}" in cmd
    # a fresh token beside the head's files, for the head and (through the file) the roles
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "auth_token")
    assert env["RAY_AUTH_MODE"] == "token"
    assert (tmp_path / "auth_token").stat().st_mode & 0o777 == 0o600
    join, _ = ray_head_command("ray", 6390, "10.0.0.2", None, "10.0.0.1:6379")
    assert "--address=10.0.0.1:6379" in join and "--head" not in join
    assert "--node-ip-address=10.0.0.2" in join


def test_ray_head_refuses_a_port_in_use(monkeypatch, capsys):
    import socket

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert launcher_main(["ray-head", "--port", str(port)]) == 1
    assert f"port {port} is in use: another Ray head?" in capsys.readouterr().err
    assert launcher_main(["ray-head", "--port", "0"]) == 2


ADULT = ROOT / "examples" / "adult_income"
#: what PERSIA's examples/src/adult-income/.honcho.env sets (the NATS URL has no use in persia)
PERSIA_HONCHO_ENV = {"PERSIA_NATS_URL": "nats://0.0.0.0:4222", "LOG_LEVEL": "info"}


def _procfile_lines(path: Path) -> dict[str, str]:
    """``name: command`` lines, read as honcho reads a Procfile (other lines are comments)."""
    import re

    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the line's process (a one-command line's shell execs it), SIGKILL after 60 s;
    then SIGKILL to whatever of its process group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_adult_example_runs_from_its_procfile(tmp_path):
    """Acceptance: examples/adult_income as a PERSIA user runs it: one process per line of its
    Procfile, each line verbatim in a shell in the example's folder, the environment holding
    nothing of persia's or Ray's beyond what PERSIA's .honcho.env sets. Reaches test AUC >= 0.89.

    The only thing the test adds is TMPDIR, a folder of its own for the Ray head's files (the
    folder every Ray cluster persia starts on this machine shares by default, so a test running
    beside this one would otherwise see its head)."""
    lines = _procfile_lines(ADULT / "Procfile")
    assert set(lines) == {"data_loader", "nn_worker", "embedding_worker", "embedding_server"} | {
        "ray_head"
    }
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            s.bind(("", 6379))
        except OSError:
            pytest.fail("port 6379, the Procfile's Ray head port, is in use on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSIA_", "RAY_"))}
    env.update(PERSIA_HONCHO_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = tempfile.mkdtemp(prefix="pa-")  # short: Ray's socket paths
    procs = {
        name: subprocess.Popen(
            ["bash", "-c", line],
            cwd=ADULT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for name, line in lines.items()
    }
    try:
        out, err = procs["nn_worker"].communicate(timeout=400)
        assert procs["nn_worker"].returncode == 0, err[-3000:]
        loader_out, loader_err = procs["data_loader"].communicate(timeout=60)
        assert procs["data_loader"].returncode == 0, loader_err[-3000:]
        for name in ("embedding_server", "embedding_worker", "ray_head"):
            assert procs[name].poll() is None, f"{name} ended early"
    finally:
        for name in ("embedding_server", "embedding_worker", "data_loader", "nn_worker"):
            _stop_group(procs[name])
        _stop_group(procs["ray_head"])  # the head last: the others leave it first
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["train_samples"] == 32561  # the whole training split, each row once
    assert result["embedding_rows"] > 90  # ~100 categories over the 8 slots
    assert result["test_auc"] >= 0.89, result
    print(json.dumps(result))
