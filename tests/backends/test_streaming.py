"""PERSIA's separate data loaders on the Ray backend: DataCtx.send_data -> StreamingDataset."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from runtime._jobs import ListDataset, Net, make_batches, train_ctx

from persia.backends.ray.backend import ClusterConfig
from persia.ctx import DataCtx
from persia.data import DataLoader, StreamingDataset
from persia.errors import BackendError

ROOT = Path(__file__).resolve().parents[2]

LOADER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from runtime._jobs import make_batches, to_persia
    from persia.ctx import DataCtx

    n, seed = int(sys.argv[1]), int(sys.argv[2])
    with DataCtx() as ctx:
        for b in make_batches(n, seed=seed):
            ctx.send_data(to_persia(b))
    print("sent", n)
    """
)


def start_loader(ray_cluster, tmp_path, n, seed, index, size, channel):
    script = tmp_path / "loader.py"
    script.write_text(LOADER.format(tests=str(ROOT / "tests")))
    env = dict(os.environ)
    env.update(
        RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
        REPLICA_INDEX=str(index),
        REPLICA_SIZE=str(size),
        PERSIA_STREAM_CHANNEL=channel,
    )
    return subprocess.Popen(
        [sys.executable, str(script), str(n), str(seed)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def train(ctx, dataset):
    losses = []
    for b in DataLoader(dataset, embedding_staleness=1):
        out, labels = ctx.forward(b)
        loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
        ctx.backward(loss)
        losses.append(loss.item())
    return losses


def test_batches_from_a_data_loader_process_train_exactly_as_in_process(ray_cluster, tmp_path):
    batches = make_batches(10, seed=7)
    with train_ctx(Net()) as ctx:
        want = train(ctx, ListDataset(batches))
    proc = start_loader(ray_cluster, tmp_path, 10, 7, 0, 1, "exact")
    try:
        with train_ctx(Net(), backend="ray", cluster=ClusterConfig(num_ps=2)) as ctx:
            got = train(ctx, StreamingDataset(channel="exact", timeout_s=60))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "sent 10" in out
    assert got == want  # lossless, in order, same checks: bit-identical training


def test_two_data_loaders_feed_one_nn_worker(ray_cluster, tmp_path):
    procs = [start_loader(ray_cluster, tmp_path, 4 + i, 10 + i, i, 2, "two") for i in range(2)]
    try:
        with train_ctx(Net(), backend="ray", cluster=ClusterConfig(num_ps=1)) as ctx:
            got = train(ctx, StreamingDataset(channel="two", timeout_s=60))
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert len(got) == 4 + 5  # every batch of both loaders, each once


def test_data_ctx_and_streaming_need_the_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with train_ctx(Net()) as ctx:
        loader = DataLoader(StreamingDataset())
        with pytest.raises(BackendError, match="needs the cluster"):
            for _ in loader:
                pass
        assert ctx is not None
    import ray

    if not ray.is_initialized():
        with pytest.raises(BackendError, match="RAY_ADDRESS"):
            with DataCtx():
                pass
