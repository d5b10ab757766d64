"""A training job whose table does not fit its RAM capacity (docs/ARCHITECTURE.md, disk tier):
with the disk tier it keeps every row, and at staleness 1 its rows are bit-identical to the same
job with RAM big enough; without the tier it loses rows."""

from __future__ import annotations

import copy

import numpy as np
import torch
import yaml

from persia.ctx import TrainCtx
from persia.data import DataLoader
from persia.embedding.optim import Adagrad
from persia.worker.pooling import add_prefix
from runtime._jobs import PREFIX_BITS, ListDataset, Net, embedding_file

CARD = 3000  # IDs per slot: 6000 rows, against a RAM capacity of 600


def _batches(n: int, batch: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        la = np.ones(batch, dtype=np.int64)
        lb = rng.integers(0, 4, batch).astype(np.int64)
        feats = {
            "a": (rng.integers(0, CARD, batch).astype(np.uint64), la),
            "b": (rng.integers(0, CARD, int(lb.sum())).astype(np.uint64), lb),
        }
        dense = rng.normal(size=(batch, 3)).astype(np.float32)
        out.append((feats, dense, rng.integers(0, 2, (batch, 1)).astype(np.float32)))
    return out


def _run(tmp_path, name: str, capacity: int, tier: bool, batches):
    server = {"capacity": capacity}
    if tier:
        server.update(disk_tier_dir=str(tmp_path / name), disk_tier_capacity=100_000)
    glob = tmp_path / f"{name}.yml"
    glob.write_text(yaml.safe_dump({"embedding_parameter_server_config": server}))
    cfg = embedding_file()
    model = copy.deepcopy(Net())
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Adagrad(lr=0.2)
    with TrainCtx(
        opt, dense_opt, model=model, embedding_config_file=cfg, global_config_file=str(glob)
    ) as ctx:
        loader = DataLoader(ListDataset(batches), embedding_staleness=1, reproducible=True)
        for b in loader:
            out, labels = ctx.forward(b)
            ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))
        store = ctx.runtime.store
        keys = np.concatenate(
            [add_prefix(np.arange(CARD, dtype=np.uint64), cfg.prefix_of(s), PREFIX_BITS)
             for s in ("a", "b")]
        )  # fmt: skip
        rows = store.lookup(keys, 4, training=False)
        stats = store.stats()
        held = stats["rows"] + stats.get("disk_rows", 0)
        exported = [s.export_rows() for s in store.shards]
        store.close()
    return rows, held, stats, exported


def test_job_with_the_disk_tier_keeps_every_row_bit_identical(tmp_path):
    batches = _batches(30)
    ref, ref_held, _, ref_rows = _run(tmp_path, "big", 100_000, False, batches)
    got, held, stats, rows = _run(tmp_path, "tier", 600, True, batches)
    lost, lost_held, lost_stats, _ = _run(tmp_path, "small", 600, False, batches)
    assert stats["rows"] <= 600 and stats["disk_rows"] > 0
    assert held == ref_held
    assert np.array_equal(got, ref)
    for a, b in zip(ref_rows, rows, strict=True):
        for dim in a:
            ia, ib = np.argsort(a[dim]["keys"]), np.argsort(b[dim]["keys"])
            for name in ("keys", "values", "state"):
                assert np.array_equal(a[dim][name][ia], b[dim][name][ib]), name
    assert lost_held < ref_held and lost_stats["evictions"] > 0
    assert not np.array_equal(lost, ref)


def test_batch_keys_are_the_keys_a_training_lookup_asks_for():
    from persia.embedding.config import embedding_spec
    from persia.runtime.local import runtime_from_spec
    from runtime._jobs import to_persia

    spec = embedding_spec(embedding_file())
    runtime = runtime_from_spec(spec)
    try:
        batch = to_persia(_batches(1)[0])
        keys = runtime.worker.batch_keys(batch)
        runtime.worker.forward(batch, True)
        held = np.sort(np.concatenate([s.export_rows()[4]["keys"] for s in runtime.store.shards]))
        assert np.array_equal(np.unique(keys[4]), held)  # repeats included
    finally:
        runtime.close()


def test_the_job_prefetches_only_while_disk_reads_wait(tmp_path, monkeypatch):
    """The DataLoader asks the runtime to prefetch each batch waiting for its permit; the
    runtime does so only while the tier's reads wait for the device (a cold page cache)."""
    from persia.store.sharded import ShardedStore

    calls = []
    real = ShardedStore.prefetch

    def counted(self, keys, dim):
        calls.append(len(keys))
        return real(self, keys, dim)

    monkeypatch.setattr(ShardedStore, "prefetch", counted)
    batches = _batches(30)
    for slow in (True, False):
        calls.clear()
        monkeypatch.setattr(ShardedStore, "disk_reads_wait", lambda self, s=slow: s)
        _, held, _, _ = _run(tmp_path, f"tier-{slow}", 600, True, batches)
        assert (len(calls) > 0) == slow, (slow, len(calls))
