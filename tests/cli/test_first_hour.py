"""A newcomer's mistakes, Parquet and CSV alike: `persia train` refuses bad data before training
(every problem at once, exit 2, the field or column named, no traceback); what a run shows
(evaluations on stderr, the metrics file, the summary's fields); --version and --set's blame."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

import persia
from persia.cli.main import EXIT_BAD_INPUT, main

ROWS = 96


def _table(rows: int = ROWS, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "user": [f"u{i % 17}" for i in range(rows)],
            "country": [["US", "DE", "IN"][i % 3] for i in range(rows)],
            "age": rng.integers(18, 80, rows).astype(np.float64),
            "income": [">50K" if x else "<=50K" for x in rng.random(rows) < 0.4],
        }
    )


def _write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return path


def _job(tmp: Path, fmt: str, table: pa.Table | None = None, **data) -> Path:
    """A tiny job over train/test files of format ``fmt`` (``parquet`` or ``csv``), the
    training file holding ``table``; ``data`` overrides keys of the job's data section."""
    ext = ".parquet" if fmt == "parquet" else ".csv"
    _write(_table() if table is None else table, tmp / f"train{ext}")
    _write(_table(48, seed=1), tmp / f"test{ext}")
    raw = {
        "data": {
            "train": f"train{ext}",
            "test": f"test{ext}",
            "ids": ["user", "country"],
            "dense": ["age"],
            "label": {"column": "income", "positive": [">50K"]},
            **({"header": True} if fmt == "csv" else {}),
            **data,
        },
        "embedding": {"dim": 4},
        "model": {"type": "dnn", "args": {"hidden": [8]}},
        "training": {"batch_size": 32, "epochs": 1, "staleness": 2, "progress": "none"},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert main(argv) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.out == ""  # no result: nothing was trained
    for needle in needles:
        assert needle in captured.err, (needle, captured.err)
    return captured.err


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_train_refuses_bad_data_before_training(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ext = ".parquet" if fmt == "parquet" else ".csv"
    # a misspelled column: named, with the file's columns
    job = _job(tmp_path, fmt, ids=["user", "contry"])
    _refused(["train", str(job)], capsys, "missing column(s) 'contry'", f"train{ext}")
    # a misspelled positive value: one class only, with the values seen
    job = _job(tmp_path, fmt, label={"column": "income", "positive": [">50k"]})
    err = _refused(["train", str(job)], capsys, "label column 'income' has one class only")
    assert "'>50K'" in err and "'<=50K'" in err and "data.label.positive" in err
    # an all-zero label column (numeric labels)
    zeros = _table().set_column(3, "income", pa.array(np.zeros(ROWS)))
    job = _job(tmp_path, fmt, zeros, label="income")
    _refused(["train", str(job)], capsys, "data.train: label column 'income' has one class only")
    # zero training rows
    job = _job(tmp_path, fmt, _table().slice(0, 0))
    _refused(["train", str(job)], capsys, "data.train: no rows to train on")
    # a dense column that does not parse (late in the file: the whole column is checked)
    ages = [str(x) for x in range(ROWS - 1)] + ["forty"]
    bad = _table().set_column(2, "age", pa.array(ages))
    job = _job(tmp_path, fmt, bad)
    _refused(["train", str(job)], capsys, "dense column 'age': expected numbers")
    # every problem at once, missing files named by their field
    job = _job(tmp_path, fmt, ids=["user", "contry"], test=f"tset{ext}")
    _refused(
        ["train", str(job)],
        capsys,
        "2 problems",
        "missing column(s) 'contry'",
        f"data.test: no file matches '{tmp_path / ('tset' + ext)}'",
    )


def test_validate_without_data_checks_the_files_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job(tmp_path, "parquet", train="trian.parquet")
    _refused(["validate", str(job)], capsys, "data.train: no file matches", "trian.parquet")
    _refused(["train", str(job)], capsys, "data.train: no file matches", "trian.parquet")
    job = _job(tmp_path, "parquet")
    assert main(["validate", "--no-model", str(job)]) == 0
    assert "OK" in capsys.readouterr().out


def test_unexpected_read_errors_name_file_column_and_rows(tmp_path: Path) -> None:
    from persia.errors import BatchError, PersiaError
    from persia.job.config import load_job
    from persia.job.readers import JobReader

    # an int ID column with a value that is no int, after the rows validate samples
    table = _table(3000).append_column("item", pa.array([str(i) for i in range(2999)] + ["x"]))
    ids = {"user": {}, "item": {"type": "int"}}
    job = load_job(_job(tmp_path, "csv", table, ids=ids, test="train.csv"))
    reader = JobReader(job.data)
    assert reader.check() == []  # the first 2000 rows of IDs parse
    with pytest.raises(BatchError) as info:
        list(reader.batches(job.data.train, 512, training=False))
    msg = str(info.value)
    assert "train.csv, data rows 1-" in msg and "'item'" in msg

    # anything else that goes wrong converting a column becomes a PersiaError too
    def broken(*a, **k):
        raise ValueError("boom")

    reader = JobReader(load_job(_job(tmp_path, "parquet")).data)
    reader._ids = broken  # type: ignore[method-assign]
    with pytest.raises(PersiaError, match=r"train\.parquet, data rows 1-96: column 'user'.*boom"):
        list(reader.batches(reader.spec.train, 32, training=False))


def test_a_run_shows_evaluations_metrics_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    job = _job(tmp_path, "parquet")
    metrics = tmp_path / "m.jsonl"
    argv = ["train", str(job), "--metrics-file", str(metrics)]
    argv += ["--set", "training.eval_every_batches=1", "--set", "training.log_every_batches=1"]
    with caplog.at_level(logging.INFO, logger="persia"):
        assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = [r.getMessage() for r in caplog.records]
    # --progress none hides the progress, not the evaluations
    assert [m.split(":")[0] for m in logged if "eval at batch" in m] == [
        "eval at batch 1",
        "eval at batch 2",
        "eval at batch 3",
    ]
    assert result["backend"] == "local" and result["num_nn_workers"] == 1
    assert result["num_ps"] == 1 and result["persia_version"] == persia.__version__
    assert result["samples_per_s"] == pytest.approx(result["train_samples"] / result["train_s"])
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    events = [x["event"] for x in lines]
    assert events == ["train", "eval"] * 3 + ["result"]
    assert [x["batch"] for x in lines if x["event"] == "train"] == [1, 2, 3]
    assert all(x["loss"] > 0 and x["samples_per_s"] > 0 for x in lines if x["event"] == "train")
    assert lines[1]["test_samples"] == 48 and lines[-1]["train_samples"] == ROWS


def test_the_bar_has_a_total_when_the_rows_are_known(tmp_path: Path) -> None:
    import io

    from persia.job.config import load_job
    from persia.job.readers import JobReader
    from persia.job.runner import _Progress, _total_samples

    job = load_job(_job(tmp_path, "parquet"), ["training.epochs=2"])
    assert _total_samples(JobReader(job.data), job, None, 1) == 2 * ROWS
    job = load_job(_job(tmp_path, "csv"), ["training.max_samples=50"])
    reader = JobReader(job.data)
    reader.stats  # noqa: B018 - the pass over the files counts the rows
    assert _total_samples(reader, job, None, 1) == 50
    stream = io.StringIO()
    progress = _Progress("bar", 100, 2 * ROWS, stream)
    progress.begin()
    progress.step(1, 32, 0.5, 0)
    progress.bar.refresh()
    progress.close()
    assert "32.0/192" in stream.getvalue() and "<" in stream.getvalue()  # total and ETA


def test_version_and_bad_set_blamed_on_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"persia {persia.__version__}"
    job = _job(tmp_path, "parquet")
    err = _refused(["validate", str(job), "--set", "training.staleness=lots"], capsys, "in --set:")
    assert "training.staleness: expected" in err and "(from --set training.staleness=lots)" in err
    (tmp_path / "job.yaml").write_text(
        (tmp_path / "job.yaml").read_text().replace("batch_size: 32", "batch_size: big")
    )
    err = _refused(
        ["validate", str(job), "--set", "training.staleness=lots"], capsys, "with --set: 2"
    )
    assert "training.batch_size: expected an int >= 1, got 'big'\n" in err


def test_one_sample_batches_and_batch_norm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The built-in dnn uses batch normalisation: batch_size 1 is refused; a last batch of one
    sample (65 rows in batches of 32) is skipped, not a crash."""
    job = _job(tmp_path, "parquet", _table(65))
    _refused(["train", str(job), "--set", "training.batch_size=1"], capsys, "batch normalisation")
    assert main(["train", str(job)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["train_batches"] == 3 and result["skipped_batches"] == 1
