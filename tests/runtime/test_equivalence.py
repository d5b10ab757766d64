"""The local backend at staleness 1 against a plain-PyTorch reference (docs/ARCHITECTURE.md,
"Staleness").

Reference: one ``nn.EmbeddingBag(sparse=True)`` per slot, initialised with the very rows persia
creates (same key, same seed), trained by torch.optim.Adagrad / SGD, with the same dense model
and dense optimizer. After 20 steps every embedding row and dense weight must agree to 1e-5.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from persia.ctx import TrainCtx
from persia.data import DataLoader
from persia.embedding.optim import SGD, Adagrad
from persia.store import ShardedStore, Uniform
from persia.utils import embedding_seed
from persia.worker.pooling import add_prefix
from runtime._jobs import CARD, PREFIX_BITS, ListDataset, Net, embedding_file, make_batches

STEPS = 20


def initial_rows(cfg, slot: str) -> np.ndarray:
    """The rows persia creates for IDs 0..CARD-1 of ``slot`` (deterministic from key and seed)."""
    seed = embedding_seed()  # what TrainCtx uses (setup_seed may have changed it)
    store = ShardedStore(1, 10_000, SGD(lr=0.1), init=Uniform(-0.01, 0.01), seed=seed)
    keys = add_prefix(np.arange(CARD[slot], dtype=np.uint64), cfg.prefix_of(slot), PREFIX_BITS)
    return store.lookup(keys, cfg.slot(slot).dim, training=True)


def run_persia(emb_opt, dense_lr: float, batches, seed_model: torch.nn.Module):
    cfg = embedding_file()
    model = copy.deepcopy(seed_model)
    dense_opt = torch.optim.SGD(model.parameters(), lr=dense_lr)
    losses = []
    with TrainCtx(emb_opt, dense_opt, model=model, embedding_config_file=cfg) as ctx:
        loader = DataLoader(ListDataset(batches), embedding_staleness=1, reproducible=True)
        for b in loader:
            out, labels = ctx.forward(b)
            loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
            ctx.backward(loss)
            losses.append(loss.item())
        store = ctx.runtime.store
        rows = {}
        for slot in ("a", "b"):
            keys = add_prefix(np.arange(CARD[slot], dtype=np.uint64), cfg.prefix_of(slot), 12)
            rows[slot] = store.lookup(keys, 4, training=False)
    return losses, rows, model


def run_torch(make_emb_opt, dense_lr: float, batches, seed_model: torch.nn.Module):
    cfg = embedding_file()
    model = copy.deepcopy(seed_model)
    bags = {}
    for slot, mode in (("a", "sum"), ("b", "mean")):
        bag = torch.nn.EmbeddingBag(CARD[slot], 4, mode=mode, sparse=True)
        with torch.no_grad():
            bag.weight.copy_(torch.from_numpy(initial_rows(cfg, slot)))
        bags[slot] = bag
    emb_opt = make_emb_opt([bags["a"].weight, bags["b"].weight])
    dense_opt = torch.optim.SGD(model.parameters(), lr=dense_lr)
    losses = []
    for feats, dense, labels in batches:
        embs = []
        for slot in ("a", "b"):
            values, lengths = feats[slot]
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            embs.append(
                bags[slot](torch.from_numpy(values.astype(np.int64)), torch.from_numpy(offsets))
            )
        out = model([torch.from_numpy(dense)], embs)
        loss = torch.nn.functional.binary_cross_entropy(out, torch.from_numpy(labels))
        emb_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        emb_opt.step()
        dense_opt.step()
        losses.append(loss.item())
    rows = {s: bags[s].weight.detach().numpy().copy() for s in bags}
    return losses, rows, model


@pytest.mark.parametrize(
    "name,persia_opt,torch_opt",
    [
        (
            "adagrad",
            Adagrad(lr=0.3, initial_accumulator_value=0.1, eps=1e-10),
            lambda p: torch.optim.Adagrad(p, lr=0.3, initial_accumulator_value=0.1, eps=1e-10),
        ),
        ("sgd", SGD(lr=0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
    ],
)
def test_staleness_one_matches_plain_pytorch(name, persia_opt, torch_opt):
    batches = make_batches(STEPS)
    seed_model = Net()
    p_losses, p_rows, p_model = run_persia(persia_opt, 0.2, batches, seed_model)
    t_losses, t_rows, t_model = run_torch(torch_opt, 0.2, batches, seed_model)
    np.testing.assert_allclose(p_losses, t_losses, rtol=1e-5, atol=1e-6)
    for slot in ("a", "b"):
        # rows never seen stay at their (identical) initial values; seen rows moved
        np.testing.assert_allclose(p_rows[slot], t_rows[slot], rtol=1e-5, atol=1e-6)
    moved = np.abs(p_rows["a"] - initial_rows(embedding_file(), "a")).max()
    assert moved > 1e-3, "the embedding rows did not train"
    for (n1, w1), (n2, w2) in zip(
        p_model.state_dict().items(), t_model.state_dict().items(), strict=True
    ):
        assert n1 == n2
        np.testing.assert_allclose(w1.numpy(), w2.numpy(), rtol=1e-5, atol=1e-6)
