"""Serving features on a synthetic job with multi-valued, int, raw-pooled and missing values:
IDs, dense values and predictions equal the training reader's and the training code path's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from persia import serving
from persia.job.config import JobConfig, parse_job
from persia.job.readers import JobReader
from persia.serving import run_and_export

CSV = """\
tags,uid,x,z,y
a|b|c,1,0.5,3,1
b,2,,10,0
,3,2.5,,1
c||a,4,1.0,0,0
d|a|b|c|e,,3.0,7,1
a,1,0.0,2,0
"""


@pytest.mark.parametrize(("missing_ids", "pooling"), [("empty", "raw"), ("token", "mean")])
def test_multi_valued_int_raw_and_missing(tmp_path: Path, missing_ids: str, pooling: str) -> None:
    header, rows = CSV.split("\n", 1)
    (tmp_path / "d.csv").write_text(header + "\n" + rows * 20)
    raw = {
        "data": {
            "train": "d.csv",
            "test": "d.csv",
            "header": True,
            "ids": {"tags": {"separator": "|"}, "uid": {"type": "int"}},
            "dense": {"x": {}, "z": {"log1p": True}},
            "label": "y",
            "missing": {"ids": missing_ids, "dense": "zero"},
        },
        "embedding": {"dim": 4, "slots": {"tags": {"pooling": pooling, "sample_fixed_size": 3}}},
        "model": {"type": "dnn", "args": {"hidden": [8]}},
        "training": {"batch_size": 16, "staleness": 1, "progress": "none", "seed": 1},
    }
    job: JobConfig = parse_job(raw, base_dir=tmp_path)
    out = tmp_path / "export"
    result = run_and_export(job, out)
    p = serving.load(out)
    reader = JobReader(job.data)
    assert job.data.test is not None
    chunk = next(reader.chunks(job.data.test))
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(tmp_path / "d.csv")  # typed by pyarrow: ints, floats, nulls
    for j, slot in enumerate(p.meta["slots"]):
        ids, lengths = p._ids(slot, table.column(slot["column"]).combine_chunks())
        np.testing.assert_array_equal(ids, chunk.ids[j][0])
        np.testing.assert_array_equal(lengths, chunk.ids[j][1])
    non_id, emb = p.features(table)
    np.testing.assert_allclose(non_id[0].numpy(), chunk.dense, rtol=0, atol=1e-6)
    if pooling == "raw":
        assert emb[0].shape == (table.num_rows, 3, 5)
    # the predictions score the test AUC the job reported
    from persia.metrics import log_loss

    y = table.column("y").to_numpy().astype(np.float64)
    probs = p.predict(table).astype(np.float64)
    assert log_loss(y, probs) == pytest.approx(result["test_logloss"], abs=1e-6)
    assert torch.isfinite(torch.from_numpy(probs)).all()
