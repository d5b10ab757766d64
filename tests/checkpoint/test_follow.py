"""persia.checkpoint.follow without a context: parameter-server shards in inference mode serve
their slice of the store a ServingRuntime serves, deltas included; a new checkpoint generation
gets serving past a corrupt delta it already holds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from persia import checkpoint
from persia.checkpoint.follow import ServingRuntime, ServingShard
from persia.embedding.optim import Adagrad
from persia.embedding.spec import EmbeddingSpec, SlotSpec, spec_to_dict
from persia.errors import PersiaError
from persia.store import ShardedStore, shard_of
from persia.store.delta import DeltaWriter

SPEC = EmbeddingSpec(
    slots=(SlotSpec("x", 4, prefix=1), SlotSpec("y", 8, prefix=2)), capacity=100_000, shards=2
)


def train_step(store: ShardedStore, rng: np.random.Generator) -> None:
    for dim in (4, 8):
        keys = np.unique(rng.integers(0, 3000, 200).astype(np.uint64) * np.uint64(2) + (dim == 8))
        store.lookup(keys, dim, True)
        store.apply_gradients(keys, rng.normal(size=(keys.size, dim)).astype(np.float32))


def dump(directory: Path, store: ShardedStore, writer: DeltaWriter) -> None:
    checkpoint.dump(directory, store, delta_seq=writer.last_seq, embedding_spec=spec_to_dict(SPEC))


def all_keys(store: ShardedStore, dim: int) -> np.ndarray:
    return np.concatenate([s.export_rows(dim)[dim]["keys"] for s in store.shards])


def test_serving_shards_hold_the_slices_of_the_served_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = ShardedStore(3, 100_000, Adagrad(lr=0.1), dims=[4, 8])
    writer = DeltaWriter(train, tmp_path / "inc").start()
    train_step(train, rng)
    dump(tmp_path / "ckpt", train, writer)
    train_step(train, rng)
    writer.flush()
    whole = ServingRuntime(tmp_path / "ckpt", incremental_dir=tmp_path / "inc")
    parts = [
        ServingShard(tmp_path / "ckpt", r, 2, incremental_dir=tmp_path / "inc") for r in (0, 1)
    ]
    for dim in (4, 8):
        keys = all_keys(train, dim)
        probe = np.concatenate([keys, keys[:5] + np.uint64(100_000)])  # and unknown keys
        where = shard_of(probe, 2)
        got = np.zeros((probe.size, dim), np.float32)
        for r, part in enumerate(parts):
            sel = where == r
            got[sel] = part.lookup(probe[sel], dim, False)
        np.testing.assert_array_equal(got, whole.store.lookup(probe, dim, False))
        np.testing.assert_array_equal(got, train.lookup(probe, dim, False))
        assert not got[keys.size :].any()
    assert sum(p.stats()["rows"] for p in parts) == train.rows
    assert [p.freshness()["last_delta_seq"] for p in parts] == [1, 1]
    with pytest.raises(PersiaError, match="training lookups are refused"):
        parts[0].lookup(keys[:1], 8, True)
    with pytest.raises(PersiaError, match="gradients"):
        parts[0].apply_gradients(keys[:1], np.zeros((1, 8), np.float32))
    with pytest.raises(PersiaError, match="read-only"):
        whole.submit(None, None, {})  # type: ignore[arg-type]
    for p in parts:
        p.close()
    whole.close()


def test_a_new_generation_serves_past_a_corrupt_delta(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(1)
    train = ShardedStore(2, 100_000, Adagrad(lr=0.1), dims=[4, 8])
    writer = DeltaWriter(train, tmp_path / "inc").start()
    train_step(train, rng)
    dump(tmp_path / "ckpt", train, writer)
    train_step(train, rng)
    gen = writer.flush().path  # delta 1, corrupt on disk
    path = next(gen.glob("d*.values.npy"))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    train_step(train, rng)
    writer.flush()  # delta 2 waits behind it
    served = ServingRuntime(
        tmp_path / "ckpt",
        incremental_dir=tmp_path / "inc",
        follow_checkpoint=True,
        poll_interval_s=0.02,
    )
    time.sleep(0.2)  # several polls: still refused
    assert (
        served.freshness()["last_delta_seq"] == 0
        and "gen-000001" in served.freshness()["last_error"]
    )
    dump(tmp_path / "ckpt", train, writer)  # training's next full checkpoint holds deltas 1-2
    deadline = time.monotonic() + 30
    while served.freshness()["generations_loaded"] < 2:
        assert time.monotonic() < deadline, served.freshness()
        time.sleep(0.02)
    fresh = served.freshness()
    assert fresh["last_delta_seq"] == 2 and fresh["last_error"] is None
    for dim in (4, 8):
        keys = all_keys(train, dim)
        np.testing.assert_array_equal(
            served.store.lookup(keys, dim, False), train.lookup(keys, dim, False)
        )
    train_step(train, rng)
    writer.flush()  # delta 3 applies on the new generation
    while served.freshness()["last_delta_seq"] < 3:
        assert time.monotonic() < deadline, served.freshness()
        time.sleep(0.02)
    keys = all_keys(train, 8)
    np.testing.assert_array_equal(served.store.lookup(keys, 8, False), train.lookup(keys, 8, False))
    served.close()
