"""The ``persia`` command: help, shipped job files, clean errors, overrides, eval/checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from persia.cli.main import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(ROOT.glob("examples/*/job.yaml"))
KEYS = (
    "test_auc",
    "test_logloss",
    "samples_per_s",
    "wall_s",
    "staleness_max",
    "staleness_mean",
    "embedding_rows",
)


def _last_json(out: str) -> dict:
    lines = out.strip().splitlines()
    return json.loads(lines[-1])


def test_help_of_command_and_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in (
        (["--help"], "train"),
        (["train", "--help"], "--set KEY=VALUE"),
        (["validate", "--help"], "--data"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert needle in capsys.readouterr().out


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom persia.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'numba' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_shipped_job_files_exist() -> None:
    names = {p.parent.name for p in SHIPPED}
    assert {"adult_income", "criteo"} <= names


@pytest.mark.parametrize("job", SHIPPED, ids=lambda p: p.parent.name)
def test_every_shipped_job_validates_and_runs_short(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--data", str(job)]) == 0
    assert "OK" in capsys.readouterr().out
    argv = ["train", str(job), "--progress", "log"]
    argv += ["--set", "training.max_samples=256", "--set", "training.eval_max_samples=512"]
    assert main(argv) == 0
    result = _last_json(capsys.readouterr().out)
    for key in KEYS:
        assert key in result
    assert result["train_samples"] == 256
    assert result["embedding_rows"] > 0


def _broken(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "examples/adult_income/job.yaml").read_text())
    raw["data"]["train"] = str(ROOT / "examples/adult_income/data/adult.data.gz")
    raw["data"]["test"]["paths"] = str(ROOT / "examples/adult_income/data/adult.test.gz")
    raw["training"]["stalenes"] = 2  # unknown key
    raw["training"]["batch_size"] = "big"  # wrong type
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_broken_job_is_one_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _broken(tmp_path)
    for command in ("validate", "train"):
        assert main([command, str(path)]) == EXIT_BAD_INPUT
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        assert "2 problems" in captured.err
        assert "training.stalenes: unknown key" in captured.err
        assert "training.batch_size: expected an int >= 1, got 'big'" in captured.err


def test_validate_data_lists_missing_column_and_non_binary_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train.csv").write_text("user,item,click\nu1,i1,0\nu2,i2,1\nu3,i1,2\n")
    raw = {
        "data": {
            "train": "train.csv",
            "header": True,
            "ids": ["user", "item", "region"],  # no 'region' in the file
            "label": "click",  # 0, 1, 2: not binary
        }
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0  # the file itself is fine
    capsys.readouterr()
    assert main(["validate", "--data", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "2 problems" in err
    assert "missing column(s) 'region'" in err
    assert "label column 'click' is not binary" in err and "2.0" in err
    assert "Traceback" not in err
    # the same data with a text file whose columns do not match data.columns
    raw["data"].update(header=False, columns=["user", "item", "region", "click"], skip_rows=1)
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", "--data", str(path)]) == EXIT_BAD_INPUT
    assert "Expected 4 columns, got 3" in capsys.readouterr().err


def test_ray_backend_and_bad_override_are_clean_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = str(ROOT / "examples/criteo/job.yaml")
    # cluster options without the ray backend (the ray backend itself: tests/backends)
    assert main(["train", job, "--num-ps", "2"]) == EXIT_BAD_INPUT
    assert "--num-ps need --backend ray" in capsys.readouterr().err
    assert main(["train", job, "--set", "training.staleness"]) == EXIT_BAD_INPUT
    assert "expected dotted.key=value" in capsys.readouterr().err


def test_overrides_reach_training_eval_and_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    argv = ["train", str(ROOT / "examples/criteo/job.yaml"), "--progress", "none"]
    for item in (
        "training.staleness=1",
        "training.epochs=1",
        "training.batch_size=50",
        "training.eval_every_batches=2",
        "training.checkpoint_every_batches=3",
        f"training.checkpoint_dir={ckpt}",
    ):
        argv += ["--set", item]
    assert main(argv) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["train_batches"] == 4 and result["batch_size"] == 50
    assert result["staleness_max"] == 0 and result["staleness_bound"] == 1
    assert [e["batch"] for e in result["evals"]] == [2, 4]
    assert all(e["test_samples"] == 100 for e in result["evals"])
    from persia.checkpoint import read

    saved = read(ckpt)  # a verified job checkpoint: rows, dense model and optimizer
    assert saved.meta["rows"] > 0
    assert any("dense" in name for name in saved.arrays)


def test_unexpected_errors_keep_their_traceback(tmp_path: Path) -> None:
    module = tmp_path / "persia_test_broken_model.py"
    module.write_text(
        "from torch import nn\n\nclass Broken(nn.Module):\n"
        "    def __init__(self):\n        raise RuntimeError('user bug')\n"
    )
    job = ROOT / "examples/criteo/job.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "persia.cli.main",
            "train",
            str(job),
            "--set",
            "model.type=persia_test_broken_model:Broken",
            "--set",
            "model.args={}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "user bug" in proc.stderr
