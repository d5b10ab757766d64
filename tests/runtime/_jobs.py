"""Small seeded jobs shared by the training tests."""

from __future__ import annotations

import numpy as np
import torch

from persia.data import IterableDataset
from persia.embedding.config import parse_embedding_config
from persia.embedding.data import IDTypeFeature, Label, NonIDTypeFeature, PersiaBatch

PREFIX_BITS = 12
# slot a: one ID per sample, summed; slot b: 0-4 IDs per sample, mean-pooled;
# slot c: raw (sequence of up to 3) — only in the raw job.
SLOTS = {"a": {"dim": 4}, "b": {"dim": 4, "pooling": "mean"}}
CARD = {"a": 30, "b": 20, "c": 15}


def embedding_file(raw: bool = False):
    slots = dict(SLOTS)
    if raw:
        slots["c"] = {"dim": 4, "embedding_summation": False, "sample_fixed_size": 3}
    return parse_embedding_config({"feature_index_prefix_bit": PREFIX_BITS, "slots_config": slots})


def make_batches(n_batches: int, batch_size: int = 16, seed: int = 0, raw: bool = False):
    """Deterministic batches: (ids per slot as (values, lengths), dense, labels)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        feats = {}
        la = np.ones(batch_size, dtype=np.int64)
        feats["a"] = (rng.integers(0, CARD["a"], batch_size).astype(np.uint64), la)
        lb = rng.integers(0, 5, batch_size).astype(np.int64)
        feats["b"] = (rng.integers(0, CARD["b"], int(lb.sum())).astype(np.uint64), lb)
        if raw:
            lc = rng.integers(0, 6, batch_size).astype(np.int64)
            feats["c"] = (rng.integers(0, CARD["c"], int(lc.sum())).astype(np.uint64), lc)
        dense = rng.normal(size=(batch_size, 3)).astype(np.float32)
        labels = rng.integers(0, 2, (batch_size, 1)).astype(np.float32)
        out.append((feats, dense, labels))
    return out


def to_persia(batch, requires_grad: bool = True) -> PersiaBatch:
    feats, dense, labels = batch
    return PersiaBatch(
        [IDTypeFeature.from_columnar(k, v, n) for k, (v, n) in feats.items()],
        non_id_type_features=[NonIDTypeFeature(dense)],
        labels=[Label(labels)],
        requires_grad=requires_grad,
    )


class ListDataset(IterableDataset):
    def __init__(self, batches, requires_grad: bool = True) -> None:
        super().__init__()
        self.batches = batches
        self.requires_grad = requires_grad

    def __iter__(self):
        for b in self.batches:
            yield to_persia(b, self.requires_grad)


class Net(torch.nn.Module):
    """Dense features + pooled embeddings -> linear -> tanh -> linear -> sigmoid."""

    def __init__(self, emb_width: int = 8, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(3 + emb_width, hidden)
        self.l2 = torch.nn.Linear(hidden, 1)

    def forward(self, non_id, embeddings):
        flat = [e.flatten(1) for e in embeddings]
        x = torch.cat([non_id[0], *flat], dim=1)
        return torch.sigmoid(self.l2(torch.tanh(self.l1(x))))


def train_ctx(model: torch.nn.Module, **kw):
    """A TrainCtx for these jobs: embedding Adagrad(lr=0.1), dense SGD(lr=0.1)."""
    from persia.ctx import TrainCtx
    from persia.embedding.optim import Adagrad

    return TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(),
        **kw,
    )


def run(ctx, batches, staleness: int = 1) -> list[float]:
    """Trains ``batches`` in ``ctx``; returns each step's loss."""
    from persia.data import DataLoader

    losses = []
    for b in DataLoader(ListDataset(batches), embedding_staleness=staleness):
        out, labels = ctx.forward(b)
        loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
        ctx.backward(loss)
        losses.append(loss.item())
    return losses
