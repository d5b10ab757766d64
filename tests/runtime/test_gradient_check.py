"""TrainCtx's ``embedding_gradient_check_frequency`` and ``grad_scalar_update_factor`` (PERSIA's
meaning): every f-th backward() checks the embedding gradients for NaN/inf; a failed check with
mixed precision divides the loss scale by the factor.

Mixed precision is CUDA-only, so these tests put a CPU ``torch.amp.GradScaler`` in
``ctx.grad_scaler`` (PERSIA's attribute): backward() runs the very code path it runs on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persia.data import DataLoader
from persia.errors import PersiaError
from persia.worker.pooling import add_prefix
from runtime._jobs import CARD, PREFIX_BITS, ListDataset, Net, embedding_file, train_ctx

STEPS = 6


class PoisonNet(Net):
    """Net whose embedding gradients are NaN at the steps in ``poison`` (loss and dense
    gradients stay finite: the extra term is 0 forward, NaN only towards the embeddings)."""

    def __init__(self, poison: set[int]) -> None:
        super().__init__()
        self.poison = poison
        self.step = 0

    def forward(self, non_id, embeddings):
        out = super().forward(non_id, embeddings)
        if self.step in self.poison:
            out = out + 0.0 * torch.sqrt(embeddings[0] * 0.0).sum()
        self.step += 1
        return out


def _batches():
    from runtime._jobs import make_batches

    return make_batches(STEPS, seed=3)


def _train(ctx, frequency: int) -> list[float]:
    losses = []
    for b in DataLoader(ListDataset(_batches()), embedding_staleness=1, reproducible=True):
        out, labels = ctx.forward(b)
        loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
        ctx.backward(loss, embedding_gradient_check_frequency=frequency)
        losses.append(loss.item())
    return losses


def _cpu_scaler(init_scale: float = 1024.0) -> torch.amp.GradScaler:
    # growth_interval beyond the run: the scale changes only by a failed check
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)


@pytest.mark.parametrize("frequency,found", [(1, 2), (3, 1), (4, 0)])
def test_check_frequency_decides_which_steps_are_checked(frequency, found):
    # NaN gradients at calls 1 and 3: checked calls are 0, f, 2f, ...
    model = PoisonNet({1, 3})
    with train_ctx(model) as ctx:
        _train(ctx, frequency)
        assert ctx.update_times == STEPS
        assert ctx.nonfinite_gradient_checks == found


@pytest.mark.parametrize("factor", [4, 8])
def test_failed_check_divides_loss_scale_by_the_factor(factor):
    # checks at calls 0, 2, 4; NaN at 2 (checked) and 3 (not checked)
    model = PoisonNet({2, 3})
    with train_ctx(model, grad_scalar_update_factor=factor) as ctx:
        ctx.grad_scaler = _cpu_scaler(1024.0)
        _train(ctx, frequency=2)
        assert ctx.nonfinite_gradient_checks == 1
        assert ctx.grad_scaler.get_scale() == 1024.0 / factor


def test_scaled_loss_trains_like_unscaled():
    # the embedding gradients are unscaled before they reach the parameter servers
    cfg = embedding_file()
    keys = add_prefix(np.arange(CARD["a"], dtype=np.uint64), cfg.prefix_of("a"), PREFIX_BITS)
    rows, losses = [], []
    for scaler in (None, _cpu_scaler(2.0**10)):
        with train_ctx(Net()) as ctx:
            if scaler is not None:
                ctx.grad_scaler = scaler
            losses.append(_train(ctx, frequency=1))
            if scaler is not None:
                assert scaler.get_scale() == 2.0**10  # the loss was scaled, and stayed so
            rows.append(ctx.runtime.store.lookup(keys, 4, training=False))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5, atol=1e-7)


def test_bad_settings_are_refused():
    with pytest.raises(PersiaError, match="grad_scalar_update_factor must be a number > 0"):
        train_ctx(Net(), grad_scalar_update_factor=0)
    with train_ctx(Net()) as ctx:
        for b in DataLoader(ListDataset(_batches()[:1]), embedding_staleness=1):
            out, labels = ctx.forward(b)
            loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
            with pytest.raises(PersiaError, match="embedding_gradient_check_frequency"):
                ctx.backward(loss, embedding_gradient_check_frequency=0)
            ctx.backward(loss)
