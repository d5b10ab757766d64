"""The job reader: multi-valued and missing IDs, dense transforms, labels, shuffling, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persia.errors import BatchError
from persia.hashing import hash_ints, hash_strings
from persia.job.config import parse_job
from persia.job.readers import MISSING_TOKEN, Chunk, JobReader

CSV = """user,tags,age,score,click
a,x|y|z,10,1.5,1
 b ,,?,2.5,0
?,y||x,30,,1
c,z,,4.5,
d,?,50,-1,0
"""


def _job(tmp_path: Path, **data) -> JobReader:
    (tmp_path / "t.csv").write_text(CSV)
    raw = {
        "train": "t.csv",
        "header": True,
        "trim_whitespace": True,
        "missing_values": ["", "?"],
        "ids": {"user": {}, "tags": {"separator": "|"}},
        "dense": {"age": {"log1p": True}, "score": {"standardize": False}},
        "label": "click",
        "shuffle_buffer": 0,
    }
    raw.update(data)
    return JobReader(parse_job({"data": raw}, tmp_path).data)


def _all(reader: JobReader, batch_size: int = 100, **kw) -> list:
    return list(reader.batches(reader.spec.train, batch_size, training=True, **kw))


def test_multi_valued_and_missing_ids_empty(tmp_path: Path) -> None:
    (batch,) = _all(_job(tmp_path))
    assert batch.batch_size == 4  # the row without a label is dropped
    user, tags = batch.id_type_features
    assert user.lengths.tolist() == [1, 1, 0, 1]  # '?' is missing -> empty sample
    np.testing.assert_array_equal(user.values, hash_strings(["a", "b", "d"]))  # ' b ' trimmed
    assert tags.lengths.tolist() == [3, 0, 2, 0]  # empty tokens of 'y||x' dropped
    np.testing.assert_array_equal(tags.values, hash_strings(["x", "y", "z", "y", "x"]))
    np.testing.assert_array_equal(batch.labels[0].data.ravel(), [1, 0, 1, 0])


def test_missing_ids_as_token(tmp_path: Path) -> None:
    (batch,) = _all(_job(tmp_path, missing={"ids": "token"}))
    user, tags = batch.id_type_features
    token = hash_strings([MISSING_TOKEN])[0]
    assert user.lengths.tolist() == [1, 1, 1, 1]
    np.testing.assert_array_equal(
        user.values, [*hash_strings(["a", "b"]), token, hash_strings(["d"])[0]]
    )
    assert tags.lengths.tolist() == [3, 1, 2, 1]
    np.testing.assert_array_equal(
        tags.values, [*hash_strings(["x", "y", "z"]), token, *hash_strings(["y", "x"]), token]
    )


def test_dense_log1p_standardised_with_missing_filled(tmp_path: Path) -> None:
    reader = _job(tmp_path)
    # statistics over every training row with a value (the label-less row included)
    age = np.log1p(np.array([10.0, 30.0, 50.0]))
    np.testing.assert_allclose(reader.stats.mean[0], age.mean())
    np.testing.assert_allclose(reader.stats.std[0], age.std())
    score = np.array([1.5, 2.5, 4.5, -1.0])
    (batch,) = _all(reader)
    dense = batch.non_id_type_features[0].data
    assert dense.dtype == np.float32 and dense.shape == (4, 2)
    want_age = [
        (age[0] - age.mean()) / age.std(),
        0.0,
        (age[1] - age.mean()) / age.std(),
        (age[2] - age.mean()) / age.std(),
    ]
    np.testing.assert_allclose(dense[:, 0], want_age, rtol=1e-6)
    # not standardised: missing filled with the training mean
    np.testing.assert_allclose(dense[:, 1], [1.5, 2.5, score.mean(), -1.0], rtol=1e-6)
    (batch,) = _all(_job(tmp_path, missing={"dense": "zero"}))
    np.testing.assert_allclose(
        batch.non_id_type_features[0].data[1, 0], -age.mean() / age.std(), rtol=1e-6
    )
    assert batch.non_id_type_features[0].data[2, 1] == 0.0


def test_labels_positive_threshold_and_not_binary(tmp_path: Path) -> None:
    only_age = {"age": {"log1p": True}}
    (batch,) = _all(_job(tmp_path, dense=only_age, label={"column": "score", "threshold": 2.0}))
    np.testing.assert_array_equal(batch.labels[0].data.ravel(), [0, 1, 1, 0])  # '' score dropped
    (batch,) = _all(
        _job(
            tmp_path,
            ids={"tags": {"separator": "|"}},
            label={"column": "user", "positive": ["a", "d"]},
        )
    )
    np.testing.assert_array_equal(batch.labels[0].data.ravel(), [1, 0, 0, 1])
    with pytest.raises(BatchError, match="label column 'score' is not binary"):
        _all(_job(tmp_path, dense=only_age, label="score"))
    with pytest.raises(BatchError, match="label column 'click' is missing"):
        _all(_job(tmp_path, missing={"label": "error"}))


def test_int_ids_and_parquet_list_column(tmp_path: Path) -> None:
    table = pa.table(
        {
            "uid": pa.array([7, None, -3], type=pa.int64()),
            "hist": pa.array([["a", "b"], None, []], type=pa.list_(pa.string())),
            "y": pa.array([1, 0, 1], type=pa.int8()),
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    raw = {"train": "*.parquet", "ids": {"uid": {"type": "int"}, "hist": {}}, "label": "y"}
    reader = JobReader(parse_job({"data": raw}, tmp_path).data)
    (batch,) = list(reader.batches(reader.spec.train, 8, training=False))
    uid, hist = batch.id_type_features
    assert uid.lengths.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(uid.values, hash_ints([7, -3]))
    assert hist.lengths.tolist() == [2, 0, 0]
    np.testing.assert_array_equal(hist.values, hash_strings(["a", "b"]))
    assert batch.non_id_type_features == []


def _naive_take(chunk: Chunk, index: np.ndarray) -> list[list[list[int]]]:
    out = []
    for values, lengths in chunk.ids:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        rows = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))]
        out.append([rows[i] for i in index])
    return out


def test_chunk_take_and_slice_match_naive() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, size=50).astype(np.int64)
    values = rng.integers(0, 2**63, size=int(lengths.sum())).astype(np.uint64)
    chunk = Chunk(
        [(values, lengths)],
        rng.random((50, 2)).astype(np.float32),
        rng.random(50).astype(np.float32),
    )
    perm = rng.permutation(50)
    taken = chunk.take(perm)
    offsets = np.concatenate([[0], np.cumsum(taken.ids[0][1])])
    got = [taken.ids[0][0][offsets[i] : offsets[i + 1]].tolist() for i in range(50)]
    assert got == _naive_take(chunk, perm)[0]
    np.testing.assert_array_equal(taken.labels, chunk.labels[perm])
    part = chunk.slice(10, 20)
    offsets = np.concatenate([[0], np.cumsum(part.ids[0][1])])
    got = [part.ids[0][0][offsets[i] : offsets[i + 1]].tolist() for i in range(10)]
    assert got == _naive_take(chunk, np.arange(10, 20))[0]


def test_shuffled_batches_cover_every_row_once(tmp_path: Path) -> None:
    n = 1000
    lines = ["user,v,click"] + [f"u{i},{i},{i % 2}" for i in range(n)]
    (tmp_path / "big.csv").write_text("\n".join(lines) + "\n")
    raw = {
        "train": "big.csv",
        "header": True,
        "ids": ["user"],
        "dense": {"v": {"standardize": False}},
        "label": "click",
        "shuffle_buffer": 300,
        "block_bytes": 4096,
    }
    reader = JobReader(parse_job({"data": raw}, tmp_path).data)
    batches = list(reader.batches(reader.spec.train, 64, training=True, seed=1))
    v = np.concatenate([b.non_id_type_features[0].data[:, 0] for b in batches])
    assert sorted(v.tolist()) == list(range(n))
    assert v.tolist() != list(range(n))  # shuffled
    ids = np.concatenate([b.id_type_features[0].values for b in batches])
    np.testing.assert_array_equal(ids, hash_strings([f"u{int(i)}" for i in v]))
    labels = np.concatenate([b.labels[0].data[:, 0] for b in batches])
    np.testing.assert_array_equal(labels, v % 2)
    again = list(reader.batches(reader.spec.train, 64, training=True, seed=1))
    assert all(
        np.array_equal(a.labels[0].data, b.labels[0].data)
        for a, b in zip(batches, again, strict=True)
    )
    capped = list(reader.batches(reader.spec.train, 64, training=True, max_samples=100))
    assert [b.batch_size for b in capped] == [64, 36]


def test_check_reports_missing_columns_and_non_binary_label(tmp_path: Path) -> None:
    reader = _job(tmp_path, ids=["user", "nope"])
    problems = reader.check()
    assert any("missing column(s) 'nope'" in p for p in problems)
    reader = _job(tmp_path, dense=["age"], label="score", test="missing-*.csv")
    problems = reader.check()
    assert any("label column 'score' is not binary" in p for p in problems)
    assert any("data.test: no file matches" in p for p in problems)
    assert _job(tmp_path).check() == []
