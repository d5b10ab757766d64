"""Deltas carry evictions: rows training evicted (LRU at capacity) or dropped (clear, reload)
disappear from a reader's store, so they read as zeros there as in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from persia import checkpoint
from persia.embedding.optim import Adagrad
from persia.store import ShardedStore
from persia.store.delta import DeltaReader, DeltaWriter
from persia.store.table import EmbeddingTable

DIMS = (4, 8)


def new_store(capacity: int = 400, shards: int = 2) -> ShardedStore:
    return ShardedStore(shards, capacity, Adagrad(lr=0.1), dims=list(DIMS))


def step(store: ShardedStore, rng: np.random.Generator, n: int = 60, space: int = 2000) -> None:
    for dim in DIMS:
        keys = np.unique(rng.integers(0, space, n).astype(np.uint64) * np.uint64(2) + (dim == 8))
        store.lookup(keys, dim, True)
        store.apply_gradients(keys, rng.normal(size=(keys.size, dim)).astype(np.float32))


def rows(store: ShardedStore) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for dim in DIMS:
        parts = [s.export_rows(dim)[dim] for s in store.shards]
        keys = np.concatenate([p["keys"] for p in parts])
        values = np.concatenate([p["values"] for p in parts])
        order = np.argsort(keys)
        out[dim] = (keys[order], values[order])
    return out


def assert_same_rows(a: ShardedStore, b: ShardedStore) -> None:
    ra, rb = rows(a), rows(b)
    for dim in DIMS:
        np.testing.assert_array_equal(ra[dim][0], rb[dim][0])
        np.testing.assert_array_equal(ra[dim][1], rb[dim][1])


@pytest.mark.parametrize("capacity", [400, 120])  # 120: each step evicts most rows
def test_evicted_rows_leave_the_reader_in_order(tmp_path: Path, capacity: int) -> None:
    rng = np.random.default_rng(1)
    train = new_store(capacity)
    step(train, rng)
    checkpoint.dump(tmp_path / "ckpt", train)
    writer = DeltaWriter(train, tmp_path / "inc").start()
    # readers with room for every row: only the deltas' removals drop rows from them
    reader_store = new_store(10**6)
    checkpoint.restore_store(reader_store, checkpoint.read(tmp_path / "ckpt"))
    reader = DeltaReader(tmp_path / "inc")
    late_store, late = None, None
    for i in range(8):
        for j in range(3):
            step(train, rng)
            if i == 3 and j == 1:  # a checkpoint between two deltas: a reader starts there
                checkpoint.dump(tmp_path / "mid", train, delta_seq=writer.last_seq)
                late_store = new_store(10**6)
                checkpoint.restore_store(late_store, checkpoint.read(tmp_path / "mid"))
                late = DeltaReader(tmp_path / "inc", after_seq=writer.last_seq)
        info = writer.flush()
        assert info is not None
        reader.apply_pending(reader_store)
        assert_same_rows(reader_store, train)  # evictions included: the same keys, bit for bit
        if late is not None:
            late.apply_pending(late_store)
            assert_same_rows(late_store, train)
    assert train.stats()["evictions"] > 0
    removed = [
        np.load(p) for p in sorted((tmp_path / "inc").glob("gen-*/d*.removed.npy"))
    ]  # at least one delta removed rows
    assert sum(r.size for r in removed) > 0
    # an evicted key reads as zeros on both sides
    gone = next(r for r in removed if r.size)[:5]
    dim = 8 if int(gone[0]) % 2 else 4
    assert not train.lookup(gone, dim, False).any()
    assert not reader_store.lookup(gone, dim, False).any()
    writer.close()


def test_a_clear_or_a_reload_makes_a_reset_delta(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train = new_store(capacity=100_000)
    writer = DeltaWriter(train, tmp_path / "inc").start()
    step(train, rng)
    writer.flush()
    checkpoint.dump(tmp_path / "early", train)
    step(train, rng)
    writer.flush()
    reader_store = new_store(capacity=100_000)
    reader = DeltaReader(tmp_path / "inc")
    reader.apply_pending(reader_store)
    assert_same_rows(reader_store, train)

    train.clear()  # clear_embeddings
    step(train, rng, n=10)
    info = writer.flush()
    assert info is not None
    reader.apply_pending(reader_store)
    assert_same_rows(reader_store, train)

    checkpoint.restore_store(train, checkpoint.read(tmp_path / "early"))  # load_embedding
    writer.flush()
    reader.apply_pending(reader_store)
    assert_same_rows(reader_store, train)
    assert reader.last_seq == 4
    writer.close()


@pytest.mark.parametrize("count", [3, 150])  # relinked one by one / the list rebuilt
def test_remove_keys_keeps_the_other_rows_and_their_lru_order(count: int) -> None:
    table = EmbeddingTable(4, 400, Adagrad(lr=0.1))
    keys = np.arange(1, 301, dtype=np.uint64) * np.uint64(7919)
    table.lookup(keys, True)
    table.lookup(keys[::3], True)  # refresh a third: the LRU order is not the insertion order
    before = table.export_rows()
    gone = np.random.default_rng(count).choice(keys, count, replace=False)
    evictions = table.stats()["evictions"]
    assert table.remove_keys(np.concatenate([gone, np.array([5], np.uint64)])) == count
    after = table.export_rows()
    keep = ~np.isin(before["keys"], gone)
    np.testing.assert_array_equal(after["keys"], before["keys"][keep])  # oldest first, as before
    np.testing.assert_array_equal(after["values"], before["values"][keep])
    np.testing.assert_array_equal(after["state"], before["state"][keep])
    assert (table.probe(gone) < 0).all() and table.rows == 300 - count
    assert table.stats()["evictions"] == evictions
    # the table goes on working: new rows, lookups of the kept ones
    table.lookup(np.array([11, 12], np.uint64), True)
    np.testing.assert_array_equal(
        table.lookup(before["keys"][keep][:10], False), before["values"][keep][:10]
    )
