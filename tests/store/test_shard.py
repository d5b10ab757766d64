"""Shard: dims, the capacity split, locking across threads, row export and import."""

from __future__ import annotations

import threading

import naive
import numpy as np
import pytest

import persia  # noqa: F401  (sets numba's cache folder)
from persia.embedding.optim import SGD, Adagrad
from persia.errors import StoreError
from persia.store import Shard, shard_of
from persia.store.shard import split_capacity
from persia.store.table import EmbeddingTable


def u64(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_split_capacity_rule():
    assert split_capacity(10, [32, 8, 16]) == {8: 4, 16: 3, 32: 3}
    assert split_capacity(2, [4, 8]) == {4: 1, 8: 1}
    assert sum(split_capacity(1001, [1, 2, 3, 4]).values()) == 1001


def test_one_dim_matches_a_table():
    shard = Shard(50, SGD(lr=0.1), seed=4)
    table = EmbeddingTable(8, 50, SGD(lr=0.1), seed=4)
    rng = np.random.default_rng(0)
    for _ in range(30):
        keys = rng.integers(0, 120, 20).astype(np.uint64)
        training = bool(rng.integers(0, 2))
        np.testing.assert_array_equal(shard.lookup(keys, 8, training), table.lookup(keys, training))
        grads = rng.normal(size=(20, 8)).astype(np.float32)
        np.testing.assert_array_equal(
            shard.apply_gradients(keys, grads), table.apply_gradients(keys, grads)
        )
    stats = shard.stats()
    for k, v in table.stats().items():
        if k != "bytes_used":
            assert stats[k] == v, k


def test_key_of_another_dim_is_an_error_and_shard_stays_usable():
    shard = Shard(100, Adagrad(), dims=[4, 8])
    shard.lookup(u64([1, 2, 3]), 4, True)
    before = shard.export_rows()
    for training in (True, False):
        with pytest.raises(StoreError, match="key 2 has dim 4, but dim 8 was asked for"):
            shard.lookup(u64([9, 2]), 8, training)
    with pytest.raises(StoreError, match="key 3 has dim 4, but dim 8"):
        shard.apply_gradients(u64([3]), np.ones((1, 8), np.float32))
    with pytest.raises(StoreError, match=r"dim must be one of \[4, 8\], got 16"):
        shard.lookup(u64([1]), 16, True)
    after = shard.export_rows()
    for d in before:
        for k in before[d]:
            np.testing.assert_array_equal(after[d][k], before[d][k])
    assert shard.export_rows(8)[8]["keys"].size == 0  # 9 was not created by the failed call
    assert shard.lookup(u64([9]), 8, True).any()
    assert shard.lookup(u64([1, 2]), 4, False).any()


def test_undeclared_dims_share_capacity_and_shrink():
    shard = Shard(10, SGD(lr=0.1))
    shard.lookup(np.arange(10, dtype=np.uint64), 4, True)
    assert shard.stats()["rows"] == 10
    shard.lookup(np.arange(100, 103, dtype=np.uint64), 2, True)
    stats = shard.stats()
    assert stats["dims"][2]["capacity"] == 5 and stats["dims"][4]["capacity"] == 5
    assert stats["dims"][4]["rows"] == 5 and stats["rows"] == 8
    # the 5 most recently used dim-4 keys survived
    assert shard.export_rows(4)[4]["keys"].tolist() == [5, 6, 7, 8, 9]
    # an evaluation lookup of a new dim creates nothing
    assert not shard.lookup(u64([500]), 3, False).any()
    assert shard.dims == (2, 4)


def test_bad_input():
    with pytest.raises(StoreError, match="capacity must be an int > 0, got 0"):
        Shard(0, SGD(lr=0.1))
    with pytest.raises(StoreError, match=r"dims\[\] must be an int > 0, got 0"):
        Shard(10, SGD(lr=0.1), dims=[0])
    shard = Shard(10, SGD(lr=0.1))
    with pytest.raises(StoreError, match="dim must be an int > 0, got 0"):
        shard.lookup(u64([1]), 0, True)
    with pytest.raises(StoreError, match="keys must have dtype uint64, got float32"):
        shard.lookup(np.ones(2, np.float32), 4, True)
    with pytest.raises(StoreError, match="grads must be a 2-D float32 array"):
        shard.apply_gradients(u64([1]), np.ones(4, np.float32))
    with pytest.raises(StoreError, match=r"grads must have shape \(2, 4\)"):
        shard.apply_gradients(u64([1, 2]), np.ones((3, 4), np.float32))
    assert shard.apply_gradients(u64([1]), np.ones((1, 4), np.float32)).tolist() == [0, 1, 0]
    assert shard.lookup(u64([1]), 4, True).shape == (1, 4)


def test_two_shards_on_two_threads_match_serial_use():
    def make():
        return [Shard(3000, Adagrad(lr=0.05), seed=s, dims=[8]) for s in (1, 2)]

    def work(shard: Shard, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(40):
            keys = rng.integers(0, 5000, 2000).astype(np.uint64)
            shard.lookup(keys, 8, True)
            shard.apply_gradients(keys, rng.normal(size=(2000, 8)).astype(np.float32))

    serial = make()
    for i, s in enumerate(serial):
        work(s, i)
    threaded = make()
    threads = [threading.Thread(target=work, args=(s, i)) for i, s in enumerate(threaded)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, threaded, strict=True):
        ea, eb = a.export_rows(8)[8], b.export_rows(8)[8]
        for k in ea:
            np.testing.assert_array_equal(ea[k], eb[k])


def test_concurrent_calls_on_one_shard_are_safe():
    shard = Shard(100_000, SGD(lr=0.1), dims=[4])
    chunks = [np.arange(i * 1000, (i + 1) * 1000, dtype=np.uint64) for i in range(8)]
    threads = [threading.Thread(target=shard.lookup, args=(c, 4, True)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shard.stats()["rows"] == 8000
    reference = EmbeddingTable(4, 100, SGD(lr=0.1))
    keys = np.concatenate(chunks)[::97]
    np.testing.assert_array_equal(shard.lookup(keys, 4, False), reference.lookup(keys, True))


def test_shard_of_python_wrapper():
    keys = np.arange(10_000, dtype=np.uint64)
    out = shard_of(keys, 5)
    assert out.dtype == np.int32 and out.min() == 0 and out.max() == 4
    assert out[:50].tolist() == [naive.shard_of(int(k), 5) for k in keys[:50]]
    assert np.bincount(out).min() > 1800
    with pytest.raises(StoreError, match="num_shards must be an int > 0, got 0"):
        shard_of(keys, 0)


def _hinted_pair(capacity: int, reserve: int | None):
    shards = []
    for _ in range(2):
        shard = Shard(capacity, Adagrad(lr=0.1), dims=[4], seed=3)
        if reserve:
            shard.reserve(reserve, 4)
        shards.append(shard)
    return shards


def _same_rows(a: Shard, b: Shard) -> None:
    for dim, rows in a.export_rows().items():
        want = b.export_rows()[dim]
        for k in ("keys", "values", "state"):
            np.testing.assert_array_equal(rows[k], want[k])


@pytest.mark.parametrize(("capacity", "reserve"), [(1000, 1000), (1000, None), (40, 40)])
def test_row_hints_give_what_plain_calls_give(capacity, reserve):
    """lookup_hinted + apply_gradients_hinted == lookup + apply_gradients, whether the hint
    holds (room for every key), is never given (growth) or goes stale (evictions between)."""
    hinted, plain = _hinted_pair(capacity, reserve)
    rng = np.random.default_rng(1)
    given = stale = 0
    for step in range(6):
        keys = np.unique(rng.integers(0, 60, 25)).astype(np.uint64)
        rng.shuffle(keys)
        out, hint = hinted.lookup_hinted(keys, 4)
        evictions = hinted.stats()["evictions"]
        np.testing.assert_array_equal(out, plain.lookup(keys, 4, True))
        given += hint is not None
        if step % 2 == 0:  # another lookup in between: with capacity 40, it evicts rows
            other = rng.integers(60, 120, 30).astype(np.uint64)
            np.testing.assert_array_equal(
                hinted.lookup(other, 4, True), plain.lookup(other, 4, True)
            )
        stale += hint is not None and hinted.stats()["evictions"] != evictions
        grads = rng.standard_normal((len(keys), 4)).astype(np.float32)
        grads[0, 1] = np.nan
        np.testing.assert_array_equal(
            hinted.apply_gradients_hinted(keys, grads, hint), plain.apply_gradients(keys, grads)
        )
        _same_rows(hinted, plain)
    if capacity == 1000:  # no eviction: hints whenever there was room for the whole call
        assert given == (6 if reserve else given) and stale == 0
    else:  # a hint given, then rows evicted before its gradients came
        assert given >= 1 and stale >= 1


def test_a_removal_between_a_hinted_lookup_and_its_gradients_is_noticed():
    """Removing rows moves others (the last row fills each hole) without counting an
    eviction: the hint must not send a moved key's gradient to the row it left."""
    hinted, plain = _hinted_pair(100, 100)
    keys = np.arange(10, dtype=np.uint64)
    _, hint = hinted.lookup_hinted(keys, 4)
    plain.lookup(keys, 4, True)
    assert hint is not None
    for shard in (hinted, plain):
        assert shard.remove_rows(4, np.array([2], np.uint64)) == 1  # key 9 moves into row 2
    assert hinted.stats()["evictions"] == hint.evictions
    grads = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.testing.assert_array_equal(
        hinted.apply_gradients_hinted(keys, grads, hint), plain.apply_gradients(keys, grads)
    )
    _same_rows(hinted, plain)


def test_row_hint_of_a_replaced_table_is_not_used():
    a, b = _hinted_pair(100, 100)
    keys = np.arange(10, dtype=np.uint64)
    _, hint = a.lookup_hinted(keys, 4)
    assert hint is not None and hint.rows.tolist() == list(range(10))
    b.lookup(keys, 4, True)
    # the hint's rows would be wrong for other keys: the shard must notice they are not its
    hint.rows = hint.rows[::-1].copy()
    hint.table = b._tables[4]  # another table than the shard's
    grads = np.ones((10, 4), np.float32)
    np.testing.assert_array_equal(a.apply_gradients_hinted(keys, grads, hint), [10, 0, 0])
    b.apply_gradients(keys, grads)
    _same_rows(a, b)


def test_local_target_only_in_process():
    from persia.rpc.local import LocalTransport
    from persia.rpc.simlink import SimLinkTransport

    shard = Shard(10, Adagrad(lr=0.1), dims=[4])
    local = LocalTransport({"parameter-server": [shard]})
    assert local.local_target("parameter-server", 0) is shard
    assert local.local_target("parameter-server", 1) is None
    assert SimLinkTransport(local, 1e9, 1e-4).local_target("parameter-server", 0) is None
