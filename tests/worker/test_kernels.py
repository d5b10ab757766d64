"""The embedding worker's kernels against their naive twins (tests/naive_worker.py) and torch."""

from __future__ import annotations

import doctest

import naive_worker as naive
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import persia.worker.pooling
from persia.errors import BatchError, ConfigError
from persia.worker.pooling import (
    Deduper,
    add_prefix,
    nonfinite_rows,
    pool_backward,
    pool_forward,
    pool_raw_backward,
    pool_raw_forward,
    prefix_concat,
    unique_inverse,
)

MODES = ["sum", "mean", "sqrt"]


def _batch(rng: np.random.Generator, batch: int, max_len: int, num_rows: int, dim: int):
    """A random slot: lengths (with empty samples), inverse and unique rows."""
    lengths = rng.integers(0, max_len + 1, size=batch).astype(np.int64)
    lengths[rng.random(batch) < 0.2] = 0
    n = int(lengths.sum())
    inverse = rng.integers(0, max(num_rows, 1), size=n).astype(np.int32)
    emb = rng.standard_normal((num_rows, dim)).astype(np.float32)
    return lengths, inverse, emb


# ---------------------------------------------------------------------------------------------
# Prefixing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 12, 63])
def test_add_prefix_matches_twin(bits):
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 2**64, size=257, dtype=np.uint64)
    prefix = (1 << bits) - 1 if bits else 0
    got = add_prefix(ids, prefix, bits)
    np.testing.assert_array_equal(got, naive.add_prefix(ids, prefix, bits))
    if bits == 0:
        np.testing.assert_array_equal(got, ids)
    else:
        assert (got >> np.uint64(64 - bits) == np.uint64(prefix)).all()


def test_add_prefix_separates_slots():
    ids = np.arange(1000, dtype=np.uint64)
    a, b = add_prefix(ids, 1, 12), add_prefix(ids, 2, 12)
    assert not set(a.tolist()) & set(b.tolist())


@pytest.mark.parametrize(("prefix", "bits"), [(4096, 12), (-1, 12), (1, 0), (0, 64), (0, -1)])
def test_add_prefix_rejects_bad_settings(prefix, bits):
    with pytest.raises(ConfigError):
        add_prefix(np.zeros(3, np.uint64), prefix, bits)


def test_add_prefix_rejects_bad_ids():
    with pytest.raises(BatchError, match="uint64"):
        add_prefix(np.zeros(3, np.int64), 1, 12)


def test_prefix_concat():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 2**64, size=n, dtype=np.uint64) for n in (5, 0, 7)]
    keys, seg = prefix_concat(parts, [3, 4, 3], 8)
    np.testing.assert_array_equal(seg, [0, 5, 5, 12])
    want = np.concatenate(
        [naive.add_prefix(p, x, 8) for p, x in zip(parts, [3, 4, 3], strict=True)]
    )
    np.testing.assert_array_equal(keys, want)
    with pytest.raises(BatchError, match="prefixes"):
        prefix_concat(parts, [1, 2], 8)


# ---------------------------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------------------------


def _zipf_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.zipf(1.2, size=n) % 100_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)


@pytest.mark.parametrize(
    "keys",
    [
        np.zeros(0, np.uint64),
        np.full(1000, 42, np.uint64),
        np.array([0, 2**64 - 1, 0, 1, 2**64 - 1], np.uint64),
        np.arange(5000, dtype=np.uint64) << np.uint64(40),  # low bits all equal
        _zipf_ids(np.random.default_rng(1), 20_000),
        np.random.default_rng(2).integers(0, 2**64, size=3000, dtype=np.uint64),
    ],
    ids=["empty", "all-duplicates", "extremes", "high-bits-only", "zipf", "random"],
)
def test_unique_inverse_matches_twin(keys):
    uniques, inverse = unique_inverse(keys)
    want_u, want_inv = naive.unique_inverse(keys)
    assert uniques.dtype == np.uint64 and inverse.dtype == np.int32
    np.testing.assert_array_equal(uniques, want_u)
    np.testing.assert_array_equal(inverse, want_inv)
    np.testing.assert_array_equal(uniques[inverse], keys)


def test_deduper_reuse_across_sizes():
    """Tables sized from the last call, grown mid-pass (rehash), shrunk after a big batch."""
    rng = np.random.default_rng(3)
    dedup = Deduper()
    for n in [10, 5000, 3, 0, 20_000, 100, 50_000, 7]:
        keys = rng.integers(0, n // 2 + 2, size=n).astype(np.uint64)
        uniques, inverse = dedup.unique_inverse(keys)
        want_u, want_inv = naive.unique_inverse(keys)
        np.testing.assert_array_equal(uniques, want_u)
        np.testing.assert_array_equal(inverse, want_inv)
        assert dedup.table_slots * 0.7 >= len(uniques)
        assert (dedup._table == -1).all()  # cleared for the next call
    assert dedup.table_slots == 1024  # back to the minimum after the last, tiny batch


def test_deduper_grows_mid_pass_all_distinct():
    keys = np.random.default_rng(11).integers(0, 2**64, size=30_000, dtype=np.uint64)
    dedup = Deduper()
    uniques, inverse = dedup.unique_inverse(keys)
    np.testing.assert_array_equal(uniques, keys)
    np.testing.assert_array_equal(inverse, np.arange(30_000))
    assert dedup.table_slots == 1 << 16  # 30k keys need 2^16 slots at load <= 0.7


def test_deduper_results_do_not_alias_scratch():
    dedup = Deduper()
    u1, _ = dedup.unique_inverse(np.array([1, 2, 3], np.uint64))
    dedup.unique_inverse(np.array([7, 8, 9], np.uint64))
    np.testing.assert_array_equal(u1, [1, 2, 3])


def test_unique_inverse_segments():
    rng = np.random.default_rng(4)
    parts = [rng.integers(0, 50, size=n).astype(np.uint64) for n in (100, 0, 80, 60)]
    # slots 0 and 2 share a prefix (one feature group): keys may repeat across them
    keys, seg = prefix_concat(parts, [1, 2, 1, 3], 12)
    uniques, inverse, uoff = Deduper().unique_inverse_segments(keys, seg)
    big = np.random.default_rng(12).integers(0, 2**64, size=5000, dtype=np.uint64)
    # a segment that makes the table grow in its middle
    keys2 = np.concatenate([keys, big, keys[:50]])
    seg2 = np.array([*seg.tolist(), seg[-1] + 5000, seg[-1] + 5050], np.int64)
    u2, inv2, uoff2 = Deduper().unique_inverse_segments(keys2, seg2)
    np.testing.assert_array_equal(u2, naive.unique_inverse(keys2)[0])
    np.testing.assert_array_equal(inv2, naive.unique_inverse(keys2)[1])
    np.testing.assert_array_equal(uoff2[:5], uoff)
    assert uoff2[5] == len(uniques) + 5000 and uoff2[6] == uoff2[5]
    want_u, want_inv = naive.unique_inverse(keys)
    np.testing.assert_array_equal(uniques, want_u)
    np.testing.assert_array_equal(inverse, want_inv)
    assert uoff[0] == 0 and uoff[-1] == len(uniques)
    for s in range(4):
        first_seen = naive.unique_inverse(keys[: seg[s + 1]])[0]
        assert uoff[s + 1] == len(first_seen)
    # slot 2 re-uses keys of slot 0 (same prefix): its new uniques are only the unseen ones
    seen0 = set(keys[seg[0] : seg[1]].tolist())
    new2 = set(uniques[uoff[2] : uoff[3]].tolist())
    assert not new2 & seen0


def test_unique_inverse_segments_bad_offsets():
    keys = np.arange(10, dtype=np.uint64)
    dedup = Deduper()
    for seg in ([0, 5], [1, 10], [0, 6, 5, 10]):
        with pytest.raises(BatchError, match="seg_offsets"):
            dedup.unique_inverse_segments(keys, np.array(seg, np.int64))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=200), st.integers(0, 3))
def test_unique_inverse_hypothesis(values, repeat):
    keys = np.array(values * (repeat + 1), dtype=np.uint64)
    uniques, inverse = unique_inverse(keys)
    want_u, want_inv = naive.unique_inverse(keys)
    np.testing.assert_array_equal(uniques, want_u)
    np.testing.assert_array_equal(inverse, want_inv)


# ---------------------------------------------------------------------------------------------
# Pooling forward and backward against the twins
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 8, 16])
@pytest.mark.parametrize("mode", MODES)
def test_pool_forward_matches_twin(mode, dim):
    rng = np.random.default_rng(dim)
    lengths, inverse, emb = _batch(rng, batch=64, max_len=9, num_rows=40, dim=dim)
    got = pool_forward(lengths, inverse, emb, mode)
    np.testing.assert_array_equal(got, naive.pool_forward(lengths, inverse, emb, mode))
    assert (got[lengths == 0] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_pool_forward_into_column_range(mode):
    rng = np.random.default_rng(5)
    la, ia, ea = _batch(rng, 32, 5, 20, 8)
    lb, ib, eb = _batch(rng, 32, 5, 20, 3)
    out = np.full((32, 11), np.nan, dtype=np.float32)  # uninitialised memory stand-in
    pool_forward(la, ia, ea, mode, out=out, col=0)
    pool_forward(lb, ib, eb, "sum", out=out, col=8)
    np.testing.assert_array_equal(out[:, :8], naive.pool_forward(la, ia, ea, mode))
    np.testing.assert_array_equal(out[:, 8:], naive.pool_forward(lb, ib, eb, "sum"))


@pytest.mark.parametrize("dim", [1, 8, 16])
@pytest.mark.parametrize("mode", MODES)
def test_pool_backward_matches_twin(mode, dim):
    rng = np.random.default_rng(10 + dim)
    lengths, inverse, emb = _batch(rng, batch=64, max_len=9, num_rows=40, dim=dim)
    d_out = rng.standard_normal((64, dim)).astype(np.float32)
    got = pool_backward(lengths, inverse, d_out, mode, num_uniques=40)
    np.testing.assert_array_equal(got, naive.pool_backward(lengths, inverse, d_out, 40, mode))


def test_pool_backward_column_range_and_accumulation():
    rng = np.random.default_rng(6)
    lengths, inverse, _ = _batch(rng, 16, 4, 10, 4)
    d_full = rng.standard_normal((16, 12)).astype(np.float32)
    got = pool_backward(lengths, inverse, d_full, "mean", num_uniques=10, col=4, dim=4)
    want = naive.pool_backward(lengths, inverse, d_full[:, 4:8].copy(), 10, "mean")
    np.testing.assert_array_equal(got, want)
    # adding a second slot's gradient into the same array (slots sharing uniques)
    acc = got.copy()
    pool_backward(lengths, inverse, d_full, "sum", col=8, out=acc)
    want2 = want + naive.pool_backward(lengths, inverse, d_full[:, 8:].copy(), 10, "sum")
    np.testing.assert_allclose(acc, want2, rtol=1e-6, atol=1e-6)  # another addition order


@pytest.mark.parametrize("mode", MODES)
def test_pool_empty_batch_and_empty_samples(mode):
    emb = np.ones((3, 4), np.float32)
    empty = np.zeros(0, np.int32)
    out = pool_forward(np.zeros(0, np.int64), empty, emb, mode)
    assert out.shape == (0, 4)
    out = pool_forward(np.zeros(5, np.int32), empty, emb, mode)
    np.testing.assert_array_equal(out, np.zeros((5, 4), np.float32))
    grad = pool_backward(
        np.zeros(5, np.int32), empty, np.ones((5, 4), np.float32), mode, num_uniques=3
    )
    np.testing.assert_array_equal(grad, np.zeros((3, 4), np.float32))


def test_pool_all_duplicates():
    lengths = np.array([4, 0, 2], np.int64)
    inverse = np.zeros(6, np.int32)
    emb = np.array([[1.0, -2.0]], np.float32)
    np.testing.assert_array_equal(
        pool_forward(lengths, inverse, emb, "sum"), [[4, -8], [0, 0], [2, -4]]
    )
    np.testing.assert_array_equal(
        pool_forward(lengths, inverse, emb, "sqrt"),
        [[2, -4], [0, 0], naive.pool_forward(lengths, inverse, emb, "sqrt")[2]],
    )
    d_out = np.array([[1, 1], [5, 5], [2, 2]], np.float32)
    np.testing.assert_array_equal(
        pool_backward(lengths, inverse, d_out, "mean", num_uniques=1), [[3.0, 3.0]]
    )  # 4 * (1/4) + 2 * (2/2): each occurrence gets d_out[b] / n_b


@pytest.mark.parametrize("dim", [1, 8, 16])
@pytest.mark.parametrize("size", [1, 3, 12])
def test_pool_raw_matches_twin(size, dim):
    rng = np.random.default_rng(size * 100 + dim)
    lengths, inverse, emb = _batch(rng, batch=40, max_len=8, num_rows=30, dim=dim)
    out, dropped = pool_raw_forward(lengths, inverse, emb, size)
    want, want_dropped = naive.pool_raw_forward(lengths, inverse, emb, size)
    np.testing.assert_array_equal(out, want)
    assert dropped == want_dropped == int(np.maximum(lengths - size, 0).sum())
    np.testing.assert_array_equal(out[:, :, dim].sum(axis=1), np.minimum(lengths, size))
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    grad = pool_raw_backward(lengths, inverse, d_out, num_uniques=30)
    np.testing.assert_array_equal(grad, naive.pool_raw_backward(lengths, inverse, d_out, 30))


def test_pool_raw_overflow_drops_gradient():
    lengths = np.array([3], np.int64)
    inverse = np.array([0, 1, 2], np.int32)
    emb = np.eye(3, dtype=np.float32)
    out, dropped = pool_raw_forward(lengths, inverse, emb, 2)
    assert dropped == 1
    np.testing.assert_array_equal(out[0], [[1, 0, 0, 1], [0, 1, 0, 1]])
    d_out = np.ones((1, 2, 4), np.float32) * 7  # the mask channel's gradient (7) is ignored
    grad = pool_raw_backward(lengths, inverse, d_out, num_uniques=3)
    np.testing.assert_array_equal(grad, [[7, 7, 7], [7, 7, 7], [0, 0, 0]])


def test_nonfinite_rows():
    g = np.zeros((5, 3), np.float32)
    g[1, 2] = np.nan
    g[3, 0] = np.inf
    g[4, 1] = -np.inf
    bad, count = nonfinite_rows(g)
    want, want_count = naive.nonfinite_rows(g)
    np.testing.assert_array_equal(bad, want)
    assert count == want_count == 3
    bad, count = nonfinite_rows(np.zeros((0, 4), np.float32))
    assert count == 0 and bad.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Against torch's EmbeddingBag autograd
# ---------------------------------------------------------------------------------------------


def _torch_bag(lengths, inverse, emb, d_out, mode):
    bag = torch.nn.EmbeddingBag(emb.shape[0], emb.shape[1], mode=mode)
    with torch.no_grad():
        bag.weight.copy_(torch.from_numpy(emb))
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
    out = bag(torch.from_numpy(inverse.astype(np.int64)), offsets)
    out.backward(torch.from_numpy(d_out))
    return out.detach().numpy(), bag.weight.grad.numpy()


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_against_torch_embedding_bag(mode):
    rng = np.random.default_rng(7)
    lengths, inverse, emb = _batch(rng, batch=50, max_len=7, num_rows=25, dim=8)
    d_out = rng.standard_normal((50, 8)).astype(np.float32)
    t_out, t_grad = _torch_bag(lengths, inverse, emb, d_out, mode)
    out = pool_forward(lengths, inverse, emb, mode)
    grad = pool_backward(lengths, inverse, d_out, mode, num_uniques=25)
    np.testing.assert_allclose(out, t_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_against_torch_embedding_bag_exact(mode):
    """Dyadic values and power-of-two bag sizes: every sum is exact, in any order."""
    rng = np.random.default_rng(8)
    lengths = rng.choice([0, 1, 2, 4, 8], size=60).astype(np.int64)
    inverse = rng.integers(0, 20, size=int(lengths.sum())).astype(np.int32)
    emb = (rng.integers(-64, 64, size=(20, 16)) / 16).astype(np.float32)
    d_out = (rng.integers(-64, 64, size=(60, 16)) / 16).astype(np.float32)
    t_out, t_grad = _torch_bag(lengths, inverse, emb, d_out, mode)
    np.testing.assert_array_equal(pool_forward(lengths, inverse, emb, mode), t_out)
    np.testing.assert_array_equal(
        pool_backward(lengths, inverse, d_out, mode, num_uniques=20), t_grad
    )


def test_end_to_end_dedup_then_pool_matches_bag_over_raw_ids():
    """De-duplicate, pool over unique rows == EmbeddingBag over the full table by raw ID."""
    rng = np.random.default_rng(9)
    table = rng.standard_normal((100, 4)).astype(np.float32)
    lengths = rng.integers(0, 6, size=30).astype(np.int64)
    ids = rng.integers(0, 100, size=int(lengths.sum())).astype(np.uint64)
    uniques, inverse = unique_inverse(ids)
    rows = table[uniques.astype(np.int64)]
    d_out = rng.standard_normal((30, 4)).astype(np.float32)
    out = pool_forward(lengths, inverse, rows, "mean")
    grad_u = pool_backward(lengths, inverse, d_out, "mean", num_uniques=len(uniques))
    t_out, t_grad = _torch_bag(lengths, ids.astype(np.int32), table, d_out, "mean")
    np.testing.assert_allclose(out, t_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_u, t_grad[uniques.astype(np.int64)], rtol=1e-6, atol=1e-6)
    untouched = np.setdiff1d(np.arange(100), uniques.astype(np.int64))
    assert (t_grad[untouched] == 0).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_pooling_input():
    lengths = np.array([2, 1], np.int64)
    inverse = np.array([0, 1, 1], np.int32)
    emb = np.ones((2, 4), np.float32)
    with pytest.raises(BatchError, match="mode"):
        pool_forward(lengths, inverse, emb, "max")  # type: ignore[arg-type]
    with pytest.raises(BatchError, match="sum\\(lengths\\)"):
        pool_forward(np.array([2, 2]), inverse, emb)
    with pytest.raises(BatchError, match="lengths must be >= 0"):
        pool_forward(np.array([4, -1]), inverse, emb)
    with pytest.raises(BatchError, match="inverse values must be in \\[0, 2\\), got 5"):
        pool_forward(lengths, np.array([0, 5, 1], np.int32), emb)
    with pytest.raises(BatchError, match="int32"):
        pool_forward(lengths, inverse.astype(np.int64), emb)
    with pytest.raises(BatchError, match="float32"):
        pool_forward(lengths, inverse, emb.astype(np.float64))
    with pytest.raises(BatchError, match="dim must be > 0, got 0"):
        pool_forward(lengths, inverse, np.ones((2, 0), np.float32))
    with pytest.raises(BatchError, match="columns"):
        pool_forward(lengths, inverse, emb, out=np.empty((2, 6), np.float32), col=3)
    with pytest.raises(BatchError, match="batch size"):
        pool_forward(lengths, inverse, emb, out=np.empty((3, 4), np.float32))
    with pytest.raises(BatchError, match="num_uniques or out"):
        pool_backward(lengths, inverse, np.ones((2, 4), np.float32))
    with pytest.raises(BatchError, match="sample_fixed_size must be > 0"):
        pool_raw_forward(lengths, inverse, emb, 0)
    with pytest.raises(BatchError, match="inverse values"):
        pool_raw_backward(lengths, inverse, np.ones((2, 3, 5), np.float32), num_uniques=1)


def test_module_docstring_example_runs():
    result = doctest.testmod(persia.worker.pooling, raise_on_error=False)
    assert result.attempted >= 8 and result.failed == 0
