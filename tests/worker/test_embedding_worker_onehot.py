"""The embedding worker's one-hot fast path gives exactly what the per-slot path gives."""

from __future__ import annotations

import numpy as np
import pytest

from persia.datasets.synthetic import SyntheticStream
from persia.embedding.optim import Adagrad
from persia.rpc.local import local_parameter_servers
from persia.store import ShardedStore
from persia.store.config import Admission, Uniform
from persia.worker.embedding_worker import EmbeddingWorker, SlotSpec


def _worker(slots: list[SlotSpec], fast: bool, shards: int = 2) -> EmbeddingWorker:
    store = ShardedStore(
        num_shards=shards,
        capacity=100_000,
        optimizer=Adagrad(lr=0.1),
        init=Uniform(-0.1, 0.1),
        admission=Admission(probability=1.0),
        seed=7,
        weight_bound=10.0,
        dims=sorted({s.dim for s in slots}),
    )
    w = EmbeddingWorker(slots, 8, local_parameter_servers(store))
    w.one_hot_fast_path = fast
    return w


@pytest.mark.parametrize(
    ("ids_per_sample", "pooling", "expect_fast"),
    [(1, "sum", True), (1, "mean", True), (1, "sqrt", True), (3, "sum", False)],
)
def test_fast_path_matches_per_slot_path(ids_per_sample, pooling, expect_fast):
    stream = SyntheticStream((50, 1000, 7, 5000), ids_per_sample=ids_per_sample, seed=2)
    names = stream.slot_names()
    slots = [SlotSpec(n, 4, pooling=pooling, prefix=i + 1) for i, n in enumerate(names)]
    fast, slow = _worker(slots, True), _worker(slots, False)
    rng = np.random.default_rng(0)
    for i in range(4):
        pb = stream.batch(i, 64).to_persia_batch(names)
        a, b = fast.forward(pb, True), slow.forward(pb, True)
        assert a.groups[0].one_hot is expect_fast
        assert b.groups[0].one_hot is False
        np.testing.assert_array_equal(a.summed, b.summed)
        grad = rng.standard_normal(a.summed.shape).astype(np.float32)
        grad[3, 5] = np.nan  # one non-finite gradient: counted and dropped alike
        np.testing.assert_array_equal(fast.backward(a, grad, {}), slow.backward(b, grad, {}))
        assert fast.nonfinite_gradients == slow.nonfinite_gradients
    # Rows after training are the same.
    pb = stream.batch(99, 64).to_persia_batch(names, requires_grad=False)
    np.testing.assert_array_equal(fast.forward(pb, False).summed, slow.forward(pb, False).summed)


def test_mixed_slots_use_the_per_slot_path():
    stream = SyntheticStream((50, 1000, 7), seed=3)
    names = stream.slot_names()
    slots = [
        SlotSpec(names[0], 4, prefix=1),
        SlotSpec(names[1], 4, pooling="raw", prefix=2, sample_fixed_size=2),
        SlotSpec(names[2], 4, prefix=3),
    ]
    fast, slow = _worker(slots, True), _worker(slots, False)
    pb = stream.batch(0, 32).to_persia_batch(names)
    a, b = fast.forward(pb, True), slow.forward(pb, True)
    assert not a.groups[0].one_hot
    np.testing.assert_array_equal(a.summed, b.summed)
    np.testing.assert_array_equal(a.raw[1], b.raw[1])
