"""Parameter-server recovery on the Ray backend: restore a killed shard and keep training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persia.backends.ray.backend import ClusterConfig
from persia.backends.ray.recovery import RecoveryConfig, restore_shard_rows
from persia.ctx import TrainCtx, eval_ctx
from persia.data import DataLoader
from persia.datasets import SyntheticStream
from persia.embedding import EmbeddingConfig
from persia.embedding.config import parse_embedding_config, parse_global_config
from persia.embedding.optim import Adagrad
from persia.errors import ConfigError
from persia.metrics import roc_auc
from persia.store import Shard, ShardedStore
from persia.store.delta import DeltaWriter
from persia.utils import setup_seed

DIM = 8


class Model(torch.nn.Module):
    def __init__(self, num_dense: int, num_slots: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(num_dense + num_slots * DIM, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 1),
        )

    def forward(self, non_id, embeddings):
        return self.net(torch.cat([non_id[0], *embeddings], dim=1)).squeeze(1)


def high_cardinality_job(tmp, kill_at, batches=160, batch_size=512, interval_s=1.0, seed=0):
    """A seeded job on the generated high-cardinality stream on 2 Ray parameter servers with
    incremental updates and recovery on; kills shard 1 after batch ``kill_at`` (None: never)."""
    setup_seed(seed)
    stream = SyntheticStream(
        [2_000_000] * 6, num_dense=4, zipf_exponent=1.0, id_effect_scale=0.6,
        dense_effect_scale=0.3, bias=-1.0, seed=seed,
    )  # fmt: skip
    names = stream.slot_names()
    emb = parse_embedding_config({"slots_config": {n: {"dim": DIM} for n in names}})
    glob = parse_global_config(
        {
            "embedding_parameter_server_config": {
                "capacity": 400_000,
                "enable_incremental_update": True,
                "incremental_buffer_size": 1_000_000,
                "incremental_dir": str(tmp / "deltas"),
            }
        }
    )
    recover = RecoveryConfig(checkpoint_dir=str(tmp / "ckpt"), delta_interval_s=interval_s)
    cluster = ClusterConfig(num_ps=2, timeout_s=30, recover=recover)
    model = Model(stream.num_dense, len(names))
    with TrainCtx(
        Adagrad(lr=0.05),
        torch.optim.Adam(model.parameters(), lr=1e-3),
        model=model,
        embedding_config=EmbeddingConfig(admit_probability=1.0),
        embedding_config_file=emb,
        global_config_file=glob,
        backend="ray",
        cluster=cluster,
    ) as ctx:
        loader = DataLoader(stream.dataset(names, 0, batches, batch_size), embedding_staleness=1)
        for i, batch in enumerate(loader):
            logits, labels = ctx.forward(batch)
            ctx.backward(
                torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[0][:, 0])
            )
            if i == batches // 4:
                ctx.dump_checkpoint(tmp / "ckpt")
            if i == kill_at:
                import ray

                ray.kill(ctx.runtime.store.actors[1])
        ctx.runtime.flush()
        report = ctx.runtime.recovery.report()
        stats = ctx.runtime.store.stats()
        ys, ps = [], []
        model.eval()
        with eval_ctx(model=model) as ectx, torch.no_grad():
            for batch in DataLoader(
                stream.dataset(names, 1_000_000, 16, batch_size, requires_grad=False)
            ):
                logits, labels = ectx.forward(batch)
                ps.append(logits.numpy())
                ys.append(labels[0].numpy()[:, 0])
    return roc_auc(np.concatenate(ys), np.concatenate(ps)), report, stats


def test_a_killed_shard_is_restored_and_training_matches_an_undisturbed_run(ray_cluster, tmp_path):
    interval_s = 1.0
    auc_ref, rep_ref, _ = high_cardinality_job(tmp_path / "ref", None, interval_s=interval_s)
    auc, rep, stats = high_cardinality_job(tmp_path / "killed", 100, interval_s=interval_s)
    assert rep_ref["recoveries"] == 0
    assert rep["recoveries"] == 1 and stats["recoveries"] == 1
    (event,) = rep["events"]
    assert event["rank"] == 1 and event["checkpoint"] is not None and event["rows"] > 0
    assert event["deltas_applied"] >= 1
    assert 0.0 <= rep["lost_update_window_s"] <= interval_s
    assert abs(auc - auc_ref) <= 0.003, (auc, auc_ref)


def test_recover_needs_incremental_updates_and_valid_settings(ray_cluster, tmp_path):
    with pytest.raises(ConfigError) as info:
        RecoveryConfig(delta_interval_s=0, max_recoveries=0)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError, match="recover must be"):
        ClusterConfig(recover="yes")  # type: ignore[arg-type]
    model = Model(1, 1)
    with pytest.raises(ConfigError, match="enable_incremental_update"):
        with TrainCtx(
            Adagrad(lr=0.05),
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            embedding_config_file=parse_embedding_config({"slots_config": {"a": {"dim": 4}}}),
            global_config_file=parse_global_config({}),
            backend="ray",
            cluster=ClusterConfig(num_ps=2, recover=True),
        ):
            pass


def _train_local(store, rng, steps):
    for _ in range(steps):
        keys = rng.integers(0, 5000, 300).astype(np.uint64)
        keys = np.unique(keys)
        store.lookup(keys, 4, True)
        store.apply_gradients(keys, rng.standard_normal((keys.size, 4)).astype(np.float32))


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_one_shard_restored_from_checkpoint_and_deltas_equals_the_live_shard(
    tmp_path, with_checkpoint
):
    from persia import checkpoint

    rng = np.random.default_rng(3)
    store = ShardedStore(3, 100_000, Adagrad(lr=0.1), dims=[4])
    writer = DeltaWriter(store, tmp_path / "deltas").start()
    _train_local(store, rng, 5)
    writer.flush()
    ckpt = None
    if with_checkpoint:
        checkpoint.dump(tmp_path / "ckpt", store, delta_seq=writer.last_seq)
        ckpt = checkpoint.read(tmp_path / "ckpt")
    after = writer.last_seq if with_checkpoint else 0
    for _ in range(3):
        _train_local(store, rng, 3)
        writer.flush()
    for rank in range(3):
        shard = Shard(100_000, Adagrad(lr=0.1), dims=[4])
        done = restore_shard_rows(shard, rank, 3, store.optimizer, ckpt, tmp_path / "deltas", after)
        assert done["last_seq"] == writer.last_seq
        assert done["applied"] == list(range(after + 1, writer.last_seq + 1))
        want = store.shards[rank].export_rows()[4]
        got = shard.export_rows()[4]
        order = np.argsort(want["keys"])
        back = np.argsort(got["keys"])
        np.testing.assert_array_equal(got["keys"][back], want["keys"][order])
        np.testing.assert_array_equal(got["values"][back], want["values"][order])
        np.testing.assert_array_equal(got["state"][back], want["state"][order])
    writer.close()


def test_run_job_with_recover_restores_a_shard_killed_during_training(ray_cluster, tmp_path):
    """`persia train --recover` (run_job with ClusterConfig(recover=True)): deltas beside the
    job's checkpoints, a shard killed after the first checkpoint is restored, training goes on."""
    import threading
    import time
    from pathlib import Path

    import ray

    from persia.backends.ray.naming import namespace
    from persia.job.config import load_job
    from persia.job.runner import run_job

    adult = Path(__file__).resolve().parents[2] / "examples" / "adult_income" / "job.yaml"
    ckpt = tmp_path / "ckpt"
    job = load_job(
        adult,
        ["training.backend=ray", "training.progress=none", "training.epochs=3",
         f"training.checkpoint_dir={ckpt}", "training.checkpoint_every_batches=100"],
    )  # fmt: skip
    name = "persia-recover-cli-ps-1"
    killed = threading.Event()

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (ckpt / "CURRENT").exists():
            time.sleep(0.05)
        if (ckpt / "CURRENT").exists():
            ray.kill(ray.get_actor(name, namespace=namespace()))
            killed.set()

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = run_job(
        job, cluster=ClusterConfig(num_ps=2, timeout_s=60, recover=True, job_name="recover-cli")
    )
    killer.join(timeout=5)
    assert killed.is_set()
    assert result["recovery"]["recoveries"] == 1
    assert result["recovery"]["events"][0]["rank"] == 1
    assert result["train_batches"] == 3 * 255
    assert result["test_auc"] >= 0.89
    assert any((ckpt / "incremental").iterdir())  # the deltas recovery read, beside the checkpoints
