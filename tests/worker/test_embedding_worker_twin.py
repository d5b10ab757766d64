"""The embedding worker's fused kernels and the whole worker against plain NumPy twins
(tests/naive_worker.py): the same results, bit for bit, and the same rows in the store after."""

from __future__ import annotations

import naive_worker as naive
import numpy as np
import pytest

from persia.datasets.synthetic import SyntheticStream
from persia.embedding.optim import Adagrad
from persia.errors import BackendError, BatchError
from persia.rpc.local import local_parameter_servers
from persia.store import ShardedStore
from persia.store.config import Admission, Uniform
from persia.worker import kernels as K
from persia.worker import pooling
from persia.worker.embedding_worker import EmbeddingWorker, SlotSpec


# ------------------------------------------------------------------------------ the kernels
@pytest.mark.parametrize("sizes", [[0, 5, 0, 300], [2000, 1, 4000], [0, 0], [7]])
def test_prefix_unique_inverse_matches_twin(sizes):
    rng = np.random.default_rng(len(sizes))
    parts = [rng.integers(0, 50 + 10 * n, n).astype(np.uint64) for n in sizes]
    parts[0][: min(3, len(parts[0]))] = np.uint64(2**63 + 5)  # high bits the prefix replaces
    ids = np.concatenate(parts)
    seg = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=seg[1:])
    prefixes = [3, 1, 3, 2][: len(sizes)]  # two slots of one feature group share a prefix
    d = pooling.Deduper()  # 1024 slots: grows mid-pass for the larger cases
    got_u, got_inv = d.prefix_unique_inverse(ids, seg, pooling.prefix_masks(prefixes, 8))
    want_u, want_inv = naive.prefix_unique_inverse(ids, seg, prefixes, 8)
    np.testing.assert_array_equal(got_u, want_u)
    np.testing.assert_array_equal(got_inv, want_inv)
    # the scratch is clean for the next call
    got_u2, _ = d.prefix_unique_inverse(ids, seg, pooling.prefix_masks(prefixes, 8))
    np.testing.assert_array_equal(got_u2, want_u)


def test_prefix_unique_inverse_rejects_bad_input():
    d = pooling.Deduper()
    ids = np.arange(4, dtype=np.uint64)
    masks = pooling.prefix_masks([1, 2], 8)
    with pytest.raises(BatchError, match="one prefix per slot"):
        d.prefix_unique_inverse(ids, np.array([0, 4]), masks)
    with pytest.raises(BatchError, match="seg_offsets must run from 0"):
        d.prefix_unique_inverse(ids, np.array([0, 1, 3]), masks)
    with pytest.raises(BatchError, match="dtype uint64"):
        d.prefix_unique_inverse(ids.astype(np.int64), np.array([0, 1, 4]), masks)


@pytest.mark.parametrize("dim", [1, 4, 16])
def test_onehot_pooling_matches_twin(dim):
    rng = np.random.default_rng(dim)
    n, m, u = 37, 5, 23
    inverse = rng.integers(0, u, n * m).astype(np.int32)
    emb = rng.standard_normal((u, dim)).astype(np.float32)
    out = np.full((n, m * dim), np.nan, dtype=np.float32)  # every entry is overwritten
    K.pool_onehot_forward_kernel(inverse, emb, out)
    np.testing.assert_array_equal(out, naive.pool_onehot_forward(inverse, emb, n))
    d_out = rng.standard_normal((n, m * dim)).astype(np.float32)
    d_out[3, 0] = np.inf
    grad = np.full((u + 4, dim), np.nan, dtype=np.float32)  # rows past u are left alone
    bad = K.pool_onehot_backward_kernel(inverse, d_out, grad, u)
    want, want_bad = naive.pool_onehot_backward(inverse, d_out, u, dim)
    np.testing.assert_array_equal(grad[:u], want)
    assert bad == want_bad == 1
    assert np.isnan(grad[u:]).all()


@pytest.mark.parametrize("modes", [["sum", "mean", "sqrt"], ["mean"]])
def test_slots_pooling_matches_per_slot_twins(modes):
    rng = np.random.default_rng(len(modes))
    n, dim, u = 29, 3, 17
    lengths = rng.integers(0, 5, (len(modes), n)).astype(np.int64)
    bounds = np.zeros(len(modes) + 1, dtype=np.int64)
    np.cumsum(lengths.sum(axis=1), out=bounds[1:])
    inverse = rng.integers(0, u, int(bounds[-1])).astype(np.int32)
    emb = rng.standard_normal((u, dim)).astype(np.float32)
    cols = np.arange(len(modes), dtype=np.int64)[::-1] * dim + 1  # any order, column 0 unused
    codes = np.array([{"sum": 0, "mean": 1, "sqrt": 2}[m] for m in modes], dtype=np.int64)
    width = 1 + len(modes) * dim
    out = np.zeros((n, width), dtype=np.float32)
    K.pool_slots_forward_kernel(
        lengths, inverse, bounds, cols, codes, emb, out, np.empty(dim, np.float32)
    )
    d_out = rng.standard_normal((n, width)).astype(np.float32)
    grad = np.zeros((u, dim), dtype=np.float32)
    K.pool_slots_backward_kernel(
        lengths, inverse, bounds, cols, codes, d_out, grad, np.empty(dim, np.float32)
    )
    want_grad = np.zeros((u, dim), dtype=np.float32)
    for p, mode in enumerate(modes):
        inv = inverse[bounds[p] : bounds[p + 1]]
        c = int(cols[p])
        want = naive.pool_forward(lengths[p], inv, emb, mode)
        np.testing.assert_array_equal(out[:, c : c + dim], want)
        naive._pool_backward_into(want_grad, lengths[p], inv, d_out[:, c : c + dim], mode)
    np.testing.assert_array_equal(grad, want_grad)


def test_group_by_shard_matches_twin():
    rng = np.random.default_rng(5)
    uniques = rng.integers(0, 2**63, 200).astype(np.uint64)
    shard = rng.integers(0, 3, 200).astype(np.int32)
    inverse = rng.integers(0, 200, 1000).astype(np.int32)
    out_u = np.empty_like(uniques)
    bounds = np.empty(4, dtype=np.int64)
    inv = inverse.copy()
    K.group_by_shard_kernel(uniques, shard, 3, inv, out_u, bounds)
    want_u, want_inv, want_bounds = naive.group_by_shard(uniques, shard, 3, inverse)
    np.testing.assert_array_equal(out_u, want_u)
    np.testing.assert_array_equal(inv, want_inv)
    np.testing.assert_array_equal(bounds, want_bounds)
    np.testing.assert_array_equal(out_u[inv], uniques[inverse])  # the same key for every ID


def test_count_nonfinite_matches_twin():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((50, 7)).astype(np.float32)
    g[3, 2], g[9, 0], g[9, 6], g[40, 5], g[49, 1] = np.nan, np.inf, -np.inf, -np.inf, np.nan
    assert K.count_nonfinite_kernel(g, 50) == naive.nonfinite_rows(g)[1] == 4
    assert K.count_nonfinite_kernel(g, 10) == naive.nonfinite_rows(g[:10])[1] == 2


# ------------------------------------------------------------------------- the whole worker
def _store(shards, dims):
    return ShardedStore(
        num_shards=shards,
        capacity=200_000,
        optimizer=Adagrad(lr=0.1),
        init=Uniform(-0.1, 0.1),
        admission=Admission(probability=1.0),
        seed=7,
        weight_bound=10.0,
        dims=dims,
    )


ONE_HOT = [SlotSpec(f"slot_{i}", 4, prefix=i + 1) for i in range(5)]
SHARED = [SlotSpec(f"slot_{i}", 4, prefix=1 + i // 2, group=f"g{i // 2}") for i in range(4)]
MIXED = [
    SlotSpec("slot_0", 4, pooling="mean", prefix=1),
    SlotSpec("slot_1", 8, pooling="sqrt", prefix=2),
    SlotSpec("slot_2", 4, pooling="raw", prefix=3, sample_fixed_size=2),
    SlotSpec("slot_3", 4, prefix=4, hash_stack_rounds=2, hash_stack_size=30),
    SlotSpec("slot_4", 4, prefix=1, group="g"),  # shares slot_0's prefix (a feature group)
    SlotSpec("slot_5", 8, prefix=5),
]


@pytest.mark.parametrize(
    ("slots", "ids_per_sample", "cards"),
    [
        (ONE_HOT, 1, (50, 1000, 7, 5000, 3)),
        (SHARED, 1, (20, 20, 300, 300)),  # one key in two one-hot slots of a group
        (ONE_HOT, [1, 3, 1, 1, 2], (50, 1000, 7, 5000, 3)),
        (MIXED, [2, 3, 4, 2, 1, 1], (40, 500, 90, 700, 40, 9)),
    ],
)
@pytest.mark.parametrize("shards", [1, 3])
def test_worker_matches_twin(slots, ids_per_sample, cards, shards):
    dims = sorted({s.dim for s in slots})
    worker = EmbeddingWorker(slots, 8, local_parameter_servers(_store(shards, dims)))
    twin_store = _store(shards, dims)
    twin = naive.Worker(slots, 8, twin_store)
    stream = SyntheticStream(cards, ids_per_sample=ids_per_sample, seed=4)
    names = stream.slot_names()
    rng = np.random.default_rng(0)
    for i in range(4):
        pb = stream.batch(i, 48).to_persia_batch(names)
        got = worker.forward(pb, True)
        summed, raw, layout, state = twin.forward(pb, True)
        np.testing.assert_array_equal(got.summed, summed)
        assert got.layout == layout and sorted(got.raw) == sorted(raw)
        for fi in raw:
            np.testing.assert_array_equal(got.raw[fi], raw[fi])
        grad = rng.standard_normal(summed.shape).astype(np.float32)
        grad[1, 0] = np.nan  # one non-finite gradient: counted and skipped alike
        raw_grads = {fi: rng.standard_normal(a.shape).astype(np.float32) for fi, a in raw.items()}
        np.testing.assert_array_equal(
            worker.backward(got, grad, raw_grads), twin.backward(state, grad, raw_grads)
        )
        assert worker.nonfinite_gradients == twin.nonfinite
    for a, b in zip(worker.servers.transport._roles["parameter-server"], twin_store.shards,
                    strict=True):  # fmt: skip
        for dim, rows in a.export_rows().items():
            want = b.export_rows()[dim]
            for k in ("keys", "values", "state"):
                np.testing.assert_array_equal(rows[k], want[k])
    pb = stream.batch(99, 48).to_persia_batch(names, requires_grad=False)
    np.testing.assert_array_equal(worker.forward(pb, False).summed, twin.forward(pb, False)[0])


def test_no_summed_gradient_applies_nothing_to_summed_slots():
    worker = EmbeddingWorker(ONE_HOT, 8, local_parameter_servers(_store(1, [4])))
    pb = (
        SyntheticStream((5, 6, 7, 8, 9), seed=1)
        .batch(0, 16)
        .to_persia_batch([s.name for s in ONE_HOT])
    )
    lookup = worker.forward(pb, True)
    assert lookup.groups[0].one_hot
    np.testing.assert_array_equal(worker.backward(lookup, None, {}), [0, 0, 0])


def test_bad_shapes_are_named():
    worker = EmbeddingWorker(ONE_HOT, 8, local_parameter_servers(_store(1, [4])))
    pb = (
        SyntheticStream((5, 6, 7, 8, 9), seed=1)
        .batch(0, 16)
        .to_persia_batch([s.name for s in ONE_HOT])
    )
    lookup = worker.forward(pb, True)
    with pytest.raises(BatchError, match=r"summed_grad must have shape \(16, 20\)"):
        worker.backward(lookup, np.zeros((16, 19), np.float32), {})

    class Broken:
        num_shards = 1

        def lookup(self, shard, keys, dim, training):
            return np.zeros((len(keys) + 1, dim), np.float32)

        def lookup_hinted(self, shard, keys, dim, training):
            return self.lookup(shard, keys, dim, training), None

    worker.servers = Broken()  # type: ignore[assignment]
    with pytest.raises(BackendError, match=r"parameter-server\[0\]: lookup of \d+ keys"):
        worker.forward(pb, True)
