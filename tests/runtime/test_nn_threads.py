"""TrainCtx(nn_threads=...): torch's thread count for a CPU model's dense step, chosen by
measurement with "auto" (persia.ctx._threads.ThreadTuner)."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from persia.ctx import TrainCtx
from persia.ctx._threads import ThreadTuner, parse_nn_threads
from persia.data import DataLoader
from persia.embedding.optim import Adagrad
from persia.errors import PersiaError
from runtime._jobs import ListDataset, Net, embedding_file, make_batches


def run_tuner(tuner: ThreadTuner, step_ms: dict[int, float], steps: int):
    """Feeds ``tuner`` steps whose wall time depends on the thread count in force."""
    current = [tuner.threads]
    original = tuner._set

    def record(n: int) -> None:
        current[0] = n
        original(n)

    tuner._set = record
    for _ in range(steps):
        tuner.step(step_ms[current[0]] / 1000)
    return current[0]


def test_a_job_clearly_slower_with_fewer_threads_keeps_them_after_one_block():
    """The DLRM case: one block of fewer threads, then torch's count for good."""
    calls: list[int] = []
    tuner = ThreadTuner(4, calls.append)
    final = run_tuner(tuner, {4: 10.0, 3: 14.0}, steps=100)
    assert calls == [3, 4] and final == 4
    assert tuner.decided == 4 and "3 thread(s) slower than 4: 14.00 vs 10.00 ms" in tuner.reason
    assert tuner.steps == tuner.skip + tuner.observe + tuner.block


def test_a_job_faster_with_one_thread_fewer_keeps_it():
    calls: list[int] = []
    tuner = ThreadTuner(2, calls.append)
    final = run_tuner(tuner, {2: 10.0, 1: 7.0}, steps=200)
    assert final == 1 and tuner.decided == 1
    # blocks alternate, fewer threads first, and the choice is the last switch
    assert calls == [1, 2, 1, 2, 1, 2, 1]
    assert tuner.steps == tuner.skip + tuner.observe + 2 * tuner.rounds * tuner.block
    assert "7.00 vs 10.00 ms" in tuner.reason


@pytest.mark.parametrize(
    "fewer_ms, why",
    [(10.0, "not faster"), (9.8, "not faster"), (11.0, "not faster"), (12.0, "slower")],
)  # equal, faster within the margin, slower within the abort, slower past it
def test_fewer_threads_not_faster_by_the_margin_are_not_kept(fewer_ms, why):
    calls: list[int] = []
    tuner = ThreadTuner(2, calls.append)
    final = run_tuner(tuner, {2: 10.0, 1: fewer_ms}, steps=200)
    assert final == 2 and tuner.decided == 2 and calls[-1] == 2
    assert f"1 thread(s) {why} than 2" in tuner.reason


def test_a_blocks_first_step_is_not_counted():
    """The step right after a switch pays for it: a slow first step per block (here 100 ms
    with one thread) does not decide."""
    tuner = ThreadTuner(2, lambda n: None)
    for _ in range(tuner.skip + tuner.observe):
        tuner.step(0.010)
    k = 0
    while tuner.decided is None:
        threads = tuner._trial_threads(k)
        ms = (100.0 if k % tuner.block == 0 else 8.0) if threads == 1 else 10.0
        tuner.step(ms / 1000)
        k += 1
    assert tuner.decided == 1


@pytest.mark.parametrize("bad", ["two", 0, -1, True, 1.5, "0", None])
def test_nn_threads_must_be_auto_keep_or_a_positive_int(bad):
    with pytest.raises(PersiaError, match="nn_threads must be"):
        parse_nn_threads(bad)


def test_nn_threads_values_are_parsed():
    assert parse_nn_threads(" Auto ") == "auto"
    assert parse_nn_threads("keep") == "keep"
    assert parse_nn_threads("3") == 3 and parse_nn_threads(2) == 2


def make_ctx(model, **kw):
    return TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(),
        **kw,
    )


def train(ctx, dataset):
    for b in DataLoader(dataset, embedding_staleness=2):
        out, labels = ctx.forward(b)
        ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))


def test_a_bad_environment_value_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("PERSIA_NN_THREADS", "many")
    model = Net()
    with pytest.raises(PersiaError, match="PERSIA_NN_THREADS must be"):
        make_ctx(model)


def test_an_int_sets_torchs_threads_for_the_job_and_restores_them():
    before = torch.get_num_threads()
    seen = []

    class Spy(Net):
        def forward(self, non_id, embeddings):
            seen.append(torch.get_num_threads())
            return super().forward(non_id, embeddings)

    model = Spy()
    with make_ctx(model, nn_threads=1) as ctx:
        train(ctx, ListDataset(make_batches(5)))
    assert set(seen) == {1}
    assert torch.get_num_threads() == before
    assert ctx.nn_threads_chosen is None


def threads_paced_net(before: int, fewer_ms: float, more_ms: float):
    """A model whose step takes ``fewer_ms`` with torch on fewer threads than ``before`` and
    ``more_ms`` with ``before``; it records the thread count of every forward."""
    seen: list[int] = []

    class Paced(Net):
        def forward(self, non_id, embeddings):
            n = torch.get_num_threads()
            seen.append(n)
            time.sleep((fewer_ms if n < before else more_ms) / 1000)
            return super().forward(non_id, embeddings)

    return Paced(), seen


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="auto needs torch on >= 2 threads")
def test_auto_keeps_one_thread_fewer_when_measured_faster_logs_it_and_restores(monkeypatch, caplog):
    monkeypatch.setenv("PERSIA_NN_THREADS", "auto")  # the default, here over the suite's "keep"
    before = torch.get_num_threads()
    model, seen = threads_paced_net(before, fewer_ms=4, more_ms=20)
    with caplog.at_level(logging.INFO), make_ctx(model) as ctx:
        train(ctx, ListDataset(make_batches(60)))
    assert ctx.nn_threads_chosen == before - 1
    assert seen[-10:] == [before - 1] * 10 and before in seen[-30:]  # the trial, then the choice
    assert [r for r in caplog.records if "runs on" in r.getMessage() and "faster" in r.getMessage()]
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="auto needs torch on >= 2 threads")
def test_auto_on_a_job_slower_with_fewer_threads_tries_one_block_only(monkeypatch):
    before = torch.get_num_threads()
    model, seen = threads_paced_net(before, fewer_ms=25, more_ms=4)
    with make_ctx(model, nn_threads="auto") as ctx:
        train(ctx, ListDataset(make_batches(40)))
    assert ctx.nn_threads_chosen == before
    assert seen.count(before - 1) == 4  # one block
    assert torch.get_num_threads() == before
