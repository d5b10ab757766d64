"""The NN worker's device path (persia.ctx._device), on the CPU.

The CUDA path (pinned buffers, side stream, events) needs a GPU; these tests drive the same
bookkeeping with a :class:`DeviceTransfer` built for the CPU, where the copies are plain and
synchronous: the double-buffered staging, the DataLoader's look-ahead that stages the next batch
while the current one computes, the gradients' way back with the applier waiting on them, the
per-slot split of the summed embeddings, and mixed precision with the grad scaler (CPU
``GradScaler`` and bfloat16 autocast).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from persia.ctx._device import DeviceTransfer, HostPool, split_slots
from persia.data import DataLoader
from persia.worker.pooling import add_prefix
from runtime._jobs import (
    CARD,
    PREFIX_BITS,
    ListDataset,
    Net,
    embedding_file,
    make_batches,
    train_ctx,
)


def _keys(slot: str) -> np.ndarray:
    cfg = embedding_file()
    ids = np.arange(CARD[slot], dtype=np.uint64)
    return add_prefix(ids, cfg.prefix_of(slot), PREFIX_BITS)


def _rows(ctx) -> np.ndarray:
    store = ctx.runtime.store
    return np.concatenate(
        [store.lookup(_keys("a"), 4, training=False), store.lookup(_keys("b"), 4, training=False)]
    )


def _step(ctx, b, seen: list | None = None) -> float:
    out, labels = ctx.forward(b)
    if seen is not None:
        seen.append(labels[0].numpy().copy())
    loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
    ctx.backward(loss, embedding_gradient_check_frequency=1)
    return float(loss.item())


# ------------------------------------------------------------------ the per-slot split
@pytest.mark.parametrize("cols", [[(0, 4), (4, 2), (6, 3)], [(6, 3), (0, 4), (4, 2)]])
def test_split_slots_gradient_matches_column_views(cols):
    torch.manual_seed(1)
    base = torch.randn(5, 9)
    w = [torch.randn(5, d) for _, d in cols]
    views = base.clone().requires_grad_()
    sum(((views[:, a : a + d] * wi).sum() for (a, d), wi in zip(cols, w, strict=True))).backward()
    split = base.clone().requires_grad_()
    parts = split_slots(split, cols)
    for (a, d), p in zip(cols, parts, strict=True):
        assert torch.equal(p, base[:, a : a + d])
    sum((p * wi).sum() for p, wi in zip(parts, w, strict=True)).backward()
    torch.testing.assert_close(split.grad, views.grad, rtol=0, atol=0)


def test_split_slots_unused_slot_gets_zeros_and_no_slot_no_gradient():
    base = torch.randn(3, 6)
    s = base.clone().requires_grad_()
    a, _b, c = split_slots(s, [(0, 2), (2, 2), (4, 2)])
    (a.sum() + 2 * c.sum()).backward()
    expected = torch.tensor([[1.0, 1, 0, 0, 2, 2]] * 3)
    assert torch.equal(s.grad, expected)
    s2 = base.clone().requires_grad_()
    split_slots(s2, [(0, 3), (3, 3)])
    assert s2.grad is None  # nothing used: no gradient at all (none is sent)
    # gaps between slots (columns no slot covers) take the general path
    s3 = base.clone().requires_grad_()
    (x,) = split_slots(s3, [(2, 2)])
    x.sum().backward()
    assert torch.equal(s3.grad, torch.tensor([[0.0, 0, 1, 1, 0, 0]] * 3))


def test_split_slots_refuse_in_place_changes_as_documented():
    s = torch.randn(3, 4).requires_grad_()
    a, _ = split_slots(s, [(0, 2), (2, 2)])
    with pytest.raises(RuntimeError, match="modified inplace"):
        a.mul_(2)
    # without gradients they are plain views
    (b, _) = split_slots(torch.randn(3, 4), [(0, 2), (2, 2)])
    b.mul_(2)


# ------------------------------------------------------------------ staging buffers
def test_stage_copies_into_two_reused_buffer_sets():
    t = DeviceTransfer(torch.device("cpu"))
    assert not t.cuda and t.stream is None
    rng = np.random.default_rng(0)
    arrays = [{"x": rng.normal(size=(8, 3)).astype(np.float32)} for _ in range(5)]
    staged = [t.stage(a) for a in arrays]
    for a, s in zip(arrays, staged, strict=True):
        x = s.tensors()["x"]
        assert np.array_equal(x.numpy(), a["x"])
        assert x.data_ptr() != torch.from_numpy(a["x"]).data_ptr()  # the copy path was used
    assert t.staged == 5 and t.allocations == 2  # one buffer per set, reused
    # a smaller batch uses the buffers' prefix; a larger one grows them
    t.stage({"x": np.ones((4, 3), dtype=np.float32)})
    assert t.allocations == 2
    big = t.stage({"x": np.full((16, 3), 7, dtype=np.float32)})
    assert t.allocations == 3 and big.tensors()["x"].shape == (16, 3)


def test_host_pool_reuses_released_buffers():
    pool = HostPool(pin=False)
    a = pool.acquire((4, 2), torch.float32)
    b = pool.acquire((4, 2), torch.float32)
    assert pool.allocated == 2 and a.data_ptr() != b.data_ptr()
    pool.release([a])
    assert pool.acquire((4, 2), torch.float32) is a
    pool.acquire((3, 2), torch.float32)
    assert pool.allocated == 3


class _LoggingTransfer(DeviceTransfer):
    """A CPU transfer whose way back behaves like the CUDA one: copies, a wait and a release
    the applier must call, in that order, around its use of the arrays."""

    def __init__(self, log: list) -> None:
        super().__init__(torch.device("cpu"))
        self.log = log
        self.back = 0

    def to_host(self, grads):
        k = self.back
        self.back += 1
        arrays = [g.detach().numpy().copy() for g in grads]
        return arrays, lambda: self.log.append(("ready", k)), lambda: self.log.append(("done", k))


def test_transfer_path_trains_like_the_cpu_path_and_each_step_gets_its_batch():
    batches = make_batches(8, seed=5)
    results = []
    for forced in (False, True):
        log: list = []
        with train_ctx(Net()) as ctx:
            if forced:
                ctx._transfer = _LoggingTransfer(log)
            losses: list = []
            labels: list = []
            dense: list = []

            def keep(m, a, dense=dense):
                dense.append(a[0][0].numpy().copy())

            ctx.model.register_forward_pre_hook(keep)
            for i, b in enumerate(DataLoader(ListDataset(batches), embedding_staleness=1)):
                assert b.index == i
                losses.append(_step(ctx, b, labels))
            for i, (d, lb) in enumerate(zip(dense, labels, strict=True)):
                assert np.array_equal(d, batches[i][1]) and np.array_equal(lb, batches[i][2])
            ctx.runtime.flush()
            results.append(
                (losses, _rows(ctx), [p.detach().clone() for p in ctx.model.parameters()])
            )
            if forced:
                assert ctx._transfer.staged == len(batches)
                # the applier waited on each batch's copies before reading, then released them
                assert log == [(e, k) for k in range(len(batches)) for e in ("ready", "done")]
    (l0, r0, p0), (l1, r1, p1) = results
    assert l0 == l1
    np.testing.assert_array_equal(r0, r1)
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b)


def test_next_batch_is_staged_while_the_current_one_computes():
    batches = make_batches(6, seed=2)
    events: list = []
    with train_ctx(Net()) as ctx:
        ctx._transfer = DeviceTransfer(torch.device("cpu"))
        stage = ctx._stage_ahead

        def logged(batch):
            if batch.staged is None:
                events.append(("stage", batch.index))
            stage(batch)

        ctx._stage_ahead = logged
        loader = DataLoader(ListDataset(batches), embedding_staleness=4, forward_buffer_size=4)
        labels: list = []
        for i, b in enumerate(loader):
            time.sleep(0.05)  # the lookups run ahead meanwhile
            events.append(("step", i))
            _step(ctx, b, labels)
            assert np.array_equal(labels[-1], batches[i][2])
    steps = [e for e in events if e[0] == "step"]
    assert steps == [("step", i) for i in range(6)]
    assert sorted(e[1] for e in events if e[0] == "stage") == list(range(6))  # each once
    # batch i + 1's copy started before step i computed (after the first, it is looked up)
    ahead = [i for i in range(5) if events.index(("stage", i + 1)) < events.index(("step", i))]
    assert len(ahead) >= 3, events


def test_leaving_the_loop_discards_the_batch_staged_ahead():
    batches = make_batches(6, seed=2)
    with train_ctx(Net()) as ctx:
        ctx._transfer = DeviceTransfer(torch.device("cpu"))
        loader = DataLoader(
            ListDataset(batches), embedding_staleness=2, forward_buffer_size=2, timeout_ms=5000
        )
        for _ in range(3):  # a permit kept by a batch staged ahead would stall the next pass
            steps = 0
            for i, b in enumerate(loader):
                time.sleep(0.02)
                _step(ctx, b)
                steps += 1
                if i == 2:
                    break
            assert steps == 3
            ctx.runtime.flush()
            assert loader.gate.in_flight == 0


def test_an_error_taken_ahead_is_raised_at_its_turn():
    batches = make_batches(4, seed=2)

    class Broken(ListDataset):
        def __iter__(self):
            yield from list(super().__iter__())[:2]
            raise RuntimeError("reader broke")

    with train_ctx(Net()) as ctx:
        ctx._transfer = DeviceTransfer(torch.device("cpu"))
        steps = 0
        with pytest.raises(RuntimeError, match="reader broke"):
            for b in DataLoader(Broken(batches), forward_buffer_size=4):
                time.sleep(0.05)  # the error is queued, and taken ahead, meanwhile
                _step(ctx, b)
                steps += 1
        assert steps == 2


# ------------------------------------------------------------------ mixed precision
def _scaler(scale: float) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)


def test_scale_2_16_trains_like_unscaled():
    batches = make_batches(6, seed=7)
    out = []
    for scaler in (None, _scaler(2.0**16)):
        with train_ctx(Net()) as ctx:
            if scaler is not None:
                ctx.grad_scaler = scaler
            for b in DataLoader(ListDataset(batches), embedding_staleness=1):
                _step(ctx, b)
            ctx.runtime.flush()
            assert ctx.skipped_steps == 0
            out.append((_rows(ctx), [p.detach().clone() for p in ctx.model.parameters()]))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _InfAt(Net):
    """Net whose gradients turn infinite at step ``bad``: the dense layer's weight
    (``where="dense"``) or the embeddings (``where="embedding"``)."""

    def __init__(self, bad: int, where: str) -> None:
        super().__init__()
        self.bad, self.where, self.step = bad, where, 0
        self.l2.weight.register_hook(self._dense)

    def _dense(self, g):
        return g + float("inf") if self.where == "dense" and self.step - 1 == self.bad else g

    def forward(self, non_id, embeddings):
        if self.where == "embedding" and self.step == self.bad:
            for e in embeddings:
                e.register_hook(lambda g: g * float("inf"))
        self.step += 1
        return super().forward(non_id, embeddings)


@pytest.mark.parametrize("where", ["dense", "embedding"])
def test_step_with_inf_is_skipped_for_dense_and_embeddings(where):
    batches = make_batches(5, seed=4)
    with train_ctx(_InfAt(2, where)) as ctx:
        ctx.grad_scaler = _scaler(2.0**16)
        before = None
        for i, b in enumerate(DataLoader(ListDataset(batches), embedding_staleness=1)):
            if i == 2:
                ctx.runtime.flush()
                before = (_rows(ctx), [p.detach().clone() for p in ctx.model.parameters()])
            _step(ctx, b)
            if i == 2:
                ctx.runtime.flush()
                # the rows that existed are unchanged (the next batch's lookup may add rows)
                existed = (before[0] != 0).any(axis=1)
                assert existed.sum() > 10
                np.testing.assert_array_equal(_rows(ctx)[existed], before[0][existed])
                for p, q in zip(ctx.model.parameters(), before[1], strict=True):
                    assert torch.equal(p, q)
                assert ctx.skipped_steps == 1
                assert ctx.grad_scaler.get_scale() < 2.0**16
        assert ctx.skipped_steps == 1
        assert np.isfinite(_rows(ctx)).all()
        assert not np.array_equal(_rows(ctx), before[0])  # the other steps trained


def test_a_skipped_step_counts_nan_grad_skipped_per_feature():
    from persia import telemetry

    batches = make_batches(4, seed=4)
    names = sorted(batches[0][0])  # the id_type_features of every batch
    telemetry.shutdown()
    telemetry.configure(telemetry.NN, 0)
    try:
        with train_ctx(_InfAt(1, "embedding")) as ctx:
            ctx.grad_scaler = _scaler(2.0**16)
            for b in DataLoader(ListDataset(batches), embedding_staleness=1):
                _step(ctx, b)
            ctx.runtime.flush()
            assert ctx.skipped_steps == 1
        text = telemetry.render()[0].decode()
    finally:
        telemetry.shutdown()
    got = {
        line.split('feat="')[1].split('"')[0]: float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("nan_grad_skipped{")
    }
    assert got == {name: 1.0 for name in names}


def test_cpu_mixed_precision_runs_the_model_in_bfloat16():
    batches = make_batches(6, seed=3)
    seen = []
    ref = None
    for amp in (False, True):
        model = Net()
        model.l1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with train_ctx(model, cpu_mixed_precision=amp) as ctx:
            assert ctx.mixed_precision is amp
            assert (ctx.grad_scaler is not None) is amp
            for b in DataLoader(ListDataset(batches), embedding_staleness=1):
                out, labels = ctx.forward(b)
                assert out.dtype == torch.float32
                loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
                ctx.backward(loss)
            ctx.runtime.flush()
            rows = _rows(ctx)
        if amp:
            assert set(seen[len(batches) :]) == {torch.bfloat16}
            assert ctx.grad_scaler.get_scale() == 2.0**16
            np.testing.assert_allclose(rows, ref, atol=2e-2)  # bfloat16 compute
        else:
            assert set(seen) == {torch.float32}
            ref = rows


def test_mixed_precision_on_the_cpu_stays_off_by_default():
    with train_ctx(Net()) as ctx:
        assert not ctx.mixed_precision and ctx.grad_scaler is None and ctx._transfer is None


def _agree(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from persia.ctx._contexts import _all_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put(
            (
                rank,
                _all_ranks(True, torch.device("cpu")),
                _all_ranks(rank == 0, torch.device("cpu")),
            )
        )
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_skipped_step():
    # one rank's failed check skips the step on every rank (their dense models stay equal)
    import multiprocessing as mp

    from persia.ctx._contexts import _all_ranks
    from persia.utils import find_free_port

    assert _all_ranks(False, torch.device("cpu")) is False  # no process group: this rank's
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_agree, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == [(0, True, False), (1, True, False)]
