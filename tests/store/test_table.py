"""EmbeddingTable and its kernels against the plain-Python twins in tests/naive.py."""

from __future__ import annotations

import math

import naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import persia  # noqa: F401  (sets numba's cache folder)
from persia.embedding.optim import SGD, Adagrad, Adam
from persia.errors import ConfigError, StoreError
from persia.store.config import Admission, Normal, Uniform
from persia.store.kernels import table as K
from persia.store.table import EmbeddingTable

MARKERS = [
    0,
    1,
    2**64 - 1,
    2**63,
    2**32 - 1,
    int(K.PROBE_SALT),
    int(K.SHARD_SALT),
    int(K.INIT_SALT),
    int(K.ADMIT_SALT),
    int(K.SKETCH_SALT),
    0xFFFFFFFF00000000,
]


def u64(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def pair(capacity=8, dim=4, optimizer=None, admission=None, seed=3, init=None):
    optimizer = optimizer or naive.NaiveSGD(0.5)
    admission = admission or Admission()
    init = init or Uniform(-0.5, 0.5)
    kind = ("uniform", init.low, init.high) if isinstance(init, Uniform) else None
    if kind is None:
        kind = ("normal", init.mean, init.std)
    t = EmbeddingTable(dim, capacity, optimizer, init, admission, seed)
    n = naive.NaiveTable(
        dim,
        capacity,
        optimizer,
        kind,
        seed,
        admission.probability,
        admission.min_count,
        (admission.sketch_depth, admission.sketch_width),
    )
    return t, n


def same_export(t: EmbeddingTable, n: naive.NaiveTable) -> None:
    a, b = t.export_rows(), n.export_rows()
    for k in ("keys", "values", "state"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------ kernels
def test_shard_of_matches_twin_and_spreads():
    rng = np.random.default_rng(0)
    keys = np.concatenate([u64(MARKERS), rng.integers(0, 2**64 - 1, 500, dtype=np.uint64)])
    for n in (1, 3, 8, 1000):
        out = np.empty(len(keys), np.int32)
        K.shard_of_kernel(keys, n, out)
        assert out.tolist() == [naive.shard_of(int(k), n) for k in keys]
    # keys routed to shard 0 of 4 still use every part of a 64-slot index
    many = rng.integers(0, 2**64 - 1, 20000, dtype=np.uint64)
    out = np.empty(len(many), np.int32)
    K.shard_of_kernel(many, 4, out)
    homes = {naive.home_slot(int(k), 64) for k in many[out == 0][:2000]}
    assert len(homes) == 64


def test_init_row_matches_twin():
    rng = np.random.default_rng(1)
    keys = np.concatenate([u64(MARKERS), rng.integers(0, 2**64 - 1, 50, dtype=np.uint64)])
    values = np.zeros((len(keys), 7), np.float32)
    for seed in (0, 12345):
        for i, k in enumerate(keys):
            K.init_row(values, i, k, np.uint64(seed), K.INIT_UNIFORM, -0.25, 0.75)
            np.testing.assert_array_equal(
                values[i], naive.init_row(int(k), seed, 7, "uniform", -0.25, 0.75)
            )
            K.init_row(values, i, k, np.uint64(seed), K.INIT_NORMAL, 1.0, 0.5)
            np.testing.assert_allclose(
                values[i], naive.init_row(int(k), seed, 7, "normal", 1.0, 0.5), rtol=1e-6
            )


def test_init_distributions():
    keys = np.arange(4000, dtype=np.uint64)
    values = np.zeros((len(keys), 8), np.float32)
    for i, k in enumerate(keys):
        K.init_row(values, i, k, np.uint64(0), K.INIT_UNIFORM, -1.0, 1.0)
    assert values.min() >= -1.0 and values.max() < 1.0
    assert abs(values.mean()) < 0.02 and abs(values.var() - 1 / 3) < 0.02
    for i, k in enumerate(keys):
        K.init_row(values, i, k, np.uint64(0), K.INIT_NORMAL, 2.0, 3.0)
    assert abs(values.mean() - 2.0) < 0.1 and abs(values.std() - 3.0) < 0.1


def test_sketch_and_admit_draw_match_twin():
    keys = np.array([5, 5, 7, 2**64 - 1, 5, 0, 7, 5] * 3, dtype=np.uint64)
    sketch = np.zeros((3, 16), np.uint32)
    out = np.zeros(len(keys), np.int64)
    K.sketch_add_kernel(sketch, keys, out)
    twin = naive.NaiveSketch(3, 16)
    assert out.tolist() == [twin.add(int(k)) for k in keys]
    np.testing.assert_array_equal(sketch, twin.counts)
    for k in MARKERS:
        for c in (1, 2, 1000):
            assert K.admit_draw(np.uint64(k), np.uint64(9), c) == naive.admit_draw(k, 9, c)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=11, unique=True), st.data())
def test_delete_slot_matches_twin(keys, data):
    """Backward-shift deletion on a crowded 16-slot index, against the twin, exactly."""
    row_keys = u64(keys)
    index = np.full(16, K.EMPTY, np.uint64)
    shift = np.uint64(60)
    K.rebuild_index_kernel(index, shift, row_keys, len(keys))
    twin = naive.NaiveIndex(16)
    for r, k in enumerate(keys):
        twin.insert(k, r)
    assert index.tolist() == twin.slots
    order = data.draw(st.permutations(list(range(len(keys)))))
    for r in order:
        slot = [e & 0xFFFFFFFF for e in index.tolist()].index(r)
        K.delete_slot(index, shift, row_keys, slot)
        twin.delete(row_keys, keys[r])
        assert index.tolist() == twin.slots
        rows = np.empty(len(keys), np.int32)
        K.probe_kernel(index, shift, row_keys, row_keys, rows)
        assert rows.tolist() == [twin.find(row_keys, k) for k in keys]


def test_tag_collisions_are_confirmed_by_key():
    """Keys whose probe hashes share the 32-bit tag (and home slots) are told apart by their
    keys in every operation; an absent key with a present key's tag is absent."""
    tag = 0x5EED5EED
    # home slot = top bits, tag = low 32 bits; the middle bits tell the keys apart
    # 6 present, 4 absent; home 15 wraps around to slot 0
    homes = [(3, 1), (3, 2), (3, 3), (4, 1), (15, 1), (15, 2), (3, 4), (4, 2), (15, 3), (0, 1)]
    keys = [naive.key_with_probe_hash((top << 60) | (mid << 32) | tag) for top, mid in homes]
    assert all(naive.fmix64(k ^ int(K.PROBE_SALT)) & 0xFFFFFFFF == tag for k in keys)
    present, absent = u64(keys[:6]), u64(keys[6:])
    t, n = pair(capacity=6, dim=2)
    assert t.index.shape[0] == 16  # home = top 4 bits: the chosen tops collide
    np.testing.assert_array_equal(t.lookup(present, True), n.lookup(present, True))
    np.testing.assert_array_equal(t.lookup(absent, False), np.zeros((4, 2), np.float32))
    np.testing.assert_array_equal(t.lookup(present[::-1], False), n.lookup(present[::-1], False))
    assert (t.probe(absent) == -1).all()
    assert sorted(t.probe(present).tolist()) == list(range(6))
    g = np.full((10, 2), 0.25, np.float32)
    both = np.concatenate([present, absent])
    assert t.apply_gradients(both, g).tolist() == n.apply_gradients(both, g).tolist()
    t.lookup(absent, True)  # evicts the 4 oldest (same home and tag as the new keys)
    n.lookup(absent, True)
    same_export(t, n)
    everything = np.concatenate([present, absent])
    np.testing.assert_array_equal(t.lookup(everything, False), n.lookup(everything, False))


# ------------------------------------------------------------------------------------ table
@pytest.mark.parametrize(
    "admission",
    [
        Admission(),
        Admission(probability=0.5, sketch_width=64),
        Admission(min_count=3, sketch_width=16, sketch_depth=2),
    ],
)
def test_random_sequence_matches_twin(admission):
    t, n = pair(capacity=40, dim=3, admission=admission)
    rng = np.random.default_rng(7)
    universe = np.concatenate([u64(MARKERS), np.arange(100, 200, dtype=np.uint64)])
    for step in range(150):
        keys = universe[rng.integers(0, len(universe), rng.integers(0, 25))]
        training = bool(rng.integers(0, 3))
        np.testing.assert_array_equal(t.lookup(keys, training), n.lookup(keys, training))
        grads = rng.normal(size=(len(keys), 3)).astype(np.float32)
        if step % 7 == 0 and len(keys):
            grads[0, 1] = np.nan
        np.testing.assert_array_equal(
            t.apply_gradients(keys, grads), n.apply_gradients(keys, grads)
        )
    same_export(t, n)
    s = t.stats()
    for k, v in n.counts.items():
        assert s[k] == v, k
    assert s["rows"] == len(n.rows)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["train", "eval", "grad", "shrink"]),
            st.lists(st.sampled_from(MARKERS + list(range(2, 14))), max_size=12),
        ),
        max_size=25,
    ),
    st.integers(1, 9),
)
def test_operation_sequences_match_dict_lru_model(ops, capacity):
    t, n = pair(capacity=capacity, dim=2)
    for op, keys in ops:
        k = u64(keys)
        if op in ("train", "eval"):
            np.testing.assert_array_equal(t.lookup(k, op == "train"), n.lookup(k, op == "train"))
        elif op == "grad":
            g = np.linspace(-1, 1, 2 * len(keys), dtype=np.float32).reshape(len(keys), 2)
            np.testing.assert_array_equal(t.apply_gradients(k, g), n.apply_gradients(k, g))
        else:
            cap = max(1, len(keys))
            t.set_capacity(cap)
            n.set_capacity(cap)
        same_export(t, n)
        assert t.rows <= t.capacity
        assert t.values.shape[0] <= t.capacity


def test_init_is_deterministic_after_eviction_and_across_tables():
    t, _ = pair(capacity=2, dim=5, seed=11)
    first = t.lookup(u64([42]), True)
    t.lookup(u64([1, 2, 3]), True)  # evicts 42
    assert t.stats()["evictions"] >= 1
    np.testing.assert_array_equal(t.lookup(u64([42]), True), first)
    other = EmbeddingTable(5, 1000, naive.NaiveSGD(), Uniform(-0.5, 0.5), seed=11)
    np.testing.assert_array_equal(other.lookup(u64([7, 42]), True)[1], first[0])
    reseeded = EmbeddingTable(5, 1000, naive.NaiveSGD(), Uniform(-0.5, 0.5), seed=12)
    assert not np.array_equal(reseeded.lookup(u64([42]), True), first)


def test_admission_frequency_threshold():
    t, _ = pair(admission=Admission(min_count=3, sketch_width=1024))
    key = u64([99])
    assert not t.lookup(key, True).any()
    assert not t.lookup(key, True).any()
    assert t.rows == 0
    assert t.lookup(key, True).any()  # third miss: created
    assert t.rows == 1
    s = t.stats()
    assert (s["rejections"], s["admissions"], s["misses"]) == (2, 1, 3)
    assert not t.lookup(u64([5]), False).any()  # evaluation misses are not counted in the sketch


def test_admission_probability_reproducible_and_later_admission():
    adm = Admission(probability=0.3, sketch_width=1 << 12)
    keys = np.arange(1000, dtype=np.uint64)
    a, _ = pair(capacity=5000, admission=adm)
    b, _ = pair(capacity=5000, admission=adm)
    np.testing.assert_array_equal(a.lookup(keys, True), b.lookup(keys, True))
    assert 200 < a.rows < 400
    for _ in range(6):
        a.lookup(keys, True)
    assert a.rows > 800  # rejected keys get new draws
    none, _ = pair(admission=Admission(probability=0.0, sketch_width=16))
    assert not none.lookup(keys[:20], True).any() and none.rows == 0


def test_nonfinite_and_absent_gradients_keep_alignment():
    t, _ = pair(capacity=10, dim=2, optimizer=naive.NaiveSGD(1.0))
    t.lookup(u64([1, 2, 3]), True)
    before = t.lookup(u64([1, 2, 3]), False)
    grads = np.array([[1, 1], [np.inf, 0], [5, 5], [2, 2]], np.float32)
    counts = t.apply_gradients(u64([1, 2, 77, 3]), grads)
    assert counts.tolist() == [2, 1, 1]
    after = t.lookup(u64([1, 2, 3]), False)
    np.testing.assert_array_equal(after[0], before[0] - 1)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[2], before[2] - 2)
    s = t.stats()
    assert (s["applied"], s["skipped_absent"], s["skipped_nonfinite"]) == (2, 1, 1)
    assert t.rows == 3  # nothing created


@pytest.mark.parametrize(
    "optimizer", [SGD(lr=0.1), Adagrad(lr=0.1), Adagrad(vectorwise_shared=True), Adam()]
)
def test_real_optimizers_rows_and_state(optimizer):
    t = EmbeddingTable(4, 100, optimizer)
    keys = u64([3, 1, 2**64 - 1])
    v0 = t.lookup(keys, True)
    assert t.state.shape[1] == optimizer.state_width(4)
    exp = t.export_rows()
    np.testing.assert_array_equal(exp["state"], np.tile(optimizer.initial_state(4), (3, 1)))
    grads = np.ones((3, 4), np.float32)
    assert t.apply_gradients(keys, grads).tolist() == [3, 0, 0]
    assert (t.lookup(keys, False) < v0).all()


def test_export_import_round_trip_keeps_lru_order():
    t, _ = pair(capacity=6, dim=3, optimizer=Adagrad(lr=0.1))
    t.lookup(u64([5, 6, 7, 8]), True)
    t.apply_gradients(u64([6, 8]), np.ones((2, 3), np.float32))
    t.lookup(u64([5]), True)
    exp = t.export_rows()
    assert exp["keys"].tolist() == [6, 7, 8, 5]
    u = EmbeddingTable(3, 6, Adagrad(lr=0.1))
    u.import_rows(exp["keys"], exp["values"], exp["state"])
    for k, v in u.export_rows().items():
        np.testing.assert_array_equal(v, exp[k])
    # importing past capacity evicts the oldest; default state is the initial one
    small = EmbeddingTable(3, 2, Adagrad(lr=0.1))
    small.import_rows(exp["keys"], exp["values"])
    got = small.export_rows()
    assert got["keys"].tolist() == [8, 5]
    np.testing.assert_array_equal(got["state"], np.full((2, 3), 0.01, np.float32))


def test_growth_is_bounded():
    t = EmbeddingTable(2, 10_000, naive.NaiveSGD())
    for start in range(0, 3000, 100):
        rows_before = t.rows
        t.lookup(np.arange(start, start + 100, dtype=np.uint64), True)
        alloc = t.values.shape[0]
        assert alloc <= max(16, math.ceil(1.5 * max(t.rows, rows_before)) + 1)
        assert t.index.shape[0] >= alloc / 0.7
    assert t.rows == 3000
    t.lookup(np.arange(3000, dtype=np.uint64), False)  # all still found
    assert t.stats()["misses"] == 3000


def test_bytes_per_row_at_capacity_dim16_adagrad():
    cap = 100_000
    t = EmbeddingTable(16, cap, Adagrad())
    t.reserve(cap)
    assert t.bytes_used / cap <= 176
    assert t.values.shape[0] == cap


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "keys, message",
    [
        (np.array([1.0, 2.0]), "keys must have dtype uint64, got float64"),
        (np.array([[1, 2]], np.uint64), "keys must be 1-D"),
        (np.array([1, -2], np.int64), "negative value -2"),
        ([1, 2], "keys must be a numpy array"),
        (np.array([True]), "keys must have dtype uint64, got bool"),
    ],
)
def test_bad_keys(keys, message):
    t, _ = pair()
    with pytest.raises(StoreError, match=message):
        t.lookup(keys, True)
    assert t.lookup(np.array([1, 2], np.int64), True).shape == (2, 4)  # safe ints converted
    assert t.lookup(np.array([1, 2], np.uint32), False).any()


@pytest.mark.parametrize(
    "grads, message",
    [
        (np.zeros((2, 3), np.float32), r"grads must have shape \(2, 4\)"),
        (np.zeros((2,), np.float32), r"grads must have shape"),
        (np.zeros((2, 4), np.int32), "grads must have dtype float32, got int32"),
        ("x", "grads must be a numpy array"),
    ],
)
def test_bad_grads(grads, message):
    t, _ = pair()
    t.lookup(u64([1, 2]), True)
    with pytest.raises(StoreError, match=message):
        t.apply_gradients(u64([1, 2]), grads)
    assert t.apply_gradients(u64([1, 2]), np.ones((2, 4), np.float64)).tolist() == [2, 0, 0]


def test_bad_construction():
    with pytest.raises(StoreError, match="dim must be an int > 0, got 0"):
        EmbeddingTable(0, 10, naive.NaiveSGD())
    with pytest.raises(StoreError, match="capacity must be an int > 0, got 0"):
        EmbeddingTable(4, 0, naive.NaiveSGD())
    with pytest.raises(StoreError, match="capacity must be an int > 0, got -1"):
        EmbeddingTable(4, -1, naive.NaiveSGD())
    with pytest.raises(StoreError, match="init must be Uniform or Normal"):
        EmbeddingTable(4, 10, naive.NaiveSGD(), init="uniform")  # type: ignore[arg-type]


def test_config_validation_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        Admission(probability=1.5, min_count=-1, sketch_width=100, sketch_depth=0)
    assert len(e.value.problems) == 4
    with pytest.raises(ConfigError, match="low must be < high"):
        Uniform(1.0, 1.0)
    with pytest.raises(ConfigError, match="std must be a finite number > 0, got 0"):
        Normal(std=0)
    with pytest.raises(ConfigError, match="Uniform.low must be a finite number"):
        Uniform(float("nan"), 1.0)


def test_normal_init_table_matches_twin():
    t, n = pair(init=Normal(0.5, 2.0), dim=6)
    keys = u64(MARKERS)
    np.testing.assert_allclose(t.lookup(keys, True), n.lookup(keys, True), rtol=1e-6)


@pytest.mark.parametrize("admission", [Admission(), Admission(probability=0.5, sketch_width=64)])
def test_two_training_paths_match_twin(admission):
    """``lookup(training=True)`` (probe and refresh in one kernel) and ``probe`` then
    ``train_lookup`` (the shard's path when several dims are held) give the twin's rows, LRU
    order and counters, with growth and eviction."""
    fused, n = pair(capacity=60, dim=3, admission=admission)
    split, _ = pair(capacity=60, dim=3, admission=admission)
    rng = np.random.default_rng(11)
    universe = np.concatenate([u64(MARKERS), np.arange(100, 190, dtype=np.uint64)])
    for _ in range(120):
        keys = universe[rng.integers(0, len(universe), rng.integers(0, 40))]
        want = n.lookup(keys, True)
        np.testing.assert_array_equal(fused.lookup(keys, True), want)
        np.testing.assert_array_equal(split.train_lookup(keys, split.probe(keys)), want)
    same_export(fused, n)
    same_export(split, n)
    assert fused.stats() == split.stats()
    assert fused.stats()["evictions"] > 0


def test_row_arrays_are_aligned_records_and_pickle():
    import pickle

    t = EmbeddingTable(16, 1000, Adagrad())
    t.lookup(np.arange(500, dtype=np.uint64), True)  # grows several times
    for name in ("values", "state", "row_keys", "index"):
        assert getattr(t, name).ctypes.data % 64 == 0, name
    # key and links of a row share one 16-byte record
    assert t.lru_prev.ctypes.data - t.row_keys.ctypes.data == 8
    assert t.row_keys.strides == (16,) and t.lru_next.strides == (16,)
    u = pickle.loads(pickle.dumps(t))
    keys = np.arange(1000, dtype=np.uint64)
    np.testing.assert_array_equal(u.lookup(keys, True), t.lookup(keys, True))
    np.testing.assert_array_equal(u.export_rows()["keys"], t.export_rows()["keys"])


def test_create_while_probing_path_matches_twin():
    """With room reserved for the whole batch, a training lookup creates rows while it probes
    (then links them in batch order): same rows, LRU order and counters as the twin, duplicates
    of new keys within a batch included."""
    t, n = pair(capacity=400, dim=3)
    split, _ = pair(capacity=400, dim=3)
    t.reserve(400)
    split.reserve(400)
    rng = np.random.default_rng(5)
    universe = np.concatenate([u64(MARKERS), np.arange(1000, 1300, dtype=np.uint64)])
    for _ in range(40):
        keys = universe[rng.integers(0, len(universe), rng.integers(0, 30))]
        keys = np.concatenate([keys, keys[: len(keys) // 3]])  # repeats, also of new keys
        want = n.lookup(keys, True)
        np.testing.assert_array_equal(t.lookup(keys, True), want)
        np.testing.assert_array_equal(split.train_lookup(keys, split.probe(keys)), want)
        same_export(t, n)
    assert t.stats() == split.stats()
    assert t.rows > 250 and t.stats()["evictions"] == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 30), st.integers(0, 8), st.lists(st.integers(0, 40), max_size=120))
def test_lru_stamps_match_relinking_at_each_touch(linked_n, new_n, picks):
    """The stamped form of the LRU (a list turned into stamps, touches and new rows stamped from
    the clock on, then linked by stamp) gives the list that relinking at every touch gives."""
    from persia.store.kernels import table as K

    rows = linked_n + new_n
    order = [int(r) for r in np.random.default_rng(linked_n).permutation(linked_n)]
    prev, nxt = [-1] * rows, [-1] * rows
    for a, b in zip(order, order[1:], strict=False):
        nxt[a], prev[b] = b, a
    head, tail = (order[0], order[-1]) if order else (-1, -1)
    # new rows (ids linked_n ..) are touched first at their creation, in pick order
    touched = [p % rows for p in picks] if rows else []
    made, seq = set(order), []
    for r in touched:
        if r >= linked_n and r not in made:
            made.add(r)
        seq.append(r)
    seq = [r for r in seq if r < linked_n or r in made]
    want = naive.lru_relink_each(prev, nxt, head, tail, seq, set(order))
    rec = np.zeros((rows, 2), np.uint64)
    links = rec.view(np.int32)
    lru_prev, lru_next, lru_ts = links[:, 2], links[:, 3], rec[:, 1].view(np.int64)
    lru_prev[:] = prev
    lru_next[:] = nxt
    meta = np.zeros(K.META_LEN, np.int64)
    meta[K.M_HEAD], meta[K.M_TAIL] = head, tail
    assert K.lru_stamp_kernel(lru_next, lru_ts, meta) == linked_n and meta[K.M_STAMPED] == 1
    for r in seq:
        lru_ts[r] = meta[K.M_CLOCK]
        meta[K.M_CLOCK] += 1
    live = sorted(set(order) | {r for r in seq})
    by_stamp = np.array(sorted(live, key=lambda r: lru_ts[r]), dtype=np.int32)
    K.lru_link_kernel(by_stamp, lru_prev, lru_next, meta)
    assert meta[K.M_STAMPED] == 0
    got_prev = [int(lru_prev[r]) if r in live else -1 for r in range(rows)]
    got_next = [int(lru_next[r]) if r in live else -1 for r in range(rows)]
    assert got_prev == want[0] and got_next == want[1]
    assert (int(meta[K.M_HEAD]), int(meta[K.M_TAIL])) == want[2:]


@pytest.mark.parametrize("nrows", [0, 1, 7, 1000])
def test_linking_by_stamp_slots_matches_linking_by_sort(nrows):
    """flush_lru's sort-free kernel (a slot per stamp) links the rows as the argsort does."""
    rng = np.random.default_rng(nrows)
    clock = 3 * nrows + 5
    stamps = rng.choice(clock, nrows, replace=False).astype(np.int64)  # unique, with gaps
    out = []
    for sort in (True, False):
        rec = np.zeros((max(nrows, 1), 2), np.uint64)
        links = rec.view(np.int32)
        lru_prev, lru_next, lru_ts = links[:, 2], links[:, 3], rec[:, 1].view(np.int64)
        lru_ts[:nrows] = stamps
        meta = np.zeros(K.META_LEN, np.int64)
        meta[K.M_STAMPED], meta[K.M_CLOCK] = 1, clock
        if sort:
            order = np.argsort(lru_ts[:nrows], kind="stable").astype(np.int32)
            K.lru_link_kernel(order, lru_prev, lru_next, meta)
        else:
            assert K.lru_link_stamps_kernel(lru_ts, nrows, clock, lru_prev, lru_next, meta) == nrows
        assert meta[K.M_STAMPED] == 0
        out.append(
            (lru_prev[:nrows].tolist(), lru_next[:nrows].tolist(), *meta[[K.M_HEAD, K.M_TAIL]])
        )
    assert out[0] == out[1]
    if nrows:
        assert out[1][2] == int(np.argmin(stamps)) and out[1][3] == int(np.argmax(stamps))


def test_fast_lookups_stamp_and_other_operations_link():
    from persia.store.kernels import table as K

    t, n = pair(capacity=1000, dim=2)
    t.reserve(1000)
    for step in range(5):
        keys = u64(list(range(step, step + 30)) + MARKERS[:3])
        np.testing.assert_array_equal(t.lookup(keys, True), n.lookup(keys, True))
    assert t.meta[K.M_STAMPED] == 1  # relinks deferred: the LRU is held as stamps
    same_export(t, n)  # the export orders by stamp: the twin's LRU order
    t.set_capacity(20)  # evicts the oldest: needs (and builds) the linked form
    n.set_capacity(20)
    assert t.meta[K.M_STAMPED] == 0
    same_export(t, n)
    keys = u64(range(100, 130))
    np.testing.assert_array_equal(t.lookup(keys, True), n.lookup(keys, True))
    same_export(t, n)


def test_recheck_keeps_rows_that_hold_their_keys_and_finds_moved_ones():
    """After evictions move rows, ``recheck`` answers what a fresh probe answers: a row that
    still holds its key is kept as given, a moved key's row is found again, an evicted key is
    -1; and a row number past the live rows is not trusted."""
    t = EmbeddingTable(4, 50, SGD(lr=0.1), seed=1)
    keys = np.arange(100, 150, dtype=np.uint64)
    t.lookup(keys, True)
    before = t.probe(keys)
    t.set_capacity(40)  # evicts the 10 oldest (keys 100-109); the last rows fill their places
    assert t.evictions == 10
    got = t.recheck(keys, before)
    np.testing.assert_array_equal(got, t.probe(keys))
    assert (got[:10] == -1).all() and (got[10:] >= 0).all()
    assert ((got != before) & (got >= 0)).sum() == 10  # the rows that moved into those places
    np.testing.assert_array_equal(t.recheck(keys[10:], np.full(40, 10**6, np.int32)), got[10:])
