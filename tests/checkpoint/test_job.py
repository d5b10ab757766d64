"""Job checkpoints: bit-exact round trip, N -> M re-sharding, refused corruption, kills."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime._jobs import ListDataset, Net, embedding_file, make_batches

from persia import checkpoint
from persia.ctx import TrainCtx, eval_ctx
from persia.data import DataLoader
from persia.embedding.config import parse_global_config
from persia.embedding.optim import SGD, Adagrad, Adam
from persia.errors import CheckpointError
from persia.store import ShardedStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def global_file(shards: int):
    return parse_global_config(
        {"embedding_parameter_server_config": {"num_hashmap_internal_shards": shards}}
    )


def make_ctx(model: Net, shards: int) -> TrainCtx:
    return TrainCtx(
        Adam(lr=0.05),
        torch.optim.Adam(model.parameters(), lr=0.01),
        model=model,
        embedding_config_file=embedding_file(),
        global_config_file=global_file(shards),
    )


def train(ctx: TrainCtx, batches, staleness: int = 1) -> list[float]:
    losses = []
    for b in DataLoader(ListDataset(batches), embedding_staleness=staleness):
        out, labels = ctx.forward(b)
        loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
        ctx.backward(loss)
        losses.append(float(loss.item()))
    ctx.runtime.flush()
    return losses


def predict(ctx: TrainCtx, model: Net) -> np.ndarray:
    model.eval()
    out = []
    with eval_ctx(model=model) as ectx, torch.no_grad():
        for b in DataLoader(ListDataset(make_batches(3, seed=7), requires_grad=False)):
            o, _ = ectx.forward(b)
            out.append(o.numpy().ravel())
    model.train()
    return np.concatenate(out)


def rows_by_key(store) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every row of the store, per dim, sorted by key."""
    out = {}
    for dim in sorted({d for s in store.shards for d in s.dims}):
        parts = [s.export_rows(dim).get(dim) for s in store.shards]
        parts = [p for p in parts if p is not None]
        keys = np.concatenate([p["keys"] for p in parts])
        order = np.argsort(keys)
        out[dim] = (
            keys[order],
            np.concatenate([p["values"] for p in parts])[order],
            np.concatenate([p["state"] for p in parts])[order],
        )
    return out


def assert_same_rows(a, b) -> None:
    assert a.keys() == b.keys()
    for dim in a:
        for x, y in zip(a[dim], b[dim], strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("shards_after", [2, 3])
def test_round_trip_is_bit_exact_and_one_more_step_matches(tmp_path, shards_after):
    ckpt = tmp_path / "ckpt"
    model = Net()
    with make_ctx(model, 2) as ctx:
        train(ctx, make_batches(10), staleness=3)
        report = ctx.dump_checkpoint(ckpt, position={"epoch": 0, "batch": 10})
        assert len(report.shard_pauses_s) == 2 and report.rows > 0
        preds = predict(ctx, model)
        loss_a = train(ctx, make_batches(1, seed=99))
        rows_a = rows_by_key(ctx.runtime.store)
        dense_a = [p.detach().clone() for p in model.parameters()]

    model_b = Net()
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(1.0)  # the load must overwrite everything
    with make_ctx(model_b, shards_after) as ctx_b:
        info = ctx_b.load_checkpoint(ckpt)
        assert info.position == {"epoch": 0, "batch": 10}
        np.testing.assert_array_equal(predict(ctx_b, model_b), preds)
        loss_b = train(ctx_b, make_batches(1, seed=99))
        assert loss_b == loss_a
        assert_same_rows(rows_by_key(ctx_b.runtime.store), rows_a)
        for p, q in zip(model_b.parameters(), dense_a, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_non_blocking_dump_while_training_continues(tmp_path):
    model = Net()
    with make_ctx(model, 3) as ctx:
        train(ctx, make_batches(4))
        ctx.dump_checkpoint(tmp_path / "c", blocking=False)
        train(ctx, make_batches(4, seed=3))  # training goes on while the thread writes
        ctx.wait_for_dump_embedding()
    ckpt = checkpoint.read(tmp_path / "c")
    assert ckpt.meta["num_shards"] == 3 and ckpt.dense_optimizer_state() is not None


def test_dump_embedding_writes_a_job_checkpoint_without_dense_state(tmp_path):
    model = Net()
    with make_ctx(model, 2) as ctx:
        train(ctx, make_batches(6), staleness=2)
        ctx.dump_embedding(tmp_path / "emb")
        ctx.dump_checkpoint(tmp_path / "full")
        rows = rows_by_key(ctx.runtime.store)
    ckpt = checkpoint.read(tmp_path / "emb")
    assert ckpt.meta["dense"] == {"model": False, "optimizer": False, "jit": False}
    assert ckpt.meta["num_shards"] == 2 and ckpt.meta["rows"] > 0
    model_b = Net()
    with make_ctx(model_b, 3) as ctx_b:
        with pytest.raises(CheckpointError, match="holds no dense model"):
            ctx_b.load_checkpoint(tmp_path / "emb")
        ctx_b.load_embedding(tmp_path / "emb")
        assert_same_rows(rows_by_key(ctx_b.runtime.store), rows)
        ctx_b.clear_embeddings()
        ctx_b.load_embedding(tmp_path / "full")  # the rows of a full checkpoint also load
        assert_same_rows(rows_by_key(ctx_b.runtime.store), rows)
        with pytest.raises(CheckpointError):
            ctx_b.load_embedding(tmp_path / "missing")


def filled_store(shards: int, optimizer=None, n: int = 3000, seed: int = 0) -> ShardedStore:
    store = ShardedStore(shards, 100_000, optimizer or Adam(lr=0.1), dims=[4, 8])
    rng = np.random.default_rng(seed)
    for dim in (4, 8):
        keys = rng.choice(1 << 40, n, replace=False).astype(np.uint64) * np.uint64(2)
        keys += np.uint64(dim == 8)
        store.lookup(keys, dim, True)
        for _ in range(3):
            g = rng.normal(size=(n, dim)).astype(np.float32)
            store.apply_gradients(keys, g)
    return store


@pytest.mark.parametrize(("n", "m"), [(2, 3), (3, 1), (1, 4)])
def test_reshard_n_to_m_gives_identical_lookups(tmp_path, n, m):
    src = filled_store(n)
    checkpoint.dump(tmp_path, src)
    dst = ShardedStore(m, 100_000, Adam(lr=0.1), dims=[4, 8])
    checkpoint.restore_store(dst, checkpoint.read(tmp_path))
    assert dst.num_shards == m and len(dst.shards) == m
    assert_same_rows(rows_by_key(dst), rows_by_key(src))
    for dim, (keys, _, _) in rows_by_key(src).items():
        probe = np.concatenate([keys, np.arange(100, dtype=np.uint64) * 2 + (dim == 8)])
        np.testing.assert_array_equal(dst.lookup(probe, dim, False), src.lookup(probe, dim, False))
    # every row landed on the shard the fixed hash names
    for s, shard in enumerate(dst.shards):
        for part in shard.export_rows().values():
            assert (dst.shard_of(part["keys"]) == s).all()


def test_manifest_records_what_a_loader_checks(tmp_path):
    src = filled_store(2)
    checkpoint.dump(tmp_path, src, position={"batch": 5}, config={"a": 1}, delta_seq=4)
    manifest = json.loads((checkpoint.read(tmp_path).path / "manifest.json").read_text())
    meta = manifest["meta"]
    assert manifest["format_version"] == 1 and manifest["kind"] == "persia-job"
    assert meta["job_format"] == 1 and meta["num_shards"] == 2 and meta["dims"] == [4, 8]
    assert meta["optimizer"]["type"] == "Adam" and meta["rows"] == 6000
    assert meta["config"] == {"a": 1} and meta["delta_seq"] == 4
    assert all("crc32" in e for e in manifest["arrays"].values())


def test_truncated_or_tampered_files_are_refused(tmp_path):
    checkpoint.dump(tmp_path, filled_store(2))
    gen = checkpoint.read(tmp_path).path
    victim = gen / "s1.d8.values.npy"
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.read(tmp_path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="crc32 mismatch"):
        checkpoint.read(tmp_path)
    victim.write_bytes(data)
    checkpoint.read(tmp_path)  # intact again
    manifest = gen / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"rows": 6000', '"rows": 6001'))
    with pytest.raises(CheckpointError, match="6001"):
        checkpoint.read(tmp_path)
    manifest.write_text(text.replace('"job_format": 1', '"job_format": 2'))
    with pytest.raises(CheckpointError, match="job_format"):
        checkpoint.read(tmp_path)


def test_load_refuses_another_optimizer_or_dim_and_leaves_the_store_alone(tmp_path):
    checkpoint.dump(tmp_path, filled_store(2))
    ckpt = checkpoint.read(tmp_path)
    other = filled_store(2, optimizer=Adagrad(lr=0.1), n=10)
    before = rows_by_key(other)
    with pytest.raises(CheckpointError, match="state columns"):
        checkpoint.restore_store(other, ckpt)
    assert_same_rows(rows_by_key(other), before)
    narrow = ShardedStore(2, 1000, Adam(lr=0.1), dims=[4])
    with pytest.raises(CheckpointError, match="dim 8"):
        checkpoint.restore_store(narrow, ckpt)
    adopt = ShardedStore(2, 100_000, SGD(lr=0.1), dims=[4, 8], adopt_optimizer=True)
    checkpoint.restore_store(adopt, ckpt)
    assert adopt.optimizer.name == "adam"
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read(tmp_path / "nope")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_dump_killed_at_random_points_leaves_the_previous_checkpoint_valid(tmp_path):
    rng = random.Random(7)
    kills, last_seen = 0, 0
    while kills < 6:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_job_writer.py"), str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        if kills == 0:  # a loaded machine may be slow: make sure one checkpoint completes
            assert proc.stdout.readline().strip() == "committed 1"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        ckpt = checkpoint.read(tmp_path)
        seq = int(ckpt.position["batch"])
        assert seq >= last_seen
        last_seen = seq
        for name, arr in ckpt.arrays.items():
            if name.endswith(".values") or name.endswith(".state"):
                assert (arr == seq).all(), name
        assert ckpt.meta["rows"] == 20_000


def test_concurrent_training_threads_see_short_pauses(tmp_path):
    store = filled_store(4, n=20_000)
    stop = threading.Event()
    keys = np.arange(512, dtype=np.uint64) * np.uint64(2)

    def hammer() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            store.lookup(keys, 4, True)
            store.apply_gradients(keys, rng.normal(size=(512, 4)).astype(np.float32))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        report = checkpoint.dump(tmp_path, store)
    finally:
        stop.set()
        t.join()
    assert len(report.shard_pauses_s) == 4
    assert report.longest_shard_pause_s <= report.seconds
    checkpoint.read(tmp_path)


def test_train_ctx_writes_deltas_when_the_global_config_says_so(tmp_path):
    from persia.checkpoint import restore_with_deltas as restore

    glob = parse_global_config(
        {
            "embedding_parameter_server_config": {
                "num_hashmap_internal_shards": 2,
                "enable_incremental_update": True,
                "incremental_buffer_size": 20,
                "incremental_dir": str(tmp_path / "inc"),
            }
        }
    )
    model = Net()
    ctx = TrainCtx(
        Adam(lr=0.05),
        torch.optim.Adam(model.parameters(), lr=0.01),
        model=model,
        embedding_config_file=embedding_file(),
        global_config_file=glob,
    )
    with ctx:
        train(ctx, make_batches(3))
        ctx.dump_checkpoint(tmp_path / "ckpt")
        train(ctx, make_batches(6, seed=5))
    final = rows_by_key(ctx.runtime.store)
    replica = ShardedStore(3, 10_000, Adam(lr=0.05), dims=[4])
    result = restore(replica, tmp_path / "ckpt", tmp_path / "inc")
    assert result["applied"]  # deltas after the checkpoint were written and applied
    assert_same_rows(rows_by_key(replica), final)
