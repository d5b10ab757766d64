"""Serving export: raw rows -> the same probabilities as the training process, in a fresh
process that imports only persia; tampered exports refused; unknown IDs read as zeros."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.csv as pacsv
import pytest
import torch

from persia.cli.main import EXIT_BAD_INPUT, main
from persia.errors import BatchError, CheckpointError
from persia.job.config import JobConfig, load_job

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"
TRAIN_SAMPLES = 2048


def _job(tmp: Path) -> JobConfig:
    return load_job(
        ADULT,
        [
            f"training.max_samples={TRAIN_SAMPLES}",
            "training.progress=none",
            f"training.checkpoint_dir={tmp / 'ckpt'}",
        ],
    )


def _training_predictions(job: JobConfig, checkpoint: Path) -> np.ndarray:
    """Test-set probabilities through the training code path (reader, embedding worker, store,
    model), from the job's final checkpoint: what ``evaluate`` computes its AUC from."""
    from persia.ctx import TrainCtx
    from persia.embedding import EmbeddingConfig
    from persia.job.models import build_model
    from persia.job.readers import JobReader
    from persia.job.runner import dense_optimizer, embedding_configs, embedding_optimizer

    reader = JobReader(job.data)
    model = build_model(
        job.model.type, job.model.args, len(job.data.dense), [s.dim for s in job.embedding.slots]
    )
    emb_file, global_file = embedding_configs(job)
    preds = []
    with TrainCtx(
        embedding_optimizer(job),
        dense_optimizer(job, model),
        model=model,
        embedding_config=EmbeddingConfig(),
        embedding_config_file=emb_file,
        global_config_file=global_file,
    ) as ctx:
        ctx.load_checkpoint(checkpoint)
        model.eval()
        with torch.no_grad():
            assert job.data.test is not None
            for i, pb in enumerate(reader.batches(job.data.test, 4096, training=False)):
                item = ctx.runtime.lookup(pb, False, i, None)
                output, _ = ctx.forward(item)
                preds.append(torch.sigmoid(output).numpy().reshape(-1))
        ctx.current_batch = None
    return np.concatenate(preds)


def _raw_test_table(job: JobConfig) -> pa.Table:
    """The test file's raw rows, every column as text (as a request would carry them)."""
    assert job.data.test is not None and job.data.columns is not None
    path = job.data.test.files()[0]
    cols = list(job.data.columns)
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=cols, skip_rows=job.data.test.skip_rows),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in cols}),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from persia.serving import run_and_export

    tmp = tmp_path_factory.mktemp("serving")
    job = _job(tmp)
    result = run_and_export(job, tmp / "export")
    return {"tmp": tmp, "job": job, "result": result, "export": tmp / "export"}


def test_served_predictions_equal_training_in_a_fresh_process(trained: dict[str, Any]) -> None:
    from persia.metrics import roc_auc

    job, tmp = trained["job"], trained["tmp"]
    expected = _training_predictions(job, tmp / "ckpt")
    table = _raw_test_table(job)
    assert table.num_rows == expected.shape[0] == trained["result"]["test_samples"]
    # the training-path predictions are the ones the job's own evaluation scored
    raw_labels = pa.compute.utf8_trim_whitespace(table.column("income_bracket"))
    labels = np.isin(raw_labels.to_numpy(zero_copy_only=False), [">50K", ">50K."])
    assert roc_auc(labels.astype(np.float64), expected.astype(np.float64)) == pytest.approx(
        trained["result"]["test_auc"], abs=1e-9
    )
    # a fresh interpreter that imports only persia.serving (no job file, no training code)
    raw = tmp / "raw_test.arrow"
    request = table.drop_columns(["income_bracket"])
    with pa.OSFile(str(raw), "wb") as sink, pa.ipc.new_file(sink, request.schema) as w:
        w.write_table(request)
    code = (
        "import sys, numpy as np, pyarrow as pa\n"
        "import persia.serving as serving\n"
        "p = serving.load(sys.argv[1])\n"
        "t = pa.ipc.open_file(sys.argv[2]).read_all()\n"
        "np.save(sys.argv[3], p.predict(t))\n"
        "print(sorted(m for m in sys.modules if m.startswith('persia.job')))\n"
    )
    out = tmp / "served.npy"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(trained["export"]), str(raw), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp,
        check=True,
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # the job layer was never imported
    served = np.load(out)
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)


def test_list_of_dicts_and_python_values(trained: dict[str, Any]) -> None:
    from persia import serving

    p = serving.load(trained["export"])
    table = _raw_test_table(trained["job"]).slice(0, 20)
    from_table = p.predict(table)
    rows = table.to_pylist()
    for r in rows:  # numbers as Python numbers, text with its leading blank
        r["age"] = int(r["age"])
        r["hours_per_week"] = float(r["hours_per_week"])
        del r["income_bracket"]
    np.testing.assert_allclose(p.predict(rows), from_table, rtol=0, atol=1e-7)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    np.testing.assert_allclose(p.predict(columns), from_table, rtol=0, atol=1e-7)
    assert "income_bracket" in p.label_meaning and ">50K" in p.label_meaning
    with pytest.raises(BatchError, match="missing column.*'age'"):
        p.predict([{k: v for k, v in rows[0].items() if k != "age"}])
    for empty in ([], table.slice(0, 0), {k: [] for k in rows[0]}):
        out = p.predict(empty)
        assert out.shape == (0,) and out.dtype == np.float32


def test_unknown_ids_read_as_zeros(trained: dict[str, Any]) -> None:
    from persia import serving

    p = serving.load(trained["export"])
    row = _raw_test_table(trained["job"]).slice(0, 1).to_pylist()[0]
    row["occupation"] = "Astronaut-on-Mars"
    non_id, emb = p.features([row])
    slot = [s["name"] for s in p.meta["slots"]].index("occupation")
    assert torch.count_nonzero(emb[slot]) == 0
    assert all(torch.count_nonzero(e) > 0 for i, e in enumerate(emb) if i != slot)
    assert np.isfinite(p.predict([row])).all()


def test_features_match_the_training_reader(trained: dict[str, Any]) -> None:
    """IDs (via the keys' rows) and standardised dense values equal the reader's."""
    from persia import serving
    from persia.job.readers import JobReader

    job = trained["job"]
    p = serving.load(trained["export"])
    reader = JobReader(job.data)
    assert job.data.test is not None
    chunk = next(reader.chunks(job.data.test))
    n = len(chunk)
    non_id, _ = p.features(_raw_test_table(job).slice(0, n))
    np.testing.assert_array_equal(non_id[0].numpy(), chunk.dense)
    table = _raw_test_table(job).slice(0, n)
    for j, slot in enumerate(p.meta["slots"]):
        ids, lengths = p._ids(slot, table.column(slot["column"]).combine_chunks())
        np.testing.assert_array_equal(ids, chunk.ids[j][0])
        np.testing.assert_array_equal(lengths, chunk.ids[j][1])


def test_cli_export_of_the_checkpoint_equals_the_training_export(
    trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from persia import serving

    out = trained["tmp"] / "cli_export"
    set_ckpt = f"training.checkpoint_dir={trained['tmp'] / 'ckpt'}"
    rc = main(
        [
            "export",
            str(ADULT),
            "--checkpoint",
            str(trained["tmp"] / "ckpt"),
            "--out",
            str(out),
            "--set",
            set_ckpt,
        ]
    )
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["rows"] == {"8": trained["result"]["embedding_rows"]}
    table = _raw_test_table(trained["job"]).slice(0, 500)
    a = serving.load(trained["export"]).predict(table)
    b = serving.load(out).predict(table)
    np.testing.assert_array_equal(a, b)
    rc = main(
        ["export", str(ADULT), "--checkpoint", str(trained["tmp"] / "no-such"), "--out", str(out)]
    )
    assert rc == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["values", "model", "manifest", "truncated"])
def test_tampered_export_is_refused(trained: dict[str, Any], tmp_path: Path, what: str) -> None:
    import shutil

    from persia import serving

    copy = tmp_path / "export"
    shutil.copytree(trained["export"], copy)
    gen = sorted(copy.glob("gen-*"))[-1]
    if what == "manifest":
        path = gen / "manifest.json"
        doc = json.loads(path.read_text())
        doc["meta"]["slots"][0]["prefix"] = 9
        path.write_text(json.dumps(doc))
    else:
        path = gen / ("d8.values.npy" if what in ("values", "truncated") else "dense_model.npy")
        data = bytearray(path.read_bytes())
        if what == "truncated":
            data = data[: len(data) - 8]
        else:
            data[-3] ^= 0x5A
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        serving.load(copy)


class _AdultHandler:
    """A handler shaped as PERSIA's examples/src/adult-income/serve_handler.py (TorchServe's
    initialize / preprocess / inference / postprocess over InferCtx), serving in process."""

    def initialize(self, context: Any) -> None:
        from persia.ctx import InferCtx

        self.model = context.model  # TorchServe would load it from the model archive
        self.persia_context = InferCtx(
            [],
            embedding_checkpoint=context.checkpoint,
            embedding_config_file=context.embedding_config,
            global_config_file=context.global_config,
        )
        self.persia_context.wait_for_serving()

    def preprocess(self, data: list[dict[str, Any]]) -> Any:
        batch = self.persia_context.get_embedding_from_bytes(bytes(data[0]["batch"]), None)
        return self.persia_context.prepare_features(batch)

    def inference(self, data: Any) -> torch.Tensor:
        non_id_type_tensors, id_type_tensors, _ = data
        with torch.no_grad():
            return torch.sigmoid(self.model(non_id_type_tensors, id_type_tensors))

    def postprocess(self, data: torch.Tensor) -> list[list[float]]:
        return [torch.reshape(data, (-1,)).tolist()]


def test_a_persia_handler_over_infer_ctx_equals_training_on_the_adult_test_set(
    trained: dict[str, Any],
) -> None:
    """The Adult job's checkpoint served by InferCtx through a PERSIA-shaped handler, requests as
    PersiaBatch.to_bytes() of the job reader's test batches: the predictions equal the training
    code path's on the same checkpoint to 1e-6."""
    from types import SimpleNamespace

    from persia import checkpoint
    from persia.job.models import build_model
    from persia.job.readers import JobReader
    from persia.job.runner import embedding_configs

    job, tmp = trained["job"], trained["tmp"]
    expected = _training_predictions(job, tmp / "ckpt")
    model = build_model(
        job.model.type, job.model.args, len(job.data.dense), [s.dim for s in job.embedding.slots]
    )
    model.load_state_dict(checkpoint.read(tmp / "ckpt").dense_model_state())
    model.eval()
    emb_file, global_file = embedding_configs(job)
    handler = _AdultHandler()
    handler.initialize(
        SimpleNamespace(
            model=model,
            checkpoint=tmp / "ckpt",
            embedding_config=emb_file,
            global_config=global_file,
        )
    )
    served: list[float] = []
    assert job.data.test is not None
    for pb in JobReader(job.data).batches(job.data.test, 4096, training=False):
        request = [{"batch": bytearray(pb.to_bytes())}]
        served.extend(handler.postprocess(handler.inference(handler.preprocess(request)))[0])
    handler.persia_context.close()
    np.testing.assert_allclose(np.array(served, np.float32), expected, rtol=0, atol=1e-6)


def test_open_model_serves_the_export_on_rows_and_batches(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """open_model recognises the export: predict equals load().predict, and predict_batch on the
    job reader's test batches equals the training code path to 1e-6."""
    from persia.errors import PersiaError
    from persia.job.readers import JobReader
    from persia.serving import load, open_model

    job, tmp = trained["job"], trained["tmp"]
    expected = _training_predictions(job, tmp / "ckpt")
    model = open_model(trained["export"])
    assert model.kind == "export" and model.freshness() is None
    table = _raw_test_table(job).slice(0, 300)
    np.testing.assert_array_equal(model.predict(table), load(trained["export"]).predict(table))
    served = []
    assert job.data.test is not None
    batches = list(JobReader(job.data).batches(job.data.test, 4096, training=False))
    for pb in batches:
        served.append(model.predict_batch(pb))
    np.testing.assert_allclose(np.concatenate(served), expected, rtol=0, atol=1e-6)
    info = model.info()
    assert [s["name"] for s in info["slots"]] == [s.name for s in job.embedding.slots]
    # features in another order, or a missing dense feature: a BatchError naming the order
    from persia.embedding.data import PersiaBatch

    pb = batches[0]
    swapped = PersiaBatch(
        pb.id_type_features[::-1], non_id_type_features=pb.non_id_type_features, requires_grad=False
    )
    with pytest.raises(BatchError, match="in this order"):
        model.predict_batch(swapped)
    no_dense = PersiaBatch(pb.id_type_features, requires_grad=False)
    with pytest.raises(BatchError, match="one non-ID feature"):
        model.predict_batch(no_dense)
    with pytest.raises(PersiaError, match="does not follow deltas"):
        open_model(trained["export"], follow=tmp_path)
    # the job's own checkpoint has no TorchScript model; an empty folder is neither kind
    with pytest.raises(CheckpointError, match="holds no TorchScript dense model"):
        open_model(tmp / "ckpt")
    with pytest.raises(CheckpointError, match="neither a serving export nor a job checkpoint"):
        open_model(tmp_path)
    model.close()
    with pytest.raises(PersiaError, match="closed"):
        model.predict(table)
