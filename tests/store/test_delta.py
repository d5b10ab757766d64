"""Incremental updates: deltas applied in order reproduce rows and optimizer state exactly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from persia import checkpoint
from persia.checkpoint import restore_with_deltas as restore
from persia.embedding.optim import Adam
from persia.errors import CheckpointError, StoreError
from persia.store import ShardedStore
from persia.store.delta import DeltaReader, DeltaWriter


def new_store(shards: int) -> ShardedStore:
    return ShardedStore(shards, 200_000, Adam(lr=0.05), dims=[4, 8])


def step(store: ShardedStore, rng: np.random.Generator, n: int = 300, grads: bool = True) -> None:
    for dim in (4, 8):
        keys = rng.integers(0, 5000, n).astype(np.uint64) * np.uint64(2) + np.uint64(dim == 8)
        keys = np.unique(keys)
        store.lookup(keys, dim, True)
        if grads:
            store.apply_gradients(keys, rng.normal(size=(keys.size, dim)).astype(np.float32))


def rows(store: ShardedStore) -> dict[int, tuple[np.ndarray, ...]]:
    out = {}
    for dim in (4, 8):
        parts = [s.export_rows(dim)[dim] for s in store.shards if dim in s.dims]
        keys = np.concatenate([p["keys"] for p in parts])
        o = np.argsort(keys)
        out[dim] = tuple(
            np.concatenate([p[w] for p in parts])[o] for w in ("keys", "values", "state")
        )
    return out


def assert_same(a, b) -> None:
    for dim in a:
        for x, y in zip(a[dim], b[dim], strict=True):
            np.testing.assert_array_equal(x, y)


def test_full_checkpoint_plus_deltas_reproduce_rows_and_adam_state(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = new_store(2)
    writer = DeltaWriter(store, tmp_path / "inc").start()
    step(store, rng)
    writer.flush()  # delta 1: before the full checkpoint
    step(store, rng)
    checkpoint.dump(tmp_path / "ckpt", store, delta_seq=writer.last_seq)
    for i in range(4):
        step(store, rng, grads=i != 2)  # lookups without gradients create rows too
        writer.flush()
    step(store, rng)
    writer.close()
    assert [d.seq for d in writer.written] == [1, 2, 3, 4, 5, 6]

    replica = new_store(3)
    result = restore(replica, tmp_path / "ckpt", tmp_path / "inc")
    assert result["applied"] == [2, 3, 4, 5, 6] and result["lost_window_s"] >= 0
    assert_same(rows(replica), rows(store))
    # from nothing: every delta from the first one gives the same rows too
    scratch = new_store(1)
    assert DeltaReader(tmp_path / "inc").apply_pending(scratch) == [1, 2, 3, 4, 5, 6]
    assert_same(rows(scratch), rows(store))


def test_a_reader_following_a_live_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store, replica = new_store(2), new_store(2)
    writer = DeltaWriter(store, tmp_path).start()
    reader = DeltaReader(tmp_path)
    for _ in range(3):
        step(store, rng)
        writer.flush()
        reader.apply_pending(replica)
        assert_same(rows(replica), rows(store))
    assert writer.flush() is None  # nothing changed since


@pytest.mark.parametrize("trigger", [{"max_rows": 200}, {"interval_s": 0.05}])
def test_flushes_by_rows_or_by_time(tmp_path: Path, trigger) -> None:
    rng = np.random.default_rng(2)
    store = new_store(2)
    writer = DeltaWriter(store, tmp_path, **trigger).start()
    deadline = time.monotonic() + 5
    while len(writer.written) < 2 and time.monotonic() < deadline:
        step(store, rng, n=150)
        time.sleep(0.06)
    writer.close()
    assert len(writer.written) >= 2
    replica = new_store(2)
    DeltaReader(tmp_path).apply_pending(replica)
    assert_same(rows(replica), rows(store))


def make_deltas(tmp_path: Path, count: int) -> ShardedStore:
    rng = np.random.default_rng(3)
    store = new_store(2)
    writer = DeltaWriter(store, tmp_path).start()
    for _ in range(count):
        step(store, rng, n=50)
        writer.flush()
    return store


def test_a_gap_is_refused_never_skipped(tmp_path: Path) -> None:
    make_deltas(tmp_path, 3)
    (tmp_path / "gen-000002").rename(tmp_path / "elsewhere")
    reader = DeltaReader(tmp_path)
    with pytest.raises(CheckpointError, match="delta 2 is missing but delta 3 exists"):
        reader.apply_pending(new_store(1))
    assert reader.last_seq == 0  # the gap is found before anything is applied


def test_an_incomplete_delta_is_waited_for(tmp_path: Path) -> None:
    store = make_deltas(tmp_path, 2)
    (tmp_path / "gen-000002").rename(tmp_path / ".tmp-gen-000002-99")  # still being written
    replica = new_store(2)
    reader = DeltaReader(tmp_path)
    assert reader.apply_pending(replica) == [1]
    assert reader.apply_pending(replica) == []
    (tmp_path / ".tmp-gen-000002-99").rename(tmp_path / "gen-000002")  # completed
    assert reader.apply_pending(replica) == [2]
    assert_same(rows(replica), rows(store))


def test_a_corrupt_delta_is_refused_whole(tmp_path: Path) -> None:
    make_deltas(tmp_path, 3)
    victim = tmp_path / "gen-000003" / "d8.values.npy"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 1
    victim.write_bytes(bytes(data))
    replica = new_store(2)
    reader = DeltaReader(tmp_path)
    with pytest.raises(CheckpointError, match="crc32"):
        reader.apply_pending(replica)
    assert reader.last_seq == 2
    before = rows(replica)
    with pytest.raises(CheckpointError):
        reader.apply_pending(replica)
    assert_same(rows(replica), before)  # nothing of delta 3 was applied


def test_writer_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="interval_s"):
        DeltaWriter(new_store(1), tmp_path, interval_s=0)
    with pytest.raises(StoreError, match="max_rows"):
        DeltaWriter(new_store(1), tmp_path, max_rows=0)


def test_tracking_is_off_by_default_and_records_nothing() -> None:
    store = new_store(1)
    step(store, np.random.default_rng(0))
    assert not store.shards[0].tracking_changes
    assert store.shards[0].take_changes() == {}


def test_a_delta_of_a_dim_the_store_lacks_is_refused_before_any_row(tmp_path: Path) -> None:
    """Delta 1 holds dims 4 and 8; a store declaring only dim 4 refuses it whole (no row of
    dim 4 written either), instead of writing dim 4 and failing at dim 8."""
    rng = np.random.default_rng(3)
    source = new_store(1)
    writer = DeltaWriter(source, tmp_path / "inc").start()
    step(source, rng)
    writer.flush()
    target = ShardedStore(1, 200_000, Adam(lr=0.05), dims=[4])
    reader = DeltaReader(tmp_path / "inc")
    with pytest.raises(CheckpointError, match="delta of dim 8, the store only holds \\[4\\]"):
        reader.apply_pending(target)
    assert reader.last_seq == 0
    assert sum(int(s["rows"]) for s in target.shard_stats()) == 0


def test_apply_pending_holds_the_lock_while_writing_rows(tmp_path: Path) -> None:
    import threading

    rng = np.random.default_rng(4)
    store = new_store(2)
    writer = DeltaWriter(store, tmp_path / "inc").start()
    step(store, rng)
    writer.flush()

    class Probe:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.entered = 0

        def __enter__(self):
            self.lock.acquire()
            self.entered += 1

        def __exit__(self, *exc):
            self.lock.release()

    probe = Probe()
    copy = new_store(2)
    import_rows = [s.import_rows for s in copy.shards]
    held = []
    for shard, original in zip(copy.shards, import_rows, strict=True):

        def checked(*args, _original=original):
            held.append(probe.lock.locked())
            return _original(*args)

        shard.import_rows = checked  # type: ignore[method-assign]
    assert DeltaReader(tmp_path / "inc").apply_pending(copy, lock=probe) == [1]
    assert probe.entered == 1 and held and all(held)
    assert_same(rows(copy), rows(store))
