"""The synthetic Criteo-shaped stream: determinism, shapes, the ID law, labels, validation."""

from __future__ import annotations

import numpy as np
import pytest

from persia.datasets.synthetic import CRITEO_CARDINALITIES, SyntheticStream
from persia.errors import ConfigError
from persia.hashing import hash_ints
from persia.metrics import roc_auc

SMALL = (1000, 50, 3, 100_000)


def test_criteo_cardinalities():
    assert len(CRITEO_CARDINALITIES) == 26
    assert sum(CRITEO_CARDINALITIES) == 33_762_577


def test_batches_are_a_pure_function_of_seed_and_index():
    a = SyntheticStream(SMALL, seed=5).batch(7, 256)
    b = SyntheticStream(SMALL, seed=5).batch(7, 256)
    c = SyntheticStream(SMALL, seed=5).batch(8, 256)
    d = SyntheticStream(SMALL, seed=6).batch(7, 256)
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.labels, b.labels)
    for va, vb in zip(a.values, b.values, strict=True):
        np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(a.dense, c.dense)
    assert not np.array_equal(a.values[3], d.values[3])


def test_shapes_and_ranges_one_hot():
    s = SyntheticStream(SMALL, num_dense=4)
    b = s.batch(0, 500)
    assert b.dense.shape == (500, 4) and b.dense.dtype == np.float32
    assert b.labels.shape == (500, 1) and set(np.unique(b.labels)) <= {0.0, 1.0}
    for slot, card in enumerate(SMALL):
        assert b.values[slot].dtype == np.uint64 and len(b.values[slot]) == 500
        np.testing.assert_array_equal(b.lengths[slot], np.ones(500))
        assert b.ranks[slot].min() >= 0 and b.ranks[slot].max() < card
        # The ID is the rank's hash salted with the slot.
        np.testing.assert_array_equal(b.values[slot], hash_ints(b.ranks[slot], salt=slot + 1))


def test_multi_hot_lengths():
    s = SyntheticStream(SMALL, ids_per_sample=4)
    b = s.batch(1, 300)
    for slot in range(len(SMALL)):
        n = b.lengths[slot]
        assert n.min() >= 1 and n.max() <= 4 and n.max() > 1
        assert len(b.values[slot]) == n.sum()


def test_per_slot_ids_per_sample():
    """A bound per slot: one-hot slots stay one-hot, and [k] * slots is exactly k."""
    bounds = [1, 6, 1, 3][: len(SMALL)] + [1] * max(0, len(SMALL) - 4)
    b = SyntheticStream(SMALL, ids_per_sample=bounds, seed=3).batch(2, 400)
    for slot, k in enumerate(bounds):
        n = b.lengths[slot]
        assert len(b.values[slot]) == n.sum()
        if k == 1:
            np.testing.assert_array_equal(n, np.ones(400))
        else:
            assert n.min() >= 1 and n.max() == k
    same = SyntheticStream(SMALL, ids_per_sample=[4] * len(SMALL), seed=3).batch(5, 200)
    ref = SyntheticStream(SMALL, ids_per_sample=4, seed=3).batch(5, 200)
    np.testing.assert_array_equal(same.labels, ref.labels)
    for a, r in zip(same.values, ref.values, strict=True):
        np.testing.assert_array_equal(a, r)


def test_zipf_head_is_hot_and_tail_is_long():
    s = SyntheticStream((1_000_000,), num_dense=0)
    ranks = np.concatenate([s.batch(i, 4096).ranks[0] for i in range(5)])
    counts = np.bincount(ranks, minlength=100)
    assert counts[0] > counts[1] > counts[10] > counts[99]
    # Power law with exponent 1.1: rank 0 about 10**1.1 ~ 12.6x as frequent as rank 9.
    assert 6 < counts[0] / counts[9] < 25
    assert len(np.unique(ranks)) > len(ranks) // 4  # a long tail of rare IDs


def test_default_positive_rate_is_about_criteo_and_teacher_auc_is_high():
    s = SyntheticStream(CRITEO_CARDINALITIES)
    labels = np.concatenate([s.batch(i, 2048).labels[:, 0] for i in range(8)])
    assert 0.2 < labels.mean() < 0.3
    auc = s.teacher_auc(0, 8, 2048)
    assert 0.85 < auc < 1.0


def test_labels_follow_the_teacher():
    s = SyntheticStream(SMALL, seed=1)
    b = s.batch(0, 20_000)
    assert roc_auc(b.labels[:, 0], b.logits) > 0.7
    # A model that only knows the dense part does worse than the teacher.
    dense_only = b.dense.astype(np.float64) @ s.dense_weights
    assert roc_auc(b.labels[:, 0], dense_only) < roc_auc(b.labels[:, 0], b.logits)


def test_effects_are_deterministic_and_scaled():
    s = SyntheticStream(SMALL, id_effect_scale=2.0, seed=3)
    ranks = np.arange(50_000)
    e = s.effects(1, ranks)
    np.testing.assert_array_equal(
        e, SyntheticStream(SMALL, id_effect_scale=2.0, seed=3).effects(1, ranks)
    )
    assert abs(e.mean()) < 0.05 and 1.9 < e.std() < 2.1
    assert not np.array_equal(e, s.effects(2, ranks))


def test_to_persia_batch():
    s = SyntheticStream(SMALL)
    b = s.batch(0, 64)
    pb = b.to_persia_batch(s.slot_names(), requires_grad=False)
    assert pb.batch_size == 64
    assert [f.name for f in pb.id_type_features] == ["slot_0", "slot_1", "slot_2", "slot_3"]
    np.testing.assert_array_equal(pb.id_type_features[2].values, b.values[2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cardinalities": ()}, "cardinalities must be ints >= 1"),
        ({"cardinalities": (5, 0)}, "cardinalities must be ints >= 1"),
        ({"num_dense": -1}, "num_dense must be an int >= 0, got -1"),
        ({"zipf_exponent": 0.0}, "zipf_exponent must be > 0, got 0.0"),
        ({"ids_per_sample": 0}, "ids_per_sample must be an int >= 1, got 0"),
        ({"ids_per_sample": [1, 2]}, "one int >= 1 per slot"),
        ({"ids_per_sample": "2"}, "ids_per_sample must be an int >= 1 or one per slot"),
        ({"id_effect_scale": -1.0}, "id_effect_scale must be a finite number >= 0, got -1.0"),
        ({"bias": float("nan")}, "bias must be finite"),
    ],
)
def test_validation_names_the_field(kwargs, message):
    kwargs = {"cardinalities": SMALL, **kwargs}
    with pytest.raises(ConfigError, match=message):
        SyntheticStream(**kwargs)


def test_dataset_yields_the_range_as_persia_batches():
    stream = SyntheticStream([50, 7], num_dense=3, seed=4)
    names = stream.slot_names()
    got = list(stream.dataset(names, 2, 3, 16, requires_grad=False))
    assert len(got) == 3
    for pb, i in zip(got, range(2, 5), strict=True):
        want = stream.batch(i, 16).to_persia_batch(names, requires_grad=False)
        assert pb.batch_size == 16 and not pb.requires_grad
        for a, b in zip(pb.id_type_features, want.id_type_features, strict=True):
            assert a.name == b.name
            np.testing.assert_array_equal(a.values, b.values)
    assert list(stream.dataset(names, 0, 1, 8))[0].requires_grad
