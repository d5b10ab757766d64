"""Built-in and user models: shapes, argument checks, a few training steps on the Criteo sample."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from persia.errors import ConfigError
from persia.job.config import load_job
from persia.job.models import DLRM, DNN, DCNv2, build_model
from persia.job.runner import run_job

ROOT = Path(__file__).resolve().parents[2]
USER_MODEL = """
import torch
from torch import nn


class TinyModel(nn.Module):
    def __init__(self, width, hidden=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, non_id, embeddings):
        return torch.sigmoid(self.net(torch.cat([*non_id, *embeddings], dim=1)))
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's model module, importable as ``persia_test_user_model``."""
    (tmp_path / "persia_test_user_model.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "persia_test_user_model:TinyModel"


CRITEO = ROOT / "examples" / "criteo" / "job.yaml"


@pytest.mark.parametrize("cls", [DNN, DLRM, DCNv2])
def test_builtin_shapes_with_raw_slots_and_mixed_dims(cls) -> None:
    torch.manual_seed(0)
    model = cls(3, [4, 4, 6])
    dense = [torch.randn(5, 3)]
    raw = torch.randn(5, 2, 7)
    raw[:, :, -1] = torch.tensor([[1.0, 0.0]] * 5)  # the mask channel
    out = model(dense, [torch.randn(5, 4), torch.randn(5, 4), raw])
    assert out.shape == (5, 1) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["dnn", "dlrm", "dcn_v2"])
def test_builtin_without_dense_features(kind: str) -> None:
    model = build_model(kind, {}, 0, [4, 4])
    out = model([], [torch.randn(3, 4), torch.randn(3, 4)])
    assert out.shape == (3, 1)


def test_model_argument_errors(user_module: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model("dnn", {"hiden": [3], "dense_size": 4}, 2, [4])
    assert "model.args.hiden: not an argument of dnn" in str(info.value)
    with pytest.raises(ConfigError, match="structure"):
        build_model("dcn_v2", {"structure": "sideways"}, 2, [4])
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.mod'"):
        build_model("no_such_pkg.mod:Cls", {}, 2, [4])
    with pytest.raises(ConfigError, match="model.args.width: required"):
        build_model(user_module, {}, 2, [4])


@pytest.mark.parametrize("kind", ["dnn", "dlrm", "dcn_v2"])
def test_builtins_train_a_few_steps_on_the_criteo_sample(kind: str) -> None:
    job = load_job(
        CRITEO,
        [
            f"model.type={kind}",
            "model.args={}",
            "training.max_samples=96",
            "training.progress=none",
        ],
    )
    result = run_job(job)
    assert result["train_batches"] == 3 and result["train_samples"] == 96
    assert math.isfinite(result["train_loss"]) and result["test_samples"] == 100
    assert 0.0 <= result["test_auc"] <= 1.0 and result["embedding_rows"] > 0


def test_user_model_with_probability_output(user_module: str) -> None:
    width = 13 + 26 * 4
    job = load_job(
        CRITEO,
        [
            f"model.type={user_module}",
            f"model.args={{width: {width}}}",
            "model.output=probability",
            "embedding.dim=4",
            "training.max_samples=64",
            "training.progress=none",
        ],
    )
    result = run_job(job)
    assert result["train_samples"] == 64 and math.isfinite(result["test_logloss"])
