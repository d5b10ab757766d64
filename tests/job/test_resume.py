"""``persia train --resume``: a job stopped part-way and resumed from its last checkpoint ends
bit-identical to an uninterrupted run (staleness 1, reproducible order); bad directories give a
clean CheckpointError (exit status 2)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from persia import checkpoint
from persia.cli.main import EXIT_BAD_INPUT, main
from persia.errors import CheckpointError
from persia.job.config import load_job
from persia.job.runner import run_job

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income"
TRAIN_ROWS = 1500  # 23 full batches of 64 and one of 28 per epoch
BATCH = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("resume-data")
    with gzip.open(ADULT / "data" / "adult.data.gz", "rt") as f:
        lines = [ln for ln in f if ln.strip()][:TRAIN_ROWS]
    (tmp / "train.csv").write_text("".join(lines))
    with gzip.open(ADULT / "data" / "adult.test.gz", "rt") as f:
        lines = [ln for ln in f if ln.strip()][1:1001]
    (tmp / "test.csv").write_text("".join(lines))
    return tmp


def _overrides(data: Path, ckpt: Path, max_samples: int | None) -> list[str]:
    return [
        f"data.train={data / 'train.csv'}",
        f"data.test={{paths: {data / 'test.csv'}, skip_rows: 0}}",
        f"training.batch_size={BATCH}",
        "training.epochs=2",
        "training.staleness=1",
        "training.reproducible=true",
        "training.progress=none",
        f"training.checkpoint_dir={ckpt}",
        "training.checkpoint_every_batches=10",
        f"training.max_samples={'null' if max_samples is None else max_samples}",
    ]


def _state(ckpt: Path) -> tuple[dict[int, tuple[np.ndarray, ...]], dict[str, torch.Tensor], Any]:
    """Embedding rows by key (values and optimizer state), dense model, dense optimizer."""
    c = checkpoint.read(ckpt)
    rows = {}
    for dim in c.meta["dims"]:
        keys, values, state = [], [], []
        for i in range(int(c.meta["num_shards"])):
            if f"s{i}.d{dim}.keys" in c.arrays:
                keys.append(c.arrays[f"s{i}.d{dim}.keys"])
                values.append(c.arrays[f"s{i}.d{dim}.values"])
                state.append(c.arrays[f"s{i}.d{dim}.state"])
        k = np.concatenate(keys)
        order = np.argsort(k)
        rows[int(dim)] = (k[order], np.concatenate(values)[order], np.concatenate(state)[order])
    return rows, c.dense_model_state(), c.dense_optimizer_state()


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ckpt = tmp_path_factory.mktemp("full") / "ckpt"
    result = run_job(load_job(ADULT / "job.yaml", _overrides(data, ckpt, None)))
    return {"result": result, "ckpt": ckpt}


@pytest.mark.parametrize(
    ("stop", "epoch", "batch"),
    [
        (10 * BATCH, 0, 10),  # inside the first epoch, at a periodic checkpoint
        (TRAIN_ROWS + 6 * BATCH, 1, 6),  # inside the second epoch, the final checkpoint
    ],
)
def test_resume_matches_an_uninterrupted_run(
    data: Path, tmp_path: Path, uninterrupted: dict[str, Any], stop: int, epoch: int, batch: int
) -> None:
    ckpt = tmp_path / "ckpt"
    first = run_job(load_job(ADULT / "job.yaml", _overrides(data, ckpt, stop)))
    assert first["train_samples"] == stop
    info = checkpoint.read(ckpt)
    assert info.position["epoch"] == epoch and info.position["batch"] == batch
    assert info.position["samples"] == stop
    assert info.config is not None and info.config["training"]["batch_size"] == BATCH

    resumed = run_job(load_job(ADULT / "job.yaml", _overrides(data, ckpt, None)), resume=ckpt)
    full = uninterrupted["result"]
    assert resumed["resumed_from"]["samples"] == stop
    assert resumed["train_samples"] + stop == full["train_samples"]
    assert resumed["train_batches"] + first["train_batches"] == full["train_batches"]
    # bit-exact: the same final metrics, embeddings, optimizer state and dense model
    assert resumed["test_auc"] == full["test_auc"]
    assert resumed["test_logloss"] == full["test_logloss"]
    rows_a, model_a, opt_a = _state(uninterrupted["ckpt"])
    rows_b, model_b, opt_b = _state(ckpt)
    assert rows_a.keys() == rows_b.keys()
    for dim in rows_a:
        for x, y in zip(rows_a[dim], rows_b[dim], strict=True):
            np.testing.assert_array_equal(x, y)
    for name in model_a:
        torch.testing.assert_close(model_a[name], model_b[name], rtol=0, atol=0)
    for pid, st in opt_a["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(v, opt_b["state"][pid][k], rtol=0, atol=0)
    assert checkpoint.read(ckpt).position == checkpoint.read(uninterrupted["ckpt"]).position


def test_resume_from_a_missing_or_bad_directory(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = load_job(ADULT / "job.yaml", _overrides(data, tmp_path / "ckpt", 256))
    with pytest.raises(CheckpointError, match="does not exist"):
        run_job(job, resume=tmp_path / "no-such-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        run_job(job, resume=tmp_path / "empty")
    args = ["train", str(ADULT / "job.yaml"), "--resume", str(tmp_path / "no-such-dir")]
    for o in _overrides(data, tmp_path / "ckpt", 256):
        args += ["--set", o]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "persia train: error:" in err and "no-such-dir" in err and "Traceback" not in err


def test_resume_needs_a_saved_position(data: Path, tmp_path: Path) -> None:
    """A job checkpoint written without a data position cannot be resumed (clean error)."""
    job = load_job(ADULT / "job.yaml", _overrides(data, tmp_path / "ckpt", 256))
    run_job(job)
    c = checkpoint.read(tmp_path / "ckpt")
    from persia.store.checkpoint import write_generation

    meta = dict(c.meta)
    meta["position"] = {"epoch": 0}
    write_generation(tmp_path / "ckpt", c.arrays, meta, kind=checkpoint.KIND)
    with pytest.raises(CheckpointError, match=r"position\.batch must be an integer"):
        run_job(job, resume=tmp_path / "ckpt")


def test_cli_resume_prints_where_it_resumed(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    base = ["train", str(ADULT / "job.yaml")]
    sets = [x for o in _overrides(data, ckpt, 5 * BATCH) for x in ("--set", o)]
    assert main(base + sets) == 0
    capsys.readouterr()
    sets = [x for o in _overrides(data, ckpt, 8 * BATCH) for x in ("--set", o)]
    sets += ["--set", "training.progress=log", "--set", "training.log_every_batches=1"]
    sets += ["--set", "training.checkpoint_every_batches=7"]
    with caplog.at_level(logging.INFO, logger="persia"):
        assert main([*base, *sets, "--resume", str(ckpt)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["resumed_from"]["batches"] == 5
    assert out["train_batches"] == 3 and out["train_samples"] == 3 * BATCH
    # one batch counter: the job's, in every line of the resumed run
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"resumed from {ckpt} after batch 5 ") for m in logged)
    assert [m.split(" samples")[0] for m in logged if m.startswith("batch ")] == [
        "batch 6",
        "batch 7",
        "batch 8",
    ]
    assert f"checkpoint at batch 7: {ckpt}" in logged
