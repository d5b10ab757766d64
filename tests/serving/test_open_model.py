"""persia.serving.open_model on a PERSIA-API checkpoint: served with no YAML file (the checkpoint
records its embedding layer and TorchScript model), predictions equal the training runtime's; with
follow= it applies the training job's deltas and picks up a new checkpoint generation (with its
dense model) while requests from several threads see whole states only."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
from runtime._jobs import embedding_file, make_batches, run, to_persia, train_ctx

from persia.ctx import InferCtx
from persia.embedding.config import parse_embedding_config, parse_global_config
from persia.embedding.data import IDTypeFeature, PersiaBatch
from persia.errors import BatchError, ConfigError, PersiaError
from persia.serving import open_model
from persia.serving.model import embedding_tensors

TIMEOUT_S = 30.0  # generous: order and content are asserted, never a time bound


class JitNet(torch.nn.Module):
    """Dense + pooled embeddings -> logit -> sigmoid; scriptable."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(3 + 8, 8)
        self.l2 = torch.nn.Linear(8, 1)

    def forward(self, non_id: list[torch.Tensor], embeddings: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([non_id[0]] + [e.flatten(1) for e in embeddings], dim=1)
        return torch.sigmoid(self.l2(torch.tanh(self.l1(x))))


def _probe():
    return to_persia(make_batches(1, batch_size=64, seed=11)[0], requires_grad=False)


def _expected(train, dense: torch.nn.Module) -> np.ndarray:
    """What the training runtime gives now through ``dense`` (a copy of the model as dumped)."""
    train.runtime.flush()
    probe = _probe()
    lookup = train.runtime.lookup(probe, False, 0, None).lookup
    with torch.no_grad():
        out = dense(
            [torch.from_numpy(probe.non_id_type_features[0].data)], embedding_tensors(lookup)
        )
    return out.numpy().reshape(-1)


def _dumped(model: torch.nn.Module) -> torch.nn.Module:
    snapshot = copy.deepcopy(model)
    snapshot.eval()
    return snapshot


def _wait(what, check) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {TIMEOUT_S} s")
        time.sleep(0.02)


def test_a_checkpoint_is_served_without_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv("PERSIA_EMBEDDING_CONFIG", raising=False)
    monkeypatch.delenv("PERSIA_GLOBAL_CONFIG", raising=False)
    ckpt = tmp_path / "ckpt"
    model = JitNet()
    with train_ctx(model) as train:
        run(train, make_batches(20))
        train.dump_checkpoint(ckpt, with_jit_model=True)
        expected = _expected(train, _dumped(model))
        summed = train.runtime.lookup(_probe(), False, 0, None).lookup.summed
    served = open_model(ckpt)  # no embedding config anywhere: the checkpoint's
    assert served.kind == "checkpoint"
    np.testing.assert_allclose(served.predict_batch(_probe()), expected, rtol=0, atol=1e-6)
    assert served.freshness()["incremental_dir"] is None
    assert [s["name"] for s in served.info()["slots"]] == ["a", "b"]
    with pytest.raises(PersiaError, match="PERSIA-API checkpoint: it carries no recipe"):
        served.predict([{"a": 1}])
    with pytest.raises(BatchError, match="expects a PersiaBatch"):
        served.predict_batch(b"bytes")  # type: ignore[arg-type]
    probe = _probe()
    unknown = PersiaBatch(
        [IDTypeFeature.from_columnar("zz", np.zeros(1, np.uint64), np.ones(1, np.int64))],
        requires_grad=False,
    )
    with pytest.raises(BatchError, match="'zz' is not a configured slot"):
        served.predict_batch(unknown)
    no_dense = PersiaBatch(probe.id_type_features, requires_grad=False)
    with pytest.raises(BatchError, match="the dense model cannot run on this batch"):
        served.predict_batch(no_dense)
    served.close()
    with pytest.raises(PersiaError, match="closed"):
        served.predict_batch(_probe())

    # InferCtx needs no YAML either; one that forms keys differently is refused, naming why
    ctx = InferCtx([], embedding_checkpoint=ckpt)
    np.testing.assert_array_equal(ctx.get_embedding_from_data(_probe()).lookup.summed, summed)
    ctx.close()
    other = parse_embedding_config(
        {"feature_index_prefix_bit": 8, "slots_config": {"a": {"dim": 4}, "b": {"dim": 4}}}
    )
    with pytest.raises(ConfigError, match="feature_index_prefix_bit 8.*slot 'b': pooling 'sum'"):
        InferCtx([], embedding_checkpoint=ckpt, embedding_config_file=other)
    ctx = InferCtx([], embedding_checkpoint=ckpt, embedding_config_file=embedding_file())
    ctx.close()


def test_following_deltas_and_a_new_generation_under_concurrent_requests(tmp_path):
    deltas, ckpt = tmp_path / "deltas", tmp_path / "ckpt"
    server = {
        "enable_incremental_update": True,
        "incremental_dir": str(deltas),
        "incremental_buffer_size": 10**9,  # flushed by hand below
    }
    config = parse_global_config({"embedding_parameter_server_config": server})
    model = JitNet()
    states = []
    outputs: list[np.ndarray] = []
    stop = threading.Event()
    with train_ctx(model, global_config_file=config) as train:
        run(train, make_batches(10))
        train.dump_checkpoint(ckpt, with_jit_model=True)
        first_dense = _dumped(model)
        states.append(_expected(train, first_dense))
        served = open_model(ckpt, follow=deltas, poll_interval_s=0.02)
        infer = InferCtx(
            [], embedding_checkpoint=ckpt, incremental_dir=deltas, poll_interval_s=0.02
        )

        def ask() -> None:
            while not stop.is_set():
                outputs.append(served.predict_batch(_probe()))

        askers = [threading.Thread(target=ask) for _ in range(3)]
        for t in askers:
            t.start()
        try:
            np.testing.assert_allclose(served.predict_batch(_probe()), states[0], atol=1e-6)

            # a delta: new rows, the same dense model
            run(train, make_batches(6, seed=1))
            train.runtime.flush()
            seq = train._delta_writer.flush().seq
            states.append(_expected(train, first_dense))
            _wait("delta 1", lambda: served.freshness()["last_delta_seq"] >= seq)
            np.testing.assert_allclose(served.predict_batch(_probe()), states[1], atol=1e-6)
            assert not np.allclose(states[1], states[0], atol=1e-6)

            # a new generation: rows and a new dense model
            run(train, make_batches(6, seed=2))
            train.dump_checkpoint(ckpt, with_jit_model=True)
            second_dense = _dumped(model)
            states.append(_expected(train, second_dense))
            _wait("generation 2", lambda: served.freshness()["generations_loaded"] == 2)
            fresh = served.freshness()
            assert fresh["checkpoint"].endswith("gen-000002") and fresh["checkpoint_delta_seq"] == 1
            np.testing.assert_allclose(served.predict_batch(_probe()), states[2], atol=1e-6)
            assert not np.allclose(states[2], states[1], atol=1e-6)
            _wait("InferCtx generation 2", lambda: infer.freshness()["generations_loaded"] == 2)

            # the next delta goes on from the new generation
            run(train, make_batches(4, seed=3))
            train.runtime.flush()
            seq = train._delta_writer.flush().seq
            states.append(_expected(train, second_dense))
            _wait("delta 2", lambda: served.freshness()["last_delta_seq"] >= seq)
            np.testing.assert_allclose(served.predict_batch(_probe()), states[3], atol=1e-6)
        finally:
            stop.set()
            for t in askers:
                t.join()
        served.close()
        infer.close()
    # every answer given while deltas and a generation were applied is one whole state
    assert len(outputs) > 0
    for out in outputs:
        assert any(np.allclose(out, s, rtol=0, atol=1e-6) for s in states)
