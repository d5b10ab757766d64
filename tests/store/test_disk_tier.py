"""The disk tier (persia.store.disk) under a table, a shard and a sharded store: rows that go to
disk and back are bit-identical, evaluation reads disk rows, admission sees both tiers,
checkpoints re-shard both tiers, a torn tier is validated on open, and a SIGKILL during disk
writes leaves the last checkpoint loadable."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from persia.checkpoint import job as job_ckpt
from persia.embedding.optim import Adagrad
from persia.errors import ConfigError, StoreError
from persia.store import ShardedStore
from persia.store.config import Admission
from persia.store.disk import DiskTier, DiskTierConfig
from persia.store.kernels import disk as D
from persia.store.kernels import table as K
from persia.store.shard import Shard
from persia.store.table import EmbeddingTable

DIM = 4


def _opt() -> Adagrad:
    return Adagrad(lr=0.1)


def _tiered(tmp_path: Path, capacity: int, disk: int = 100_000, **kw) -> EmbeddingTable:
    t = EmbeddingTable(DIM, capacity, _opt(), seed=3, **kw)
    t.attach_tier(DiskTier.open(tmp_path / "t", disk, DIM, t.values.dtype, t.state_width))
    return t


def _train(tables, steps: int, card: int, batch: int = 40, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        keys = rng.integers(0, card, batch).astype(np.uint64)
        grads = rng.standard_normal((batch, DIM)).astype(np.float32)
        outs = [t.lookup(keys, True) for t in tables]
        for o in outs[1:]:
            assert np.array_equal(o, outs[0])
        for t in tables:
            t.apply_gradients(keys, grads)


def _sorted_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(rows["keys"])
    return {k: v[order] for k, v in rows.items()}


def test_rows_that_go_to_disk_and_back_are_bit_identical(tmp_path):
    big = EmbeddingTable(DIM, 10_000, _opt(), seed=3)
    small = _tiered(tmp_path, 50, disk=450)  # exactly what does not fit in RAM
    _train([big, small], 150, 500)
    assert small.rows == 50 and small.tier is not None and small.tier.rows == 450
    assert small.tier.dropped == 0
    assert small.stats()["disk_writes"] > 450  # rows went to disk and back many times
    a, b = _sorted_rows(big.export_rows()), _sorted_rows(small.export_rows())
    for name in ("keys", "values", "state"):
        assert np.array_equal(a[name], b[name]), name
    # the LRU order (oldest first) is the same as with RAM big enough
    assert np.array_equal(big.export_rows()["keys"], small.export_rows()["keys"])


@pytest.mark.parametrize("row_dtype", ["float16", "bfloat16"])
def test_half_rows_go_to_disk_and_back_bit_identical(tmp_path, row_dtype):
    """Half-precision rows spill as they are stored: training them through a small RAM and
    the tier (gradients of spilled rows applied on disk included) gives the rows of RAM big
    enough, bit for bit, and an evaluation lookup of a disk row reads it widened to float32."""
    big = EmbeddingTable(DIM, 10_000, _opt(), seed=3, row_dtype=row_dtype)
    small = _tiered(tmp_path, 50, disk=450, row_dtype=row_dtype)
    assert small.values.dtype == big.values.dtype != np.float32
    _train([big, small], 150, 500)
    assert small.tier is not None and small.tier.rows == 450
    a, b = _sorted_rows(big.export_rows()), _sorted_rows(small.export_rows())
    for name in ("keys", "values", "state"):
        assert a[name].dtype == b[name].dtype
        assert np.array_equal(a[name], b[name]), name
    on_disk = small.tier.keys[small.tier.order()][:20].copy()
    assert (small.probe(on_disk) < 0).all()
    np.testing.assert_array_equal(small.lookup(on_disk, False), big.lookup(on_disk, False))
    assert small.lookup(on_disk, False).dtype == np.float32 and small.tier.rows == 450
    # a gradient for rows that were spilled after their lookup is applied on disk, rounded back
    # to the row dtype as in RAM (nearest even)
    g = np.full((on_disk.size, DIM), 0.25, np.float32)
    small.apply_gradients(on_disk, g)
    big.apply_gradients(on_disk, g)
    np.testing.assert_array_equal(small.lookup(on_disk, False), big.lookup(on_disk, False))


@pytest.mark.parametrize("row_dtype", ["float32", "float16", "bfloat16"])
def test_batches_well_under_the_ram_capacity_bring_disk_rows_back_bit_identical(
    tmp_path, row_dtype
):
    """Batches of well under the RAM capacity, over many more rows than it: every lookup
    reads what RAM big enough reads (disk rows brought back, repeated keys in a batch
    included), and the rows end bit-identical, in every row dtype."""
    big = EmbeddingTable(DIM, 10_000, _opt(), seed=3, row_dtype=row_dtype)
    small = _tiered(tmp_path, 200, row_dtype=row_dtype)
    _train([big, small], 150, 1000, batch=60)
    assert small.tier is not None and small.rows <= 200 and small.tier.rows > 500
    assert small.stats()["disk_reads"] > 100  # rows came back from disk
    assert small.rows + small.tier.rows == big.rows
    a, b = _sorted_rows(big.export_rows()), _sorted_rows(small.export_rows())
    for name in ("keys", "values", "state"):
        assert np.array_equal(a[name], b[name]), name
    # a batch of repeats of disk rows: each repeat reads the row from disk
    on_disk = small.tier.keys[small.tier.order()][:5].copy()
    keys = np.concatenate([on_disk, on_disk[::-1], on_disk])
    np.testing.assert_array_equal(small.lookup(keys, True), big.lookup(keys, True))


def test_spills_take_the_oldest_rows_from_a_queue_chosen_ahead(tmp_path):
    """At capacity, a training lookup spills just the room it needs, from the 1/16 of the RAM
    rows chosen oldest ahead of it; a queued row touched since stays in RAM, and the rows go to
    disk oldest first. A new choice starts when the queue is used up."""
    t = _tiered(tmp_path, 1600)  # chosen 100 at a time
    for i in range(0, 1600, 100):
        t.lookup(np.arange(i, i + 100, dtype=np.uint64), True)

    def lookup(lo: int, hi: int) -> None:
        t.lookup(np.arange(lo, hi, dtype=np.uint64), True)

    def on_disk() -> list[int]:
        return t.tier.keys[t.tier.order()].tolist()

    lookup(1600, 1610)  # choose keys 0-99, spill 0-9
    assert on_disk() == list(range(10))
    lookup(50, 60)  # room for 10 more: 10-19 go; then 50-59 (queued) are touched
    assert on_disk() == list(range(20))
    lookup(1610, 1650)
    assert on_disk() == list(range(50))
    lookup(1650, 1690)  # 50-59 were touched since the choice: 60-99 go instead
    assert on_disk() == list(range(50)) + list(range(60, 100))
    assert (t.probe(np.arange(50, 60, dtype=np.uint64)) >= 0).all()
    lookup(1690, 1700)  # the queue is used up: a new choice, 100-199 the oldest now
    assert on_disk() == list(range(50)) + list(range(60, 110))
    assert t.rows == 1600 and t.rows + t.tier.rows == 1700


def test_rows_below_the_stamped_spills_since_a_lookup_are_known_unmoved(tmp_path):
    """A stamped spill leaves holes, the lookup that spilled makes its new rows there, and the
    last rows fill the holes left: after a training lookup, the rows below the rows such
    spills left hold the lookup's keys unread (``rows_kept_below``), and a recheck from there
    answers what a probe answers. Nothing is known once a spill took one of the lookup's own
    rows, once rows were removed, or past the spill log."""
    t = _tiered(tmp_path, 1600)
    for i in range(0, 1500, 100):
        t.lookup(np.arange(i, i + 100, dtype=np.uint64), True)

    def hinted(keys):
        mark = (t.clock, t.layout)
        rows = t.train_lookup_rows(keys)[1]
        assert rows is not None and t.layout == mark[1]
        return rows, (t.evictions, t.layout, mark[0])

    low_keys = np.arange(700, 760, dtype=np.uint64)
    top_keys = np.arange(1400, 1500, dtype=np.uint64)
    low_rows, low_mark = hinted(low_keys)
    top_rows, top_mark = hinted(top_keys)  # the last rows
    assert t.evictions == 0 and t.rows_kept_below(*top_mark) == t.rows  # nothing moved yet
    assert top_rows.min() == 1400
    # 250 hits and 50 new keys: room for 300 more is 200 short, so the 200 oldest rows (keys
    # 0-199) spill, the new keys take 50 of their places and the last 150 rows (the second
    # lookup's among them) fill the others
    t.lookup(np.array(list(range(1100, 1350)) + list(range(5000, 5050)), np.uint64), True)
    assert t.rows == 1350 and t.evictions == 200 and t._top == 1350
    assert t.tier.rows == 200
    for rows, keys, mark in ((low_rows, low_keys, low_mark), (top_rows, top_keys, top_mark)):
        low = t.rows_kept_below(*mark)
        assert low == t.rows
        kept = rows < low
        np.testing.assert_array_equal(t.row_keys[rows[kept]], keys[kept])
        np.testing.assert_array_equal(t.recheck(keys, rows, low), t.probe(keys))
    assert (low_rows < 1350).all() and (top_rows >= 1350).all()  # the top ones moved
    assert (t.probe(top_keys) >= 0).all()

    later, mark = hinted(low_keys)
    for i in range(4000, 5600, 100):  # now the lookup's own rows go to disk
        t.lookup(np.arange(i, i + 100, dtype=np.uint64), True)
    assert t.rows_kept_below(*mark) == 0
    np.testing.assert_array_equal(t.recheck(low_keys, later, 0), t.probe(low_keys))
    assert (t.probe(low_keys) == -1).all()

    rows, mark = hinted(np.arange(5500, 5510, dtype=np.uint64))
    t.remove_keys(np.array([5505], np.uint64))  # moves the last row, counts no eviction
    assert t.evictions == mark[0] and t.rows_kept_below(*mark) == 0
    t.lookup(np.arange(5500, 5505, dtype=np.uint64), True)  # the stamps again (renumbered)
    rows, mark = hinted(np.arange(5500, 5505, dtype=np.uint64))
    for i in range(6000, 6000 + 70 * 5, 5):  # more spills than the log holds
        t.lookup(np.arange(i, i + 5, dtype=np.uint64), True)
    assert t.evictions > mark[0] and t.rows_kept_below(*mark) == 0


@pytest.mark.parametrize("row_dtype", ["float32", "float16"])
def test_a_full_disk_drops_nothing_for_the_rows_a_lookup_brings_back(tmp_path, row_dtype):
    """RAM and disk both full: a training lookup of rows on disk frees their records, so the
    rows its room sends to disk fit where they were: nothing is dropped, every row is kept
    bit-identical to a table with RAM enough, in RAM or on disk."""
    big = EmbeddingTable(DIM, 10_000, _opt(), seed=3, row_dtype=row_dtype)
    small = _tiered(tmp_path, 400, disk=600, row_dtype=row_dtype)
    keys = np.arange(1, 1001, dtype=np.uint64)
    for t in (big, small):
        for i in range(0, 1000, 50):
            t.lookup(keys[i : i + 50], True)
    assert small.rows == 400 and small.tier.rows == 600 and small.tier.dropped == 0
    rng = np.random.default_rng(4)
    for _ in range(30):  # batches mostly of disk rows
        batch = rng.choice(small.tier.keys[small.tier.order()], 40, replace=False)
        batch = np.concatenate([batch, rng.choice(keys, 10, replace=False)])
        grads = rng.standard_normal((batch.size, DIM)).astype(np.float32)
        for t in (big, small):
            t.lookup(batch, True)
            t.apply_gradients(batch, grads)
    assert small.tier.dropped == 0 and small.rows + small.tier.rows == 1000
    a, b = _sorted_rows(big.export_rows()), _sorted_rows(small.export_rows())
    for name in ("keys", "values", "state"):
        assert np.array_equal(a[name], b[name]), name


def test_spilled_row_keeps_values_and_state_and_comes_back(tmp_path):
    t = _tiered(tmp_path, 4)
    keys = np.arange(4, dtype=np.uint64)
    t.lookup(keys, True)
    t.apply_gradients(keys, np.full((4, DIM), 0.5, np.float32))
    before = t.export_rows()
    t.lookup(np.arange(10, 14, dtype=np.uint64), True)  # pushes keys 0..3 to disk
    assert t.probe(keys).max() == -1
    dk, dv, ds = t.tier.export()
    assert np.array_equal(dk, before["keys"])
    assert np.array_equal(dv, before["values"]) and np.array_equal(ds, before["state"])
    out = t.lookup(keys, True)  # back into RAM
    assert np.array_equal(out, before["values"])
    assert (t.probe(keys) >= 0).all() and t.tier.find(keys).max() == -1
    ram = t.export_rows()
    sel = np.isin(ram["keys"], keys)
    assert np.array_equal(ram["state"][sel], before["state"])


def test_eval_lookup_reads_a_disk_row_without_promoting_it(tmp_path):
    t = _tiered(tmp_path, 2)
    t.lookup(np.array([1, 2], np.uint64), True)
    first = t.lookup(np.array([1], np.uint64), False)
    t.lookup(np.array([3, 4], np.uint64), True)  # 1 and 2 go to disk
    out = t.lookup(np.array([1, 99], np.uint64), False)
    assert np.array_equal(out[0], first[0]) and not out[1].any()
    assert t.probe(np.array([1], np.uint64))[0] == -1  # still on disk only
    assert t.tier.rows == 2


def test_gradients_for_a_row_spilled_since_its_lookup_land_on_disk(tmp_path):
    big = EmbeddingTable(DIM, 100, _opt(), seed=3)
    t = _tiered(tmp_path, 2)
    k = np.array([1, 2], np.uint64)
    for tab in (big, t):
        tab.lookup(k, True)
        tab.lookup(np.array([3, 4], np.uint64), True)  # staleness 2: 1, 2 spilled meanwhile
    g = np.ones((2, DIM), np.float32)
    assert t.apply_gradients(k, g).tolist() == big.apply_gradients(k, g).tolist() == [2, 0, 0]
    a, b = _sorted_rows(big.export_rows()), _sorted_rows(t.export_rows())
    assert np.array_equal(a["values"], b["values"]) and np.array_equal(a["state"], b["state"])


def test_admission_counts_a_key_on_disk_as_known(tmp_path):
    t = _tiered(tmp_path, 2, admission=Admission(min_count=2))
    one = np.array([7], np.uint64)
    t.lookup(one, True)
    t.lookup(one, True)  # admitted at its second miss
    assert t.stats()["admissions"] == 1
    t.lookup(np.array([8], np.uint64), True)
    t.lookup(np.array([8], np.uint64), True)
    t.lookup(np.array([9], np.uint64), True)
    t.lookup(np.array([9], np.uint64), True)  # 7 goes to disk
    assert t.tier.find(one)[0] >= 0
    misses = t.stats()["misses"]
    t.lookup(one, True)  # back from disk at once: no miss, no new admission
    assert t.stats()["misses"] == misses and t.stats()["admissions"] == 3
    assert t.probe(one)[0] >= 0


def test_disk_capacity_drops_the_oldest_rows_and_counts_them(tmp_path):
    t = _tiered(tmp_path, 2, disk=3)
    for k in range(10):
        t.lookup(np.array([k], np.uint64), True)
    assert t.rows == 2 and t.tier.rows == 3 and t.tier.dropped == 5
    held = t.export_rows()["keys"].tolist()
    assert held == [5, 6, 7, 8, 9]


def test_find_agrees_with_a_dict_through_puts_removes_growth_and_reopen(tmp_path):
    """The key filter in front of the index never hides a record: after writes, removals,
    drops past capacity, index growth, filter rebuilds and a reopen, ``find`` answers as a
    dict of the live keys does; and it screens out most keys never written."""
    rng = np.random.default_rng(5)
    d = tmp_path / "t"
    tier = DiskTier.open(d, 100_000, DIM, np.float32, 1)
    slots = tier.index.shape[0]
    live: set[int] = set()
    rebuilt = 0
    for step in range(40):
        keys = np.unique(rng.integers(1, 400_000, 6000).astype(np.uint64))
        stale = int(tier.meta[D.D_STALE])
        tier.put(keys, np.zeros((keys.size, DIM), np.float32), np.zeros((keys.size, 1), np.float32))
        rebuilt += int(tier.meta[D.D_STALE]) < stale
        live = set(tier.keys[tier.order()].tolist())  # drops past capacity included
        gone = rng.choice(np.array(sorted(live), np.uint64), 2500, replace=False)
        assert tier.remove_keys(gone) == 2500
        live -= set(gone.tolist())
        probe = rng.integers(1, 800_000, 20_000).astype(np.uint64)
        got = tier.find(probe) >= 0
        assert np.array_equal(got, np.isin(probe, np.array(sorted(live), np.uint64))), step
    assert tier.rows == len(live) and tier.dropped > 0 and rebuilt > 0
    assert tier.index.shape[0] > slots  # the index grew (reindexed with its filter)
    never = np.arange(10**9, 10**9 + 50_000, dtype=np.uint64)
    assert not (tier.find(never) >= 0).any()
    assert tier.might_hold(never).mean() < 0.15  # ~5% expected; none of them is looked up
    assert tier.might_hold(np.array(sorted(live), np.uint64)).all()
    tier.close()
    again = DiskTier.open(d, 100_000, DIM, np.float32, 1)
    probe = np.array(sorted(live) + list(range(800_000, 810_000)), np.uint64)
    assert np.array_equal(again.find(probe) >= 0, np.isin(probe, np.array(sorted(live), np.uint64)))
    again.close()


def test_reserve_sizes_the_tier_index_for_the_rows_past_ram(tmp_path):
    """A table's ``reserve`` past its RAM capacity sizes its tier's index for the rest, so that
    spilling that many rows never rebuilds the index; every spilled row is found after."""
    t = _tiered(tmp_path, 1_000, disk=200_000)
    slots = t.tier.index.shape[0]
    t.reserve(121_000)
    reserved = t.tier.index.shape[0]
    assert reserved > slots and 0.7 * reserved >= 120_000
    keys = np.arange(1, 121_001, dtype=np.uint64)
    for i in range(0, keys.size, 500):
        t.lookup(keys[i : i + 500], True)
    assert t.tier.index.shape[0] == reserved and t.tier.rows >= 119_000
    back = t.tier.find(keys)
    assert (back >= 0).sum() == t.tier.rows and np.isin(t.row_keys[: t.rows], keys[back < 0]).all()
    t.tier.reserve(10)  # never shrinks
    assert t.tier.index.shape[0] == reserved


def test_put_rows_writes_what_put_of_the_gathered_rows_writes(tmp_path):
    rng = np.random.default_rng(2)
    keys = rng.permutation(10_000)[:300].astype(np.uint64) + 1
    values = rng.standard_normal((300, DIM)).astype(np.float32)
    state = rng.random((300, 1)).astype(np.float32)
    rows = rng.permutation(300)[:120].astype(np.int32)
    a = DiskTier.open(tmp_path / "a", 1000, DIM, np.float32, 1)
    b = DiskTier.open(tmp_path / "b", 1000, DIM, np.float32, 1)
    a.put(keys[rows], values[rows], state[rows])
    b.put_rows(keys, rows, values, state)
    for x, y in zip(a.export(), b.export(), strict=True):
        assert np.array_equal(x, y)
    with pytest.raises(StoreError, match="put_rows"):
        b.put_rows(keys, rows, values.astype(np.float16), state)
    a.close()
    b.close()


def test_tier_is_validated_on_open(tmp_path, caplog):
    d = tmp_path / "t"
    tier = DiskTier.open(d, 100, DIM, np.float32, 1)
    keys = np.arange(20, dtype=np.uint64)
    vals = np.arange(80, dtype=np.float32).reshape(20, DIM)
    tier.put(keys, vals, np.ones((20, 1), np.float32))
    tier.slab[3, 25] ^= 0xFF  # a torn record
    tier.close()
    with caplog.at_level(logging.WARNING):
        again = DiskTier.open(d, 100, DIM, np.float32, 1)
    assert again.rows == 19 and again.bad_on_open == 1
    assert "torn or corrupt" in caplog.text
    k, v, _ = again.export()
    assert 3 not in k.tolist() and np.array_equal(v, vals[k.astype(np.int64)])
    again.close()
    (d / "tier.json").write_text("{not json")
    other = DiskTier.open(d, 100, DIM, np.float32, 1)
    assert other.rows == 0
    other.close()
    other = DiskTier.open(d, 100, DIM, np.float16, 1)  # another layout: starts empty
    assert other.rows == 0
    with pytest.raises(StoreError, match="in use"):
        DiskTier.open(d, 100, DIM, np.float16, 1)
    other.close()


def test_tier_stores_any_value_dtype(tmp_path):
    tier = DiskTier.open(tmp_path / "h", 10, 3, np.float16, 1, np.float32)
    vals = np.array([[1.5, -2.0, 3.25], [0.1, 0.2, 0.3]], np.float16)
    tier.put(np.array([5, 6], np.uint64), vals, np.array([[1.0], [2.0]], np.float32))
    v, s = tier.read(tier.find(np.array([6, 5], np.uint64)))
    assert v.dtype == np.float16 and np.array_equal(v, vals[::-1]) and s[:, 0].tolist() == [2, 1]
    assert json.loads((tmp_path / "h" / "tier.json").read_text())["value_dtype"] == "<f2"
    tier.close()


def _store(tmp_path: Path, n: int, capacity: int, tier: bool, name: str = "tier"):
    cfg = DiskTierConfig(tmp_path / name, 100_000) if tier else None
    return ShardedStore(n, capacity, _opt(), seed=3, dims=[DIM], disk_tier=cfg)


def test_checkpoint_of_a_two_tier_store_reshards(tmp_path):
    src = _store(tmp_path, 2, 60, True)
    ref = _store(tmp_path, 1, 100_000, False)
    rng = np.random.default_rng(2)
    for _ in range(60):
        keys = rng.integers(0, 400, 30).astype(np.uint64)
        g = rng.standard_normal((30, DIM)).astype(np.float32)
        assert np.array_equal(src.lookup(keys, DIM, True), ref.lookup(keys, DIM, True))
        src.apply_gradients(keys, g)
        ref.apply_gradients(keys, g)
    assert src.stats()["disk_rows"] > 0
    job_ckpt.dump(tmp_path / "ck", src)
    ckpt = job_ckpt.read(tmp_path / "ck")
    dst = _store(tmp_path, 3, 90, True, name="tier3")
    job_ckpt.restore_store(dst, ckpt)
    all_keys = np.arange(400, dtype=np.uint64)
    want = ref.lookup(all_keys, DIM, False)
    assert np.array_equal(dst.lookup(all_keys, DIM, False), want)
    assert dst.rows + dst.stats()["disk_rows"] == ref.rows
    # the checkpoint holds the state too: one more identical step on each
    keys = rng.integers(0, 400, 30).astype(np.uint64)
    g = rng.standard_normal((30, DIM)).astype(np.float32)
    for s in (dst, ref):
        s.lookup(keys, DIM, True)
        s.apply_gradients(keys, g)
    assert np.array_equal(dst.lookup(all_keys, DIM, False), ref.lookup(all_keys, DIM, False))
    # the replaced store's tier set is gone; the new one is named CURRENT
    assert (tmp_path / "tier3" / "CURRENT").read_text().strip() == "set1"
    assert not (tmp_path / "tier3" / "set0").exists()
    src.close()
    dst.close()


def test_take_changes_does_not_report_spilled_rows_as_removed(tmp_path):
    shard = Shard(3, _opt(), seed=3, dims=[DIM], disk_tier=DiskTierConfig(tmp_path / "s", 100))
    shard.track_changes()
    shard.lookup(np.arange(3, dtype=np.uint64), DIM, True)
    shard.take_changes()
    shard.lookup(np.arange(3, 6, dtype=np.uint64), DIM, True)  # 0..2 spill
    ch = shard.take_changes()[DIM]
    assert ch["removed"].size == 0 and ch["keys"].tolist() == [3, 4, 5]
    assert shard.remove_rows(DIM, np.array([0, 4], np.uint64)) == 2
    assert shard.stats()["disk_rows"] == 2
    shard.close()


def test_disk_tier_config_errors(tmp_path):
    from persia.embedding.config import parse_global_config
    from persia.embedding.spec import EmbeddingSpec, SlotSpec, assign_prefixes
    from persia.store.build import shard_options

    for bad, field in (
        ({"disk_tier_dir": str(tmp_path)}, "disk_tier_capacity"),
        ({"disk_tier_dir": str(tmp_path), "disk_tier_capacity": 0}, "disk_tier_capacity"),
        ({"disk_tier_dir": "", "disk_tier_capacity": 5}, "disk_tier_dir"),
    ):
        with pytest.raises(ConfigError, match=field):
            parse_global_config({"embedding_parameter_server_config": bad})
    g = parse_global_config(
        {"embedding_parameter_server_config": {"disk_tier_dir": "/x", "disk_tier_capacity": 7}}
    )
    assert parse_global_config(g.to_dict()) == g
    with pytest.raises(StoreError, match="capacity"):
        DiskTierConfig(tmp_path, 0)
    spec = EmbeddingSpec(
        slots=tuple(assign_prefixes([SlotSpec("a", 4)])),
        disk_tier_dir=str(tmp_path),
        disk_tier_capacity=10,
    )
    with pytest.raises(ConfigError, match="embedded"):
        shard_options(spec, 2)
    with pytest.raises(ConfigError, match="set together"):
        EmbeddingSpec(slots=tuple(assign_prefixes([SlotSpec("a", 4)])), disk_tier_dir=str(tmp_path))


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from persia.checkpoint import job as job_ckpt
    from persia.embedding.optim import Adagrad
    from persia.store import ShardedStore
    from persia.store.disk import DiskTierConfig

    base = sys.argv[1]
    store = ShardedStore(2, 200, Adagrad(lr=0.1), seed=3, dims=[4],
                         disk_tier=DiskTierConfig(base + "/tier", 1_000_000))
    rng = np.random.default_rng(0)
    step = 0
    while True:
        keys = rng.integers(0, 50_000, 256).astype(np.uint64)
        store.lookup(keys, 4, True)
        store.apply_gradients(keys, rng.standard_normal((256, 4)).astype(np.float32))
        step += 1
        if step % 20 == 0:
            job_ckpt.dump(base + "/ck", store, position={"step": step})
            rows = store.rows + store.stats()["disk_rows"]
            print("dumped", step, rows, flush=True)
    """
)


def test_sigkill_during_disk_writes_leaves_a_loadable_checkpoint(tmp_path, caplog):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2])] + sys.path)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    dumped = {}
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            _, step, rows = line.split()
            dumped[int(step)] = int(rows)
            if len(dumped) == 3:
                break
    finally:
        child.send_signal(signal.SIGKILL)  # while it writes rows to disk
        child.wait()
    # the killed tier opens validated: every record kept passes its check
    live = tmp_path / "tier" / "set0" / "s0" / "d4"
    tier = DiskTier.open(live, 500_000, 4, np.float32, 4)  # Adagrad: 4 state columns
    assert tier.rows > 0
    tier.read(tier.order())
    tier.close()
    ckpt = job_ckpt.read(tmp_path / "ck")
    step = ckpt.position["step"]
    assert step in dumped
    with caplog.at_level(logging.WARNING):
        fresh = ShardedStore(
            3, 300, Adagrad(lr=0.1), seed=3, dims=[4],
            disk_tier=DiskTierConfig(tmp_path / "tier", 1_000_000),
        )  # fmt: skip
    assert "left by an earlier process discarded" in caplog.text  # the killed set, validated
    assert fresh.rows == 0 and fresh.stats()["disk_rows"] == 0  # a new store starts empty
    job_ckpt.restore_store(fresh, ckpt)
    assert fresh.rows + fresh.stats()["disk_rows"] == dumped[step]
    fresh.close()


def test_no_tier_loses_rows_the_tier_keeps(tmp_path):
    with_tier = _tiered(tmp_path, 50)
    without = EmbeddingTable(DIM, 50, _opt(), seed=3)
    _train([with_tier], 50, 300)
    _train([without], 50, 300)
    assert without.rows == 50 and without.evictions > 0
    assert with_tier.rows + with_tier.tier.rows == len(np.unique(with_tier.export_rows()["keys"]))
    assert with_tier.rows + with_tier.tier.rows > 250


def test_prefetch_brings_disk_rows_back_without_a_lookup(tmp_path):
    store = _store(tmp_path, 1, 8, True)
    first = np.arange(8, dtype=np.uint64)
    before = store.lookup(first, DIM, True)
    store.lookup(np.arange(100, 108, dtype=np.uint64), DIM, True)  # 0..7 go to disk
    assert store.stats()["disk_rows"] == 8
    assert store.prefetch(first[:3], DIM) == 3
    assert store.stats()["disk_rows"] == 8  # 3 back, 3 others out
    reads = store.stats()["disk_reads"]
    assert np.array_equal(store.lookup(first[:3], DIM, True), before[:3])
    assert store.stats()["disk_reads"] == reads  # the lookup found them in RAM
    store.close()
    plain = ShardedStore(1, 8, _opt(), dims=[DIM])
    assert plain.prefetch(first, DIM) == 0


def test_reads_wait_follows_the_measured_read_time(tmp_path):
    """Before any read the tier says a prefetch pays; reads of records in the page cache take
    well under SLOW_READ_S each; the average follows reads that waited for the device."""
    from persia.store.disk import SLOW_READ_S

    store = _store(tmp_path, 1, 8, True)
    store.lookup(np.arange(8, dtype=np.uint64), DIM, True)
    store.lookup(np.arange(100, 108, dtype=np.uint64), DIM, True)  # 0..7 go to disk
    tier = next(iter(store.shards[0]._tables.values())).tier
    assert tier.read_s_per_record is None and tier.reads_wait and store.disk_reads_wait()
    recs = tier.find(np.arange(8, dtype=np.uint64))
    for _ in range(20):  # the records were just written: page-cache hits
        tier.read(np.repeat(recs, 200))
    assert tier.read_s_per_record < SLOW_READ_S
    assert not tier.reads_wait and not store.disk_reads_wait()
    tier.read_s_per_record = 100 * SLOW_READ_S  # as after reads that went to the disk
    assert store.disk_reads_wait()
    store.close()
    assert not ShardedStore(1, 8, _opt(), dims=[DIM]).disk_reads_wait()  # no tier


@pytest.mark.parametrize("tracking", [False, True])
def test_a_shard_with_a_tier_matches_one_with_ram_enough(tmp_path, tracking):
    """Both training paths of a shard (one kernel; probe, check, then look up: change
    tracking on) bring disk rows back with their values."""
    big = Shard(10_000, _opt(), seed=3, dims=[DIM])
    small = Shard(40, _opt(), seed=3, dims=[DIM], disk_tier=DiskTierConfig(tmp_path / "s", 10**5))
    if tracking:
        small.track_changes()
    rng = np.random.default_rng(5)
    for _ in range(80):
        keys = rng.integers(0, 300, 30).astype(np.uint64)
        g = rng.standard_normal((30, DIM)).astype(np.float32)
        assert np.array_equal(small.lookup(keys, DIM, True), big.lookup(keys, DIM, True))
        small.apply_gradients(keys, g)
        big.apply_gradients(keys, g)
        if tracking:
            small.take_changes()
    a, b = _sorted_rows(big.export_rows()[DIM]), _sorted_rows(small.export_rows()[DIM])
    for name in ("keys", "values", "state"):
        assert np.array_equal(a[name], b[name]), name
    small.close()


def test_probed_training_lookup_of_disk_rows_that_fit_without_spilling(tmp_path):
    t = _tiered(tmp_path, 4)
    first = np.arange(4, dtype=np.uint64)
    t.lookup(first, True)
    t.apply_gradients(first, np.ones((4, DIM), np.float32))
    before = t.lookup(first, False)
    t.lookup(np.arange(10, 14, dtype=np.uint64), True)  # 0..3 on disk
    t.remove_keys(np.array([10, 11], np.uint64))  # room for two: nothing spills next
    keys = first[:2]
    out = t.train_lookup(keys, t.probe(keys))
    assert np.array_equal(out, before[:2])


def test_deltas_of_a_two_tier_store_rebuild_it(tmp_path):
    """A delta reader starting empty reaches the rows of both tiers, including the rows the
    full disk drops (reported as removed)."""
    from persia.store.delta import DeltaReader, DeltaWriter

    src = ShardedStore(
        2, 40, _opt(), seed=3, dims=[DIM], disk_tier=DiskTierConfig(tmp_path / "t", 120)
    )
    writer = DeltaWriter(src, tmp_path / "inc").start()
    replica = ShardedStore(1, 100_000, _opt(), seed=3, dims=[DIM])
    reader = DeltaReader(tmp_path / "inc")
    rng = np.random.default_rng(3)
    for step in range(40):
        keys = rng.integers(0, 400, 25).astype(np.uint64)
        src.lookup(keys, DIM, True)
        src.apply_gradients(keys, rng.standard_normal((25, DIM)).astype(np.float32))
        if step % 10 == 9:
            writer.flush()
            reader.apply_pending(replica)
            want = _sorted_rows({
                k: np.concatenate([s.export_rows()[DIM][k] for s in src.shards])
                for k in ("keys", "values", "state")
            })  # fmt: skip
            got = _sorted_rows(replica.shards[0].export_rows()[DIM])
            for name in ("keys", "values", "state"):
                assert np.array_equal(want[name], got[name]), (step, name)
    assert src.stats()["disk_dropped"] > 0
    writer.close()
    src.close()


def test_a_batch_larger_than_ram_warns(tmp_path, caplog):
    from persia.logger import reset_warn_once

    reset_warn_once()
    t = _tiered(tmp_path, 4)
    with caplog.at_level(logging.WARNING):
        t.lookup(np.arange(10, dtype=np.uint64), True)
    assert "more distinct keys" in caplog.text


def _slab_rss(slab: Path) -> int:
    """Resident bytes of this process's mapping of ``slab`` (/proc/self/smaps)."""
    rss, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's first line
            inside = line.endswith(str(slab))
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
    return rss


def _slab_rss_reaches(slab: Path, want: int, timeout_s: float = 5.0) -> bool:
    """Whether the resident bytes of ``slab``'s mapping reach ``want`` within ``timeout_s`` (the
    prefault thread works in the background)."""
    deadline = time.monotonic() + timeout_s
    while _slab_rss(slab) < want:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_slab_pages_are_faulted_in_ahead_of_the_writes(tmp_path):
    from persia.store import disk as disk_mod

    if not disk_mod._PREFAULT.enabled:
        pytest.skip("madvise(MADV_POPULATE_WRITE) is refused here")
    tier = DiskTier.open(tmp_path / "t", 200_000, DIM, np.float32, 1)
    slab = (tmp_path / "t" / "tier.slab").resolve()
    keys = np.arange(1, 11, dtype=np.uint64)
    tier.put(keys, np.ones((10, DIM), np.float32), np.ones((10, 1), np.float32))
    # ten records written, megabytes mapped ahead of them
    assert _slab_rss_reaches(slab, disk_mod.PREFAULT_BYTES // 2)
    assert tier.disk_bytes == 10 * tier.record_size  # what counts as used is unchanged
    k, v, _ = tier.export()
    assert np.array_equal(k, keys) and np.array_equal(v, np.ones((10, DIM), np.float32))
    tier.close()


def test_reserve_faults_in_the_slab_pages_of_the_reserved_records(tmp_path):
    from persia.store import disk as disk_mod

    if not disk_mod._PREFAULT.enabled:
        pytest.skip("madvise(MADV_POPULATE_WRITE) is refused here")
    tier = DiskTier.open(tmp_path / "t", 400_000, DIM, np.float32, 1)
    slab = (tmp_path / "t" / "tier.slab").resolve()
    want = 300_000 * tier.record_size
    assert want > 2 * disk_mod.PREFAULT_BYTES and _slab_rss(slab) < want // 2
    tier.reserve(300_000)
    assert _slab_rss(slab) >= want  # now, in the caller (no background thread to wait for)
    assert tier.disk_bytes == 0
    tier.close()


def test_a_forked_child_prefaults_with_its_own_thread(tmp_path):
    from persia.store import disk as disk_mod

    if not disk_mod._PREFAULT.enabled:
        pytest.skip("madvise(MADV_POPULATE_WRITE) is refused here")
    parent = DiskTier.open(tmp_path / "p", 1000, DIM, np.float32, 1)
    parent.put(
        np.arange(1, 3, dtype=np.uint64), np.ones((2, DIM), np.float32), np.ones((2, 1), np.float32)
    )
    assert disk_mod._PREFAULT._thread is not None  # started in this process
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread is not here; its first request starts one
        code = 1
        try:
            if disk_mod._PREFAULT._thread is None:
                tier = DiskTier.open(tmp_path / "c", 200_000, DIM, np.float32, 1)
                tier.put(
                    np.arange(1, 3, dtype=np.uint64),
                    np.ones((2, DIM), np.float32),
                    np.ones((2, 1), np.float32),
                )
                slab = (tmp_path / "c" / "tier.slab").resolve()
                code = 0 if _slab_rss_reaches(slab, disk_mod.PREFAULT_BYTES // 2) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    parent.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_disk_record_changed_under_the_table_is_an_error_not_a_row(tmp_path):
    t = _tiered(tmp_path, 20)
    for k in range(40):  # keys 0..19 go to disk
        t.lookup(np.array([k], np.uint64), True)
    assert t.tier.rows == 20
    rec = int(t.tier.find(np.array([3], np.uint64))[0])
    t.tier.slab[rec, 30] ^= 0xFF  # the file changed under the running table
    with pytest.raises(StoreError, match="fail their check"):  # the fast lookup's restore
        t.lookup(np.array([3, 35, 36, 37, 38, 39], np.uint64), True)  # (room for 6: 6 spill)
    # the table is whole: no hole left (5 of the 6), no row half made, key 3's row initialised
    assert t.meta[K.M_HOLES] == 0 and t.rows == 15 and t.tier.rows == 26
    np.testing.assert_array_equal(t.probe(t.row_keys[: t.rows]), np.arange(t.rows))
    assert (t.lru_ts[: t.rows] >= 0).all()
    fresh = EmbeddingTable(DIM, 20, _opt(), seed=3).lookup(np.array([3], np.uint64), True)
    np.testing.assert_array_equal(t.values[t.probe(np.array([3], np.uint64))], fresh)
    with pytest.raises(StoreError, match="fail their check"):
        t.tier.read(np.array([rec], np.int32))
    assert t.tier.find(np.array([3], np.uint64))[0] == rec  # left on disk, not freed
    rec4 = t.tier.find(np.array([4], np.uint64))
    want = t.tier.read(rec4)[0]
    got = t.lookup(np.array([4], np.uint64), True)  # the other records still come back
    assert np.array_equal(got, want) and t.tier.find(np.array([4], np.uint64))[0] == -1
