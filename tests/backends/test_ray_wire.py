"""f16 wire compression on the Ray backend: both data paths (the ZeroMQ channel and Ray actor
calls), and embedding workers as actors (pooled embeddings and their gradients coded too), train
as the uncompressed local backend does, within float16's precision."""

from __future__ import annotations

import numpy as np
import pytest
from runtime._jobs import Net, make_batches, run, train_ctx

from persia.backends.ray.backend import ClusterConfig


@pytest.mark.parametrize(("transport", "num_ew"), [("zmq", 0), ("ray", 0), ("zmq", 1)])
def test_compressed_training_matches_the_local_backend(ray_cluster, transport, num_ew):
    batches = make_batches(12, seed=4)
    with train_ctx(Net()) as ctx:
        local = run(ctx, batches)
    cluster = ClusterConfig(
        num_ps=2,
        transport=transport,
        timeout_s=30,
        wire_compression="f16",
        num_embedding_workers=num_ew,
        ew_num_cpus=0.1,
    )
    with train_ctx(Net(), backend="ray", cluster=cluster) as ctx:
        worker = ctx.runtime.worker
        assert worker.servers.wire == "f16"
        if num_ew:
            assert type(worker).__name__ == "RemoteEmbeddingWorker" and worker.wire == "f16"
        remote = run(ctx, batches)
    np.testing.assert_allclose(remote, local, rtol=2e-3)
    assert remote != local  # the rows and gradients did cross as float16
