"""Fuzzing the job front end: hypothesis-generated job files, ``--set`` values and small
corrupted Parquet / CSV files, through the CLI's ``main()`` in-process.

Every outcome is a clean run that trained something (exit 0, a result with training samples) or
exit 2 with a one-line ``persia train: error:`` message: never an exception escaping ``main()``
(a traceback), never exit 0 on a job that trained nothing. About 50 examples, each with one tiny
batch, so that it stays fast.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from persia.cli.main import EXIT_BAD_INPUT, main

ROWS = 24

# values a newcomer might give (or mistype) for some keys of the job file
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "training.batch_size": st.sampled_from([0, -3, 1, 8, "8", "big", None, 2.5]),
    "training.staleness": st.sampled_from([0, 1, 4, "lots", None, True]),
    "training.epochs": st.sampled_from([0, 1, "one", None]),
    "training.max_samples": st.sampled_from([0, 8, -1, None, "all"]),
    "training.dense_optimizer": st.sampled_from(["adam", "nadam", {"type": "sgd", "lr": 0.1}]),
    "embedding.dim": st.sampled_from([0, 4, -2, "four", [4]]),
    "embedding.optimizer": st.sampled_from(["sgd", "adagrad", "adamw", {"type": "adam"}]),
    "embedding.shards": st.sampled_from([1, 2, 0]),
    "model.type": st.sampled_from(["dnn", "dlrm", "dcn_v2", "mlp", "no_such_module:Model"]),
    "model.args": st.sampled_from([{}, {"hidden": [4]}, {"hiden": [4]}, {"hidden": "4"}, None]),
    "data.format": st.sampled_from(["auto", "csv", "parquet", "tsv", "xls"]),
    "data.ids": st.sampled_from([["user"], ["user", "country"], ["usr"], [], "user", None]),
    "data.dense": st.sampled_from([["age"], [], ["agee"], {"age": {"log1p": True}}, None]),
    "data.label": st.sampled_from(
        [
            {"column": "income", "positive": [">50K"]},
            {"column": "income", "positive": [">50k"]},
            {"column": "income"},
            {"column": "incom", "positive": [">50K"]},
            {"column": "age", "threshold": 40},
            "age",
        ]
    ),
    "data.train": st.sampled_from(["train.{ext}", "trian.{ext}", "*.{ext}", "", None]),
    "data.test": st.sampled_from(["test.{ext}", None, "tset.{ext}"]),
}

# ways to break the training file
_CORRUPTIONS = ("none", "truncate", "garbage", "empty", "drop_column", "text_in_dense", "one_class")


def _table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "user": [f"u{i % 5}" for i in range(rows)],
            "country": [["US", "DE"][i % 2] for i in range(rows)],
            "age": rng.integers(18, 80, rows).astype(np.float64),
            "income": [">50K" if i % 3 == 0 else "<=50K" for i in range(rows)],
        }
    )


def _write(table: pa.Table, path: Path) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)


def _corrupt(path: Path, how: str, data: st.DataObject) -> None:
    table = _table(ROWS, 0)
    if how == "drop_column":
        table = table.drop_columns([data.draw(st.sampled_from(table.column_names))])
    elif how == "text_in_dense":
        ages = [str(int(x)) for x in table["age"].to_pylist()]
        ages[data.draw(st.integers(0, ROWS - 1))] = "n/a"
        table = table.set_column(2, "age", pa.array(ages))
    elif how == "one_class":
        table = table.set_column(3, "income", pa.array(["<=50K"] * ROWS))
    _write(table, path)
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(1, max(1, len(raw) - 1)))])
    elif how == "garbage":
        at = data.draw(st.integers(0, len(raw)))
        junk = data.draw(st.binary(min_size=1, max_size=16))
        path.write_bytes(raw[:at] + junk + raw[at:])
    elif how == "empty":
        path.write_bytes(b"")


def _set_items(data: st.DataObject, ext: str) -> list[str]:
    items = []
    for key in data.draw(st.lists(st.sampled_from(sorted(_VALUES)), max_size=3, unique=True)):
        value = data.draw(_VALUES[key])
        if isinstance(value, str):
            value = value.format(ext=ext)
        items.append(f"{key}={json.dumps(value)}")
    # and now and then a --set that is malformed in itself
    items += data.draw(
        st.lists(st.sampled_from(["training", "=1", "training..x=1", "data.ids.x=1"]), max_size=1)
    )
    return items


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    fmt=st.sampled_from(["parquet", "csv"]),
    how=st.sampled_from(_CORRUPTIONS),
    data=st.data(),
)
def test_every_outcome_is_a_clean_run_or_exit_2(fmt: str, how: str, data: st.DataObject) -> None:
    ext = "parquet" if fmt == "parquet" else "csv"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _corrupt(d / f"train.{ext}", how, data)
        _write(_table(16, 1), d / f"test.{ext}")
        job = {
            "data": {
                "train": f"train.{ext}",
                "test": f"test.{ext}",
                "ids": ["user", "country"],
                "dense": ["age"],
                "label": {"column": "income", "positive": [">50K"]},
                **({"header": True} if fmt == "csv" else {}),
            },
            "embedding": {"dim": 4},
            "model": {"type": "dnn", "args": {"hidden": [4]}},
            "training": {
                "batch_size": 8,
                "max_samples": 8,  # one tiny batch
                "epochs": 1,
                "staleness": 1,
                "progress": "none",
                "eval_batch_size": 16,
            },
        }
        path = d / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        argv = ["train", str(path)]
        for item in _set_items(data, ext):
            argv += ["--set", item]
        capture = _Capture()
        with capture:
            status = main(argv)  # anything raised here is a traceback for the user
        event(f"exit status {status}")
        assert status in (0, EXIT_BAD_INPUT), (status, capture.err)
        if status == 0:
            result = json.loads(capture.out.strip().splitlines()[-1])
            assert result["train_samples"] > 0 and result["train_batches"] > 0
        else:
            assert capture.err.startswith("persia train: error: "), capture.err
            assert "Traceback" not in capture.err
            assert capture.out == ""


class _Capture:
    """stdout and stderr of one call (hypothesis runs many examples in one test call)."""

    def __enter__(self) -> _Capture:
        import contextlib
        import io

        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="persia")
