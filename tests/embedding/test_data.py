"""PersiaBatch and the feature types: layout, constructors, every validation path, transport."""

from __future__ import annotations

import numpy as np
import pytest

from persia import _settings
from persia.embedding import EmbeddingConfig, get_default_embedding_config
from persia.embedding.data import (
    IDTypeFeature,
    IDTypeFeatureWithSingleID,
    Label,
    NonIDTypeFeature,
    PersiaBatch,
)
from persia.errors import BatchError, ConfigError

U64 = np.uint64


def _ids(*samples: list[int]) -> list[np.ndarray]:
    return [np.array(s, dtype=U64) for s in samples]


def _batch(n: int = 3, **kw) -> PersiaBatch:
    ids = [IDTypeFeatureWithSingleID("a", np.arange(n, dtype=U64))]
    kw.setdefault("labels", [Label(np.zeros((n, 1), np.float32))])
    return PersiaBatch(ids, **kw)


# --- layout -------------------------------------------------------------------------------


def test_docstring_example_layout():
    f = IDTypeFeature("tags", _ids([7, 9], [], [4]))
    assert f.values.dtype == U64 and f.values.tolist() == [7, 9, 4]
    assert f.lengths.dtype == np.int64 and f.lengths.tolist() == [2, 0, 1]
    assert f.offsets.tolist() == [0, 2, 2, 3]
    assert f.batch_size == 3 and f.name == "tags"
    assert [s.tolist() for s in f.data] == [[7, 9], [], [4]]


def test_single_id_feature_is_columnar_with_unit_lengths():
    f = IDTypeFeatureWithSingleID("x", np.array([5, 6, 7], U64))
    assert f.lengths.tolist() == [1, 1, 1] and f.offsets.tolist() == [0, 1, 2, 3]
    assert f.data.tolist() == [5, 6, 7] and isinstance(f, IDTypeFeature)


def test_all_empty_samples():
    f = IDTypeFeature("e", _ids([], []))
    assert f.values.size == 0 and f.lengths.tolist() == [0, 0] and f.offsets.tolist() == [0, 0, 0]


def test_columnar_equals_per_sample_random():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 6, size=200)
    values = rng.integers(0, 2**64 - 1, size=int(lengths.sum()), dtype=U64, endpoint=True)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    samples = [values[offsets[i] : offsets[i + 1]].copy() for i in range(200)]
    a = IDTypeFeature("s", samples)
    b = IDTypeFeature.from_columnar("s", values, lengths.astype(np.int32))
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert b.lengths.dtype == np.int64 and b.batch_size == 200
    assert all(np.array_equal(x, y) for x, y in zip(a.data, b.data, strict=True))


def test_from_columnar_accepts_list_lengths_and_keeps_values_without_copy():
    values = np.array([1, 2, 3], U64)
    f = IDTypeFeature.from_columnar("s", values, [0, 3])
    assert f.values is values and f.lengths.tolist() == [0, 3]


# --- ID feature validation ------------------------------------------------------------------


def test_id_sample_wrong_dtype_names_sample_and_dtype():
    with pytest.raises(
        BatchError, match=r"'age': sample 1: IDs must be np.uint64, got dtype int64"
    ):
        IDTypeFeature("age", [np.array([1], U64), np.array([2], np.int64)])


def test_id_sample_not_1d():
    with pytest.raises(BatchError, match=r"'age': sample 0: IDs must be a 1-D array, got ndim 2"):
        IDTypeFeature("age", [np.zeros((2, 2), U64)])


def test_id_sample_not_an_array():
    with pytest.raises(BatchError, match=r"'age': sample 0: expected a 1-D np.ndarray.*got list"):
        IDTypeFeature("age", [[1, 2]])  # type: ignore[list-item]


def test_id_data_not_a_list():
    with pytest.raises(BatchError, match=r"'age': data must be a list.*got ndarray"):
        IDTypeFeature("age", np.array([1, 2], U64))  # type: ignore[arg-type]


def test_id_feature_bad_name():
    with pytest.raises(BatchError, match=r"IDTypeFeature: name must be a non-empty str, got 3"):
        IDTypeFeature(3, [])  # type: ignore[arg-type]


def test_single_id_wrong_dtype():
    with pytest.raises(BatchError, match=r"'u': data: IDs must be np.uint64, got dtype float64"):
        IDTypeFeatureWithSingleID("u", np.array([1.0, 2.0]))


def test_single_id_not_1d():
    with pytest.raises(BatchError, match=r"'u': data: IDs must be a 1-D array, got ndim 2"):
        IDTypeFeatureWithSingleID("u", np.zeros((3, 1), U64))


def test_columnar_values_wrong_dtype():
    with pytest.raises(BatchError, match=r"'c': values: IDs must be np.uint64, got dtype int32"):
        IDTypeFeature.from_columnar("c", np.array([1], np.int32), np.array([1]))


def test_columnar_values_not_1d():
    with pytest.raises(BatchError, match=r"'c': values: IDs must be a 1-D array, got ndim 2"):
        IDTypeFeature.from_columnar("c", np.zeros((1, 1), U64), np.array([1]))


def test_columnar_lengths_do_not_sum():
    with pytest.raises(BatchError, match=r"'c': lengths: must sum to len\(values\) = 3, got sum 4"):
        IDTypeFeature.from_columnar("c", np.arange(3, dtype=U64), np.array([2, 2]))


def test_columnar_negative_length():
    with pytest.raises(BatchError, match=r"'c': lengths: must be >= 0, got -1 at sample 1"):
        IDTypeFeature.from_columnar("c", np.arange(3, dtype=U64), np.array([4, -1]))


def test_columnar_float_lengths():
    with pytest.raises(
        BatchError, match=r"'c': lengths: expected an integer array, got dtype float64"
    ):
        IDTypeFeature.from_columnar("c", np.arange(3, dtype=U64), np.array([1.0, 2.0]))


def test_columnar_lengths_not_1d():
    with pytest.raises(BatchError, match=r"'c': lengths: expected a 1-D array, got ndim 2"):
        IDTypeFeature.from_columnar("c", np.arange(2, dtype=U64), np.ones((2, 1), np.int64))


# --- dense features and labels -------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float32, np.float64]
)
def test_supported_dense_dtypes(dtype):
    data = np.zeros((4, 2, 3), dtype=dtype)
    assert NonIDTypeFeature(data).batch_size == 4
    assert Label(data, name="y").name == "y"


def test_default_names():
    assert NonIDTypeFeature(np.zeros(2, np.float32)).name == "non_id_type_feature_anonymous"
    assert Label(np.zeros(2, np.float32)).name == "label_anonymous"


def test_dense_unsupported_dtype():
    with pytest.raises(
        BatchError, match=r"NonIDTypeFeature 'h': dtype must be one of .*got float16"
    ):
        NonIDTypeFeature(np.zeros(3, np.float16), name="h")


def test_label_unsupported_dtype_uint64():
    with pytest.raises(BatchError, match=r"Label 'label_anonymous': dtype .*got uint64"):
        Label(np.zeros(3, U64))


def test_dense_ndim_zero():
    with pytest.raises(BatchError, match=r"'h': data must have ndim >= 1.*got ndim 0"):
        NonIDTypeFeature(np.array(1.0, np.float32), name="h")


def test_dense_not_an_array():
    with pytest.raises(BatchError, match=r"'h': data must be a np.ndarray, got list"):
        NonIDTypeFeature([1.0, 2.0], name="h")  # type: ignore[arg-type]


def test_dense_nan_is_rejected_with_position():
    data = np.zeros((4, 2), np.float32)
    data[2, 1] = np.nan
    with pytest.raises(BatchError, match=r"'h': 1 non-finite value.*index \(2, 1\): nan"):
        NonIDTypeFeature(data, name="h")


def test_label_inf_is_rejected():
    data = np.zeros(5, np.float64)
    data[[1, 3]] = np.inf
    with pytest.raises(BatchError, match=r"Label 'y': 2 non-finite value.*index 1: inf"):
        Label(data, name="y")


def test_deep_check_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(_settings.PERSIA_DEEP_CHECKS, "0")
    data = np.array([np.nan, 1.0], np.float32)
    assert NonIDTypeFeature(data).batch_size == 2


# --- PersiaBatch validation --------------------------------------------------------------------


def test_batch_properties():
    ids = [
        IDTypeFeature("a", _ids([1], [], [2, 3])),
        IDTypeFeature.from_columnar("b", np.arange(3, dtype=U64), np.ones(3, np.int64)),
    ]
    dense = [NonIDTypeFeature(np.zeros((3, 2), np.float32), name="d")]
    labels = [Label(np.ones((3, 1), np.float32))]
    batch = PersiaBatch(ids, non_id_type_features=dense, labels=labels, meta=b"m")
    assert batch.batch_size == 3 and batch.requires_grad and batch.meta == b"m"
    assert [f.name for f in batch.id_type_features] == ["a", "b"]
    assert batch.non_id_type_features[0].name == "d" and len(batch.labels) == 1


def test_batch_empty_id_features():
    with pytest.raises(BatchError, match=r"id_type_features: must not be empty"):
        PersiaBatch([], labels=[Label(np.zeros(1, np.float32))])


def test_batch_id_feature_wrong_type():
    with pytest.raises(
        BatchError, match=r"id_type_features\[0\]: expected IDTypeFeature.*got ndarray"
    ):
        PersiaBatch([np.zeros(2, U64)], requires_grad=False)  # type: ignore[list-item]


def test_batch_duplicate_id_feature_names():
    f = IDTypeFeatureWithSingleID("a", np.arange(2, dtype=U64))
    with pytest.raises(BatchError, match=r"duplicate name 'a' \(positions 0 and 1\)"):
        PersiaBatch([f, f], requires_grad=False)


def test_batch_duplicate_dense_names():
    d = NonIDTypeFeature(np.zeros(3, np.float32), name="d")
    with pytest.raises(BatchError, match=r"non_id_type_features: duplicate name 'd'"):
        _batch(non_id_type_features=[d, d])


def test_batch_id_feature_size_mismatch_names_feature_and_sizes():
    ids = [
        IDTypeFeatureWithSingleID("a", np.arange(3, dtype=U64)),
        IDTypeFeatureWithSingleID("b", np.arange(4, dtype=U64)),
    ]
    with pytest.raises(
        BatchError, match=r"id_type_feature 'b': batch size 4 .* 3 \(from id_type_feature 'a'\)"
    ):
        PersiaBatch(ids, requires_grad=False)


def test_batch_dense_size_mismatch():
    with pytest.raises(BatchError, match=r"non_id_type_feature 'd': batch size 2 .* 3"):
        _batch(non_id_type_features=[NonIDTypeFeature(np.zeros(2, np.float32), name="d")])


def test_batch_label_size_mismatch():
    with pytest.raises(BatchError, match=r"label 'y': batch size 5 .* 3"):
        _batch(labels=[Label(np.zeros(5, np.float32), name="y")])


def test_batch_explicit_batch_size_mismatch():
    with pytest.raises(
        BatchError, match=r"id_type_feature 'a': batch size 3 .* 7 \(from batch_size\)"
    ):
        _batch(batch_size=7)


def test_batch_size_zero():
    with pytest.raises(BatchError, match=r"batch_size: must be >= 1, got 0"):
        PersiaBatch([IDTypeFeature("a", [])], requires_grad=False)


def test_batch_size_not_int():
    with pytest.raises(BatchError, match=r"batch_size: expected an int or None, got '3'"):
        _batch(batch_size="3")


def test_requires_grad_without_labels():
    with pytest.raises(BatchError, match=r"requires_grad=True needs labels, got none"):
        _batch(labels=None)


def test_requires_grad_false_without_labels_is_fine():
    assert not _batch(labels=None, requires_grad=False).requires_grad


def test_meta_not_bytes():
    with pytest.raises(BatchError, match=r"meta: expected bytes or None, got str"):
        _batch(meta="x")


def test_label_list_wrong_type():
    with pytest.raises(BatchError, match=r"labels\[0\]: expected Label, got NonIDTypeFeature"):
        _batch(labels=[NonIDTypeFeature(np.zeros(3, np.float32))])


def test_dense_list_wrong_type():
    with pytest.raises(BatchError, match=r"non_id_type_features: expected a list, got ndarray"):
        _batch(non_id_type_features=np.zeros(3, np.float32))


# --- transport ----------------------------------------------------------------------------------


def test_to_arrays_from_arrays_round_trip():
    ids = [
        IDTypeFeature("a", _ids([1, 2], [], [3])),
        IDTypeFeatureWithSingleID("b", np.array([7, 8, 9], U64)),
    ]
    dense = [
        NonIDTypeFeature(np.arange(6, dtype=np.float32).reshape(3, 2), name="d"),
        NonIDTypeFeature(np.zeros((3, 1, 2), np.uint8)),
    ]
    labels = [Label(np.array([True, False, True]), name="click")]
    batch = PersiaBatch(ids, dense, labels, requires_grad=True, meta=b"\x00meta\xff")
    arrays = batch.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = PersiaBatch.from_arrays({k: v.copy() for k, v in arrays.items()})
    assert back.batch_size == 3 and back.requires_grad and back.meta == b"\x00meta\xff"
    assert isinstance(back.id_type_features[1], IDTypeFeatureWithSingleID)
    for x, y in zip(batch.id_type_features, back.id_type_features, strict=True):
        assert x.name == y.name
        np.testing.assert_array_equal(x.values, y.values)
        np.testing.assert_array_equal(x.lengths, y.lengths)
    for x, y in zip(batch.non_id_type_features, back.non_id_type_features, strict=True):
        assert x.name == y.name and x.data.dtype == y.data.dtype
        np.testing.assert_array_equal(x.data, y.data)
    assert back.non_id_type_features[1].given_name is None
    assert back.labels[0].name == "click" and back.labels[0].data.dtype == np.bool_


def test_round_trip_without_meta_or_labels():
    back = PersiaBatch.from_arrays(_batch(labels=None, requires_grad=False).to_arrays())
    assert back.meta is None and back.labels == [] and not back.requires_grad


def test_from_arrays_missing_array():
    arrays = _batch().to_arrays()
    del arrays["id.0.lengths"]
    with pytest.raises(BatchError, match=r"missing array 'id.0.lengths'"):
        PersiaBatch.from_arrays(arrays)


def test_from_arrays_bad_header():
    arrays = _batch().to_arrays()
    arrays["header"] = np.frombuffer(b"{not json", np.uint8)
    with pytest.raises(BatchError, match=r"header is not valid JSON"):
        PersiaBatch.from_arrays(arrays)


def test_from_arrays_reruns_checks():
    arrays = _batch().to_arrays()
    arrays["label.0"] = np.full((3, 1), np.nan, np.float32)
    with pytest.raises(BatchError, match=r"non-finite"):
        PersiaBatch.from_arrays(arrays)


# --- EmbeddingConfig ------------------------------------------------------------------------------


def test_embedding_config_defaults_match_persia():
    cfg = get_default_embedding_config()
    assert cfg == EmbeddingConfig((-0.01, 0.01), 1.0, 10)
    assert cfg.emb_initialization == (-0.01, 0.01) and cfg.weight_bound == 10.0


def test_embedding_config_bad_initialization():
    with pytest.raises(
        ConfigError, match=r"emb_initialization: expected low < high, got \(0.1, -0.1\)"
    ):
        EmbeddingConfig(emb_initialization=(0.1, -0.1))


def test_embedding_config_bad_admit_probability():
    # PERSIA asserts 0 <= p <= 1; outside it persia refuses as well
    for bad in (-0.1, 1.5):
        with pytest.raises(
            ConfigError, match=rf"admit_probability: expected a number in \[0, 1\], got {bad}"
        ):
            EmbeddingConfig(admit_probability=bad)


def test_embedding_config_accepts_persia_range():
    # PERSIA: 0 <= admit_probability <= 1, and weight_bound <= 0 turns clipping off
    assert EmbeddingConfig(admit_probability=0).admit_probability == 0.0
    assert EmbeddingConfig(weight_bound=0).weight_bound == 0.0
    assert EmbeddingConfig(weight_bound=-1).weight_bound == -1.0


def test_embedding_config_bad_weight_bound():
    with pytest.raises(ConfigError, match=r"weight_bound: expected a number .*got nan"):
        EmbeddingConfig(weight_bound=float("nan"))
    with pytest.raises(ConfigError, match=r"weight_bound: expected a number .*got '3'"):
        EmbeddingConfig(weight_bound="3")


def test_embedding_config_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        EmbeddingConfig(emb_initialization=(1,), admit_probability=2.0, weight_bound=None)
    assert len(info.value.problems) == 3


def test_min_length_of_each_constructor():
    from persia.embedding.data import IDTypeFeature, IDTypeFeatureWithSingleID

    u = np.uint64
    assert IDTypeFeature("a", [np.array([1, 2], u), np.array([], u)]).min_length == 0
    assert IDTypeFeature("a", [np.array([1, 2], u), np.array([3], u)]).min_length == 1
    assert IDTypeFeature.from_columnar("a", np.arange(5, dtype=u), [2, 3]).min_length == 2
    assert IDTypeFeature.from_columnar("a", np.empty(0, u), []).min_length == 0
    assert IDTypeFeatureWithSingleID("a", np.arange(4, dtype=u)).min_length == 1
    assert IDTypeFeatureWithSingleID("a", np.empty(0, u)).min_length == 0
