"""The in-process hybrid pipeline: staleness bound, eval mode, errors, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from persia.ctx import TrainCtx, eval_ctx
from persia.data import DataLoader, IterableDataset, StreamingDataset
from persia.embedding.data import IDTypeFeatureWithSingleID, Label, NonIDTypeFeature, PersiaBatch
from persia.embedding.optim import Adagrad
from persia.errors import BackendError, BatchError, ConfigError, PersiaError
from runtime._jobs import ListDataset, Net, embedding_file, make_batches

ROOT = Path(__file__).resolve().parents[2]


def train_ctx(model, raw=False, **kw):
    return TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(raw=raw),
        **kw,
    )


def train(ctx, loader, steps=None):
    losses = []
    for i, b in enumerate(loader):
        out, labels = ctx.forward(b)
        loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
        ctx.backward(loss)
        losses.append(loss.item())
        if steps is not None and i + 1 >= steps:
            break
    return losses


def test_an_old_runtime_error_does_not_fail_the_next_train_ctx(caplog):
    """A failure the previous job's runtime still holds (its applier failed after its context
    ended) is logged when the next TrainCtx closes that runtime, not raised into the new job."""
    with train_ctx(Net()) as ctx:
        train(ctx, DataLoader(ListDataset(make_batches(2)), embedding_staleness=1))
    old = ctx.runtime
    old._error = BackendError("stale failure of the old job", role="parameter-server", rank=0)
    with caplog.at_level("WARNING"):
        with train_ctx(Net()) as new:
            losses = train(new, DataLoader(ListDataset(make_batches(2)), embedding_staleness=1))
    assert new.runtime is not old and old.closed and len(losses) == 2
    assert "stale failure of the old job" in caplog.text


@pytest.mark.parametrize("size", [1, 3])
def test_backward_buffer_size_reaches_the_runtime(size):
    """TrainCtx(backward_buffer_size=n) bounds the gradient queue of its runtime at n (it was
    validated and then dropped: the runtime always buffered 10)."""
    with train_ctx(Net(), backward_buffer_size=size) as ctx:
        assert ctx.runtime.backward_buffer_size == size
        assert ctx.runtime._queue.maxsize == size
        train(ctx, DataLoader(ListDataset(make_batches(4)), embedding_staleness=2))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_never_more_than_k_batches_in_flight(k):
    """Instrument the worker: count lookups and applied gradients as they happen."""
    model = Net()
    with train_ctx(model) as ctx:
        worker = ctx.runtime.worker
        lock = threading.Lock()
        state = {"looked": 0, "applied": 0, "max_in_flight": 0, "seen": []}
        fwd, bwd = worker.forward, worker.backward

        def forward(batch, training):
            with lock:
                in_flight = state["looked"] - state["applied"]
                state["seen"].append(in_flight)
                state["looked"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], in_flight + 1)
            return fwd(batch, training)

        def backward(lookup, summed, raw):
            time.sleep(0.002)  # a slow parameter server makes staleness visible
            out = bwd(lookup, summed, raw)
            with lock:
                state["applied"] += 1
            return out

        worker.forward, worker.backward = forward, backward
        loader = DataLoader(ListDataset(make_batches(40)), embedding_staleness=k)
        train(ctx, loader)
        report = loader.staleness_report()
    assert state["max_in_flight"] <= k
    assert max(state["seen"]) <= k - 1
    assert report.batches == 40
    assert report.max == max(state["seen"])
    hist = {s: state["seen"].count(s) for s in set(state["seen"])}
    assert report.histogram == hist
    if k > 1:
        assert report.max >= 1, "with a slow server, lookups should run ahead"


def test_synchronous_runs_are_bit_identical():
    results = []
    for _ in range(2):
        model = Net()
        with train_ctx(model) as ctx:
            loader = DataLoader(
                ListDataset(make_batches(15)), embedding_staleness=1, reproducible=True
            )
            losses = train(ctx, loader)
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


def test_raw_slot_trains_and_has_mask_channel():
    model = Net(emb_width=8 + 3 * 5)
    with train_ctx(model, raw=True) as ctx:
        loader = DataLoader(ListDataset(make_batches(10, raw=True)), embedding_staleness=2)
        shapes = []
        for b in loader:
            non_id, embs, labels = ctx.prepare_features(b)
            shapes = [tuple(e.shape) for e in embs]
            mask = embs[2][..., -1]
            lengths = b.batch.id_type_features[2].lengths
            np.testing.assert_array_equal(mask.sum(1).detach().numpy(), np.minimum(lengths, 3))
            out = model(non_id, embs)
            ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))
        rows_c = ctx.get_embedding_size()
    assert shapes == [(16, 4), (16, 4), (16, 3, 5)]
    assert rows_c[0] > 0


def test_eval_lookups_create_nothing_and_see_trained_rows():
    model = Net()
    with train_ctx(model) as ctx:
        train(ctx, DataLoader(ListDataset(make_batches(5)), embedding_staleness=2))
        rows_after_train = sum(ctx.get_embedding_size())
        unseen = make_batches(3, seed=99)
        for feats, _, _ in unseen:  # IDs far outside the training range
            feats["a"] = (feats["a"][0] + np.uint64(10_000), feats["a"][1])
        test_loader = DataLoader(ListDataset(unseen, requires_grad=False))
        with eval_ctx(model=model) as ectx, torch.no_grad():
            for b in test_loader:
                _, embs, _ = ectx.prepare_features(b)
                assert not embs[0].requires_grad
                assert float(embs[0].abs().max()) == 0.0  # unknown IDs read as zeros
        assert sum(ctx.get_embedding_size()) == rows_after_train


def test_forward_without_backward_and_early_break_do_not_hang():
    model = Net()
    with train_ctx(model) as ctx:
        loader = DataLoader(ListDataset(make_batches(30)), embedding_staleness=1)
        for i, b in enumerate(loader):
            ctx.forward(b)  # no backward: its permit must come back at the next forward
            if i == 5:
                break
        # the loader can be iterated again after a break
        assert len(train(ctx, loader, steps=3)) == 3


def test_unknown_slot_is_an_error_and_writes_nothing():
    model = Net()

    class Bad(IterableDataset):
        def __iter__(self):
            yield PersiaBatch(
                [IDTypeFeatureWithSingleID("a", np.arange(4, dtype=np.uint64)),
                 IDTypeFeatureWithSingleID("nope", np.arange(4, dtype=np.uint64))],
                non_id_type_features=[NonIDTypeFeature(np.zeros((4, 3), np.float32))],
                labels=[Label(np.zeros((4, 1), np.float32))],
            )  # fmt: skip

    with train_ctx(model) as ctx:
        with pytest.raises(BatchError, match="'nope' is not a configured slot"):
            train(ctx, DataLoader(Bad()))
        assert sum(ctx.get_embedding_size()) == 0


def test_dataset_errors_reach_the_training_loop():
    class Broken(IterableDataset):
        def __iter__(self):
            yield 42

    model = Net()
    with train_ctx(model) as ctx, pytest.raises(BatchError, match="PersiaBatch"):
        train(ctx, DataLoader(Broken()))


def test_loader_timeout_is_a_typed_error():
    class Slow(IterableDataset):
        def __iter__(self):
            time.sleep(1.0)
            yield from ()

    with train_ctx(Net()), pytest.raises(BackendError, match="timeout_ms=100"):
        list(DataLoader(Slow(), timeout_ms=100))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"embedding_staleness": 0}, "embedding_staleness"),
        ({"forward_buffer_size": 0}, "forward_buffer_size"),
        ({"timeout_ms": -5}, "timeout_ms"),
    ],
)
def test_bad_loader_arguments(kwargs, match):
    with train_ctx(Net()), pytest.raises(PersiaError, match=match):
        DataLoader(ListDataset([]), **kwargs)


def test_loader_outside_a_context_and_streaming_dataset():
    with pytest.raises(PersiaError, match="inside a persia context"):
        DataLoader(ListDataset([]))
    with train_ctx(Net()), pytest.raises(BackendError, match="cluster backend"):
        list(DataLoader(StreamingDataset(10)))


def test_train_ctx_argument_errors_list_every_problem():
    with pytest.raises(PersiaError) as info:
        TrainCtx(object(), object(), model=None)
    text = str(info.value)
    assert "embedding_optimizer" in text and "dense_optimizer" in text and "model" in text


def test_missing_embedding_config_is_a_config_error(monkeypatch):
    monkeypatch.delenv("PERSIA_EMBEDDING_CONFIG", raising=False)
    model = Net()
    ctx = TrainCtx(Adagrad(), torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(ConfigError, match="PERSIA_EMBEDDING_CONFIG"), ctx:
        pass


def test_embedding_config_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "embedding_config.yml"
    path.write_text("slots_config:\n  a: {dim: 4}\n  b: {dim: 4, pooling: mean}\n")
    monkeypatch.setenv("PERSIA_EMBEDDING_CONFIG", str(path))
    model = Net()
    with TrainCtx(Adagrad(), torch.optim.SGD(model.parameters(), lr=0.1), model=model) as ctx:
        assert len(train(ctx, DataLoader(ListDataset(make_batches(2))))) == 2


CHECK_SCRIPT = """
import json, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from persia.ctx import eval_ctx
from persia.data import DataLoader
from runtime._jobs import ListDataset, Net, embedding_file, make_batches
model = Net()
with eval_ctx(model=model, embedding_config_file=embedding_file()) as ctx:
    ctx.load_checkpoint({ckpt!r})
    model.eval()
    preds = []
    with torch.no_grad():
        for b in DataLoader(ListDataset(make_batches(3, seed=7), requires_grad=False)):
            out, _ = ctx.forward(b)
            preds.append(out.numpy().ravel().tolist())
    print(json.dumps(preds))
"""


def test_checkpoint_loads_in_a_fresh_process_with_identical_predictions(tmp_path):
    model = Net()
    with train_ctx(model) as ctx:
        train(ctx, DataLoader(ListDataset(make_batches(12)), embedding_staleness=3))
        ctx.dump_checkpoint(tmp_path / "ckpt")
        model.eval()
        preds = []
        with eval_ctx(model=model) as ectx, torch.no_grad():
            for b in DataLoader(ListDataset(make_batches(3, seed=7), requires_grad=False)):
                out, _ = ectx.forward(b)
                preds.append(out.numpy().ravel().tolist())
    script = CHECK_SCRIPT.format(tests=str(ROOT / "tests"), ckpt=str(tmp_path / "ckpt"))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == preds


def _bad_batches():
    ids = [IDTypeFeatureWithSingleID("a", np.arange(4, dtype=np.uint64))]
    dense = [NonIDTypeFeature(np.zeros((4, 3), np.float32))]
    label = [Label(np.zeros((4, 1), np.float32))]
    return {
        "mismatched batch sizes": lambda: PersiaBatch(
            ids, non_id_type_features=[NonIDTypeFeature(np.zeros((5, 3), np.float32))], labels=label
        ),
        "wrong ID dtype": lambda: PersiaBatch(
            [IDTypeFeatureWithSingleID("a", np.arange(4, dtype=np.int64))],
            non_id_type_features=dense,
            labels=label,
        ),
        "requires_grad without labels": lambda: PersiaBatch(ids, non_id_type_features=dense),
        "NaN dense feature": lambda: PersiaBatch(
            ids,
            non_id_type_features=[NonIDTypeFeature(np.full((4, 3), np.nan, np.float32))],
            labels=label,
        ),
    }


@pytest.mark.parametrize("case", list(_bad_batches()))
def test_bad_batches_give_clear_errors_and_write_nothing(case):
    make = _bad_batches()[case]

    class Source(IterableDataset):
        def __iter__(self):
            yield make()

    with train_ctx(Net()) as ctx:
        with pytest.raises(BatchError) as info:
            train(ctx, DataLoader(Source()))
        assert sum(ctx.get_embedding_size()) == 0
    assert str(info.value)  # a message, not a bare exception


def test_clear_embeddings_empties_every_shard_and_lookups_see_it():
    model = Net()
    with train_ctx(model) as ctx:
        train(ctx, DataLoader(ListDataset(make_batches(3))))
        assert sum(ctx.get_embedding_size()) > 0
        ctx.clear_embeddings()
        assert sum(ctx.get_embedding_size()) == 0
        with eval_ctx(model=model) as ectx, torch.no_grad():
            for b in DataLoader(ListDataset(make_batches(1), requires_grad=False)):
                _, embs, _ = ectx.prepare_features(b)
                assert float(embs[0].abs().max()) == 0.0
