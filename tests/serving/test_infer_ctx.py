"""persia.ctx.InferCtx: a model trained with TrainCtx, dumped with dump_checkpoint, served in a
fresh context gives the training runtime's embeddings and predictions (PERSIA's handler shape)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from runtime._jobs import embedding_file, make_batches, run, to_persia, train_ctx

from persia.ctx import InferCtx, eval_ctx
from persia.ctx._stack import last_runtime
from persia.embedding.config import parse_global_config
from persia.embedding.data import IDTypeFeature, IDTypeFeatureWithSingleID, PersiaBatch
from persia.errors import BackendError, BatchError, ConfigError, PersiaError


class JitNet(torch.nn.Module):
    """runtime._jobs.Net, scriptable (dump_checkpoint(with_jit_model=True) scripts it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(3 + 8, 8)
        self.l2 = torch.nn.Linear(8, 1)

    def forward(self, non_id: list[torch.Tensor], embeddings: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([non_id[0]] + [e.flatten(1) for e in embeddings], dim=1)
        return torch.sigmoid(self.l2(torch.tanh(self.l1(x))))


def _unknown_ids_batch() -> PersiaBatch:
    """Two samples: IDs training never saw (and one empty sample of slot b)."""
    return PersiaBatch(
        [
            IDTypeFeatureWithSingleID("a", np.array([10**9, 3], np.uint64)),
            IDTypeFeature("b", [np.array([], np.uint64), np.array([10**9 + 1], np.uint64)]),
        ],
        non_id_type_features=to_persia(make_batches(1, batch_size=2)[0]).non_id_type_features,
        requires_grad=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train 30 batches, dump with the jit model, record eval_ctx's embeddings and predictions
    on the trained runtime, then empty and close that runtime (InferCtx must not lean on it)."""
    ckpt = tmp_path_factory.mktemp("infer") / "ckpt"
    model = JitNet()
    with train_ctx(model) as ctx:
        run(ctx, make_batches(30))
        ctx.dump_checkpoint(ckpt, with_jit_model=True)
    batches = [to_persia(b, requires_grad=False) for b in make_batches(3, seed=7)]
    batches.append(_unknown_ids_batch())
    expected = []
    model.eval()
    with eval_ctx(model=model) as ectx, torch.no_grad():
        rows = sum(ectx.get_embedding_size())
        for i, pb in enumerate(batches):
            item = ectx.runtime.lookup(pb, False, i, None)
            out, _ = ectx.forward(item)
            expected.append((item.lookup.summed.copy(), out.numpy().copy()))
        ectx.current_batch = None
        ectx.clear_embeddings()
    runtime = last_runtime()
    assert runtime is not None
    runtime.close()
    return SimpleNamespace(ckpt=ckpt, batches=batches, expected=expected, rows=rows)


def test_infer_ctx_serves_the_trained_embeddings_and_predictions(trained):
    jit = torch.jit.load(str(trained.ckpt / "jit_dense.pt"))
    ctx = InferCtx([], embedding_checkpoint=trained.ckpt, embedding_config_file=embedding_file())
    ctx.wait_for_serving()
    assert sum(ctx.get_embedding_size()) == trained.rows > 0
    for pb, (summed, output) in zip(trained.batches, trained.expected, strict=True):
        item = ctx.get_embedding_from_bytes(pb.to_bytes())
        np.testing.assert_array_equal(item.lookup.summed, summed)
        non_id, embeddings, labels = ctx.prepare_features(item)
        assert labels is None
        with torch.no_grad():
            np.testing.assert_allclose(jit(non_id, embeddings).numpy(), output, atol=1e-6)
        # get_embedding_from_data gives the same
        again = ctx.get_embedding_from_data(pb)
        np.testing.assert_array_equal(again.lookup.summed, summed)
    unknown = ctx.get_embedding_from_data(trained.batches[-1]).lookup.summed
    assert not unknown[0].any()  # IDs never trained read as zeros ...
    assert sum(ctx.get_embedding_size()) == trained.rows  # ... and create no row
    ctx.close()
    with pytest.raises(PersiaError, match="closed"):
        ctx.wait_for_serving()


class PersiaHandler:
    """Written the way PERSIA's examples/src/adult-income/serve_handler.py is (TorchServe's
    BaseHandler methods), serving in process: InferCtx([])."""

    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        self.model = torch.jit.load(str(model_dir / "jit_dense.pt"))
        self.persia_context = InferCtx([], embedding_config_file=context.embedding_config)
        self.persia_context.wait_for_serving()

    def preprocess(self, data):
        batch = bytes(data[0].get("batch"))
        batch = self.persia_context.get_embedding_from_bytes(batch, None)
        return self.persia_context.prepare_features(batch)

    def inference(self, data):
        non_id_type_tensors, id_type_tensors, _ = data
        with torch.no_grad():
            return self.model(non_id_type_tensors, id_type_tensors)

    def postprocess(self, data):
        return [torch.reshape(data, (-1,)).tolist()]


def test_persia_handler_shape_with_infer_config(trained, monkeypatch, tmp_path):
    """global_config.yml's infer_config.embedding_checkpoint names the checkpoint."""
    config = tmp_path / "global_config.yml"
    config.write_text(
        "common_config:\n  job_type: Infer\n"
        f"  infer_config: {{embedding_checkpoint: {trained.ckpt}}}\n"
    )
    monkeypatch.setenv("PERSIA_GLOBAL_CONFIG", str(config))
    handler = PersiaHandler()
    context = SimpleNamespace(
        system_properties={"model_dir": str(trained.ckpt)}, embedding_config=embedding_file()
    )
    handler.initialize(context)
    for pb, (_, output) in zip(trained.batches, trained.expected, strict=True):
        request = [{"batch": bytearray(pb.to_bytes())}]
        result = handler.postprocess(handler.inference(handler.preprocess(request)))
        np.testing.assert_allclose(result[0], output.reshape(-1), atol=1e-6)
    with pytest.raises(BatchError, match="CRC-32 mismatch"):
        data = bytearray(trained.batches[0].to_bytes())
        data[-1] ^= 0x01
        handler.preprocess([{"batch": data}])
    handler.persia_context.close()


def test_infer_ctx_refusals(trained, monkeypatch):
    monkeypatch.delenv("PERSIA_GLOBAL_CONFIG", raising=False)
    with pytest.raises(BackendError, match="Pass an empty list to serve in this process"):
        InferCtx(["embedding_worker:8887"], embedding_checkpoint=trained.ckpt, backend="local")
    with pytest.raises(ConfigError, match="needs an embedding checkpoint"):
        InferCtx([], embedding_config_file=embedding_file(), global_config_file=None)
    with pytest.raises(PersiaError, match="backend must be 'local' or 'ray'"):
        InferCtx([], embedding_checkpoint=trained.ckpt, backend="mpi")
    ctx = InferCtx([], embedding_checkpoint=trained.ckpt, embedding_config_file=embedding_file())
    with pytest.raises(PersiaError, match="expects a PersiaBatch"):
        ctx.get_embedding_from_data(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(PersiaError, match="device_id=3"):
        ctx.get_embedding_from_data(trained.batches[0], 3)
    rows = sum(ctx.get_embedding_size())
    for change in (ctx.clear_embeddings, lambda: ctx.load_embedding(trained.ckpt)):
        with pytest.raises(PersiaError, match="read-only store"):
            change()
    assert sum(ctx.get_embedding_size()) == rows
    ctx.close()


def test_train_ctx_refuses_job_type_infer():
    from runtime._jobs import Net

    glob = parse_global_config({"common_config": {"job_type": "Infer"}})
    with pytest.raises(ConfigError, match="job_type: Infer makes the parameter servers read-only"):
        with train_ctx(Net(), global_config_file=glob):
            pass


def test_eval_ctx_under_job_type_infer_serves_the_checkpoint(trained):
    """job_type: Infer makes eval_ctx use inference-mode parameter servers, as PERSIA's: the
    checkpoint infer_config names, read-only, not the training runtime alive in this process;
    a second context on the same checkpoint uses the same servers."""
    from persia.checkpoint.follow import ServingRuntime
    from persia.data import DataLoader, IterableDataset

    class Batches(IterableDataset):
        def __iter__(self):
            yield from trained.batches

    glob = parse_global_config(
        {
            "common_config": {
                "job_type": "Infer",
                "infer_config": {"embedding_checkpoint": str(trained.ckpt)},
            }
        }
    )
    jit = torch.jit.load(str(trained.ckpt / "jit_dense.pt"))
    with train_ctx(JitNet()) as train:  # another, live training store in this process
        run(train, make_batches(2, seed=5))
        with eval_ctx(model=jit, global_config_file=glob) as ctx, torch.no_grad():
            runtime = ctx.runtime
            assert isinstance(runtime, ServingRuntime)
            assert sum(ctx.get_embedding_size()) == trained.rows
            outputs = [ctx.forward(b)[0].numpy() for b in DataLoader(Batches())]
            ctx.current_batch = None
            for out, (_, expected) in zip(outputs, trained.expected, strict=True):
                np.testing.assert_allclose(out, expected, atol=1e-6)
            with pytest.raises(PersiaError, match="read-only"):
                ctx.clear_embeddings()
            with pytest.raises(PersiaError, match="read-only"):
                ctx.load_embedding(trained.ckpt)
            assert sum(ctx.get_embedding_size()) == trained.rows  # no row created or dropped
        with eval_ctx(model=jit, global_config_file=glob) as again:
            assert again.runtime is runtime
        assert train.runtime is not runtime and train.runtime.training_allowed
    runtime.close()
