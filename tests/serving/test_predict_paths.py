"""The predictor's batched recipe (slots read, hashed, looked up and pooled together; dense columns
parsed together) equals the slot-by-slot recipe it replaced, exactly, on random rows with missing
values, markers, whitespace, multi-valued and list columns, int IDs and unknown IDs; bad rows raise
the same BatchError."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from persia import serving
from persia.errors import BatchError
from persia.hashing import ids_from_column
from persia.job.config import parse_job
from persia.serving import run_and_export
from persia.worker import pooling

CATS = ["a", "b", "c", "d", " a ", "?", "", "zz-unknown"]
TAGS = ["a|b|c", "b", "", "c||a", "d|a|b|c|e", "?", " b | c ", "new|b"]


def _train_rows(rng: np.random.Generator, n: int) -> str:
    lines = ["tags,cat,cat2,city,uid,seq,x,z,w,y"]
    for _ in range(n):
        lines.append(
            ",".join(
                [
                    str(rng.choice(["a|b|c", "b", "", "c||a", "d|a|b"])),
                    str(rng.choice(["a", "b", "c", "?"])),
                    str(rng.choice(["p", "q", ""])),
                    str(rng.choice(["x", "y", "z"])),
                    str(rng.choice(["1", "2", "3", ""])),
                    str(rng.choice(["s1", "s1 s2", "s2 s3 s4 s5", ""])),
                    str(rng.choice(["0.5", "2.5", "", "?"])),
                    str(rng.choice(["3", "10", "0", ""])),
                    str(rng.choice(["-1", "4", ""])),
                    str(rng.integers(0, 2)),
                ]
            )
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", params=[("token", "mean"), ("empty", "zero")])
def predictor(request: Any, tmp_path_factory: pytest.TempPathFactory) -> serving.Predictor:
    missing_ids, missing_dense = request.param
    tmp = tmp_path_factory.mktemp("paths")
    (tmp / "d.csv").write_text(_train_rows(np.random.default_rng(0), 256))
    raw = {
        "data": {
            "train": "d.csv",
            "test": "d.csv",
            "header": True,
            "trim_whitespace": True,
            "missing_values": ["", "?"],
            "ids": {
                "tags": {"separator": "|"},
                "cat": {},
                "cat2": {},
                "city": {},
                "uid": {"type": "int"},
                "seq": {"separator": " "},
            },
            "dense": {"x": {}, "z": {"log1p": True}, "w": {"standardize": False}},
            "label": "y",
            "missing": {"ids": missing_ids, "dense": missing_dense},
        },
        "embedding": {
            "dim": 4,
            "slots": {"city": {"dim": 6}, "seq": {"pooling": "raw", "sample_fixed_size": 3}},
        },
        "model": {"type": "dnn", "args": {"hidden": [8]}},
        "training": {"batch_size": 32, "staleness": 1, "progress": "none", "seed": 1},
    }
    job = parse_job(raw, base_dir=tmp)
    run_and_export(job, tmp / "export")
    return serving.load(tmp / "export")


# ------------------------------------------------------------------ the slot-by-slot recipe
def _old_clean(p: serving.Predictor, arr: pa.Array) -> pa.Array:
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        if p.meta["input"]["trim_whitespace"]:
            arr = pc.utf8_trim_whitespace(arr)
        markers = pa.array(list(p.meta["input"]["missing_values"]), type=pa.string())
        if len(markers):
            arr = pc.if_else(pc.is_in(arr, value_set=markers), None, arr)
    return arr


def _old_features(p: serving.Predictor, table: pa.Table) -> tuple[np.ndarray, list[np.ndarray]]:
    """What ``Predictor.features`` computed before slots were batched (one slot, then one dense
    column, at a time)."""
    n = table.num_rows
    token = p._token_id if p.meta["input"]["missing_ids"] == "token" else None
    embeddings = []
    for slot in p.meta["slots"]:
        ids, lengths = ids_from_column(
            table.column(slot["column"]).combine_chunks(),
            kind=slot["type"],
            separator=slot["separator"],
            clean=lambda a: _old_clean(p, a),
            token_id=token,
            what=f"column {slot['column']!r}",
        )
        keys = pooling.add_prefix(ids, int(slot["prefix"]), int(slot["prefix_bits"]))
        uniques, inverse = pooling.unique_inverse(keys)
        emb = p._lookup(int(slot["dim"]), uniques)
        if slot["pooling"] == "raw":
            out, _ = pooling.pool_raw_forward(lengths, inverse, emb, int(slot["sample_fixed_size"]))
        else:
            out = pooling.pool_forward(lengths, inverse, emb, slot["pooling"])
        embeddings.append(out)
    cols = p.meta["dense"]
    dense = np.zeros((n, len(cols)), dtype=np.float32)
    fill_mean = p.meta["input"]["missing_dense"] == "mean"
    for j, c in enumerate(cols):
        arr = _old_clean(p, table.column(c["name"]).combine_chunks())
        try:
            x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise BatchError(f"dense column {c['name']!r}: expected numbers ({exc})") from None
        x = np.array(x, dtype=np.float64)
        if c["log1p"]:
            x = np.log1p(np.maximum(x, 0.0))
        nan = np.isnan(x)
        mean, std = c["mean"], c["std"]
        if c["standardize"]:
            x = (x - mean) / std
            fill = 0.0 if fill_mean else -mean / std
        else:
            fill = mean if fill_mean else 0.0
        x[nan] = fill
        dense[:, j] = x
    return dense, embeddings


# ------------------------------------------------------------------ random requests
def _random_rows(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """Rows as a client sends them: each column in one JSON type per request (chosen at random),
    with None, markers, whitespace and unknown values."""

    def pick(values: list[Any], none: float = 0.15) -> Any:
        return None if rng.random() < none else values[int(rng.integers(len(values)))]

    tags_as_lists = rng.random() < 0.5
    dense_as_numbers = rng.random() < 0.5
    rows = []
    for _ in range(n):
        tags = pick(TAGS)
        if tags_as_lists and tags is not None:
            tags = [t for t in tags.split("|")] + ([None] if rng.random() < 0.2 else [])
        row = {
            "tags": tags,
            "cat": pick(CATS),
            "cat2": pick(["p", "q", " q", "?", "never-seen"]),
            "city": pick(["x", "y", "z", "w"]),
            "uid": pick([1, 2, 3, 2**40, -7]),
            "seq": pick(["s1", "s1 s2", "s2 s3 s4 s5", "", "s9  s1"]),
            "y": 1,
        }
        for c in ("x", "z", "w"):
            v = pick([0.5, 2.5, -3.0, 10.0, 0.0], none=0.2)
            row[c] = v if dense_as_numbers or v is None else pick([str(v), f" {v} ", "?", ""])
        rows.append(row)
    return rows


def _assert_same(p: serving.Predictor, table: pa.Table, request: Any) -> None:
    dense, embeddings = _old_features(p, table)
    non_id, emb = p.features(request)
    assert len(emb) == len(embeddings)
    for got, want in zip(emb, embeddings, strict=True):
        assert got.numpy().shape == want.shape
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(non_id[0].numpy(), dense)
    with torch.no_grad():
        out = p.model([torch.from_numpy(dense)], [torch.from_numpy(e) for e in embeddings])
        want_p = torch.sigmoid(out).numpy().reshape(-1)
    np.testing.assert_array_equal(p.predict(request), want_p)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_batched_recipe_equals_slot_by_slot(predictor: serving.Predictor, n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(4):
        rows = _random_rows(rng, n)
        table = pa.Table.from_pylist(rows)
        _assert_same(predictor, table, rows)  # list of dicts
        _assert_same(predictor, table, table)  # a table
        # a table of several chunks per column, and columns as a dict
        _assert_same(predictor, pa.concat_tables([table, table]), pa.concat_tables([table, table]))
        _assert_same(predictor, table, {k: table.column(k) for k in table.column_names})


def test_unknown_ids_read_as_zeros(predictor: serving.Predictor) -> None:
    rows = _random_rows(np.random.default_rng(1), 3)
    for r in rows:
        r.update(tags="q1|q2", cat="q3", cat2="q4", city="q5", uid=987654321, seq="q6")
    _, emb = predictor.features(rows)
    for slot, e in zip(predictor.meta["slots"], emb, strict=True):
        rows_read = e.numpy()[..., : int(slot["dim"])]  # a raw slot's last column is its mask
        assert rows_read.size and not rows_read.any()


@pytest.mark.parametrize(
    ("column", "value"),
    [("uid", "not-an-int"), ("x", "abc"), ("w", "1.5.2"), ("z", "zz")],
)
def test_bad_values_raise_the_same_errors(
    predictor: serving.Predictor, column: str, value: str
) -> None:
    rows = _random_rows(np.random.default_rng(2), 5)
    for r in rows:  # every dense column as text, so that they are parsed together
        for c in ("x", "z", "w"):
            r[c] = None if r[c] is None else str(r[c])
        r["uid"] = None if r["uid"] is None else str(r["uid"])
    rows[3][column] = value
    rows[4]["w"] = "also bad"  # a later column is bad too: the first one is named
    table = pa.Table.from_pylist(rows)
    with pytest.raises(BatchError) as want:
        _old_features(predictor, table)
    with pytest.raises(BatchError) as got:
        predictor.predict(rows)
    assert str(got.value) == str(want.value)
    assert repr(column) in str(got.value)
