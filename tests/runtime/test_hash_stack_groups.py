"""Hash stacking and feature groups trained end to end through TrainCtx (local backend, staleness 1,
so deterministic) against a plain-PyTorch reference that does the hashing and the grouping by
hand:

* hash stacking (``hash_stack_config: {hash_stack_rounds: R, embedding_size: S}``): ID ``x`` of
  the slot becomes the R IDs ``mix64(x ^ j) % S + j * S`` (``persia.hashing``'s documented hash,
  salt j), pooled together; the reference is one ``nn.EmbeddingBag`` of ``R * S`` rows fed those
  IDs.
* feature groups (``feature_groups: {g: [a, b]}``): the slots of a group share one key space, so
  ID ``x`` of slot ``a`` and ID ``x`` of slot ``b`` are one row; the reference is one
  ``nn.EmbeddingBag`` weight that both slots index.

Both start from the rows persia creates (same key, same seed) and train with Adagrad; after every
step the losses agree, and at the end every embedding row and dense weight, to 1e-5.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from persia.ctx import TrainCtx
from persia.data import DataLoader
from persia.embedding.config import parse_embedding_config
from persia.embedding.optim import SGD, Adagrad
from persia.hashing import mix64_py
from persia.store import ShardedStore, Uniform
from persia.utils import embedding_seed
from persia.worker.pooling import add_prefix
from runtime._jobs import PREFIX_BITS, ListDataset, Net

STEPS = 15
LR = 0.3


def _persia_adagrad():
    return Adagrad(lr=LR, initial_accumulator_value=0.1, eps=1e-10)


def _torch_adagrad(params):
    return torch.optim.Adagrad(params, lr=LR, initial_accumulator_value=0.1, eps=1e-10)


def _batches(card: dict[str, int], steps: int = STEPS, batch_size: int = 16, seed: int = 7):
    """(ids per slot as (values, lengths), dense, labels); slot a one ID per sample, the others
    0-4 IDs per sample."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        feats = {}
        for slot, n in card.items():
            lengths = (
                np.ones(batch_size, np.int64)
                if slot == "a"
                else rng.integers(0, 5, batch_size).astype(np.int64)
            )
            feats[slot] = (rng.integers(0, n, int(lengths.sum())).astype(np.uint64), lengths)
        dense = rng.normal(size=(batch_size, 3)).astype(np.float32)
        labels = rng.integers(0, 2, (batch_size, 1)).astype(np.float32)
        out.append((feats, dense, labels))
    return out


def _persia_rows(cfg, slot: str, ids: np.ndarray, store=None) -> np.ndarray:
    """The rows of ``slot``'s table IDs ``ids`` (after any hash stacking): from ``store`` or, with
    none, the rows persia creates for them (deterministic from key and seed)."""
    if store is None:
        store = ShardedStore(
            1, 10_000, SGD(lr=0.1), init=Uniform(-0.01, 0.01), seed=embedding_seed()
        )
        training = True
    else:
        training = False
    keys = add_prefix(ids.astype(np.uint64), cfg.prefix_of(slot), PREFIX_BITS)
    return store.lookup(keys, cfg.slot(slot).dim, training=training)


def _train_persia(cfg, batches, seed_model, tables):
    model = copy.deepcopy(seed_model)
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    with TrainCtx(_persia_adagrad(), dense_opt, model=model, embedding_config_file=cfg) as ctx:
        loader = DataLoader(ListDataset(batches), embedding_staleness=1, reproducible=True)
        for b in loader:
            out, labels = ctx.forward(b)
            loss = torch.nn.functional.binary_cross_entropy(out, labels[0])
            ctx.backward(loss)
            losses.append(loss.item())
        rows = {
            name: _persia_rows(cfg, slot, np.arange(size), ctx.runtime.store)
            for name, (slot, size) in tables.items()
        }
    return losses, rows, model


def _train_torch(cfg, batches, seed_model, tables, slot_table, modes, to_rows):
    """``tables``: name -> (a slot that uses it, rows); ``slot_table``: slot -> table name;
    ``to_rows(slot, values, lengths)`` -> the table rows and lengths the slot's IDs use."""
    model = copy.deepcopy(seed_model)
    bags = {}
    for name, (slot, size) in tables.items():
        weight = torch.from_numpy(_persia_rows(cfg, slot, np.arange(size)).copy())
        bags[name] = torch.nn.Parameter(weight)
    emb_opt = _torch_adagrad(list(bags.values()))
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for feats, dense, labels in batches:
        embs = []
        for slot, (values, lengths) in feats.items():
            rows, lengths = to_rows(slot, values, lengths)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            embs.append(
                torch.nn.functional.embedding_bag(
                    torch.from_numpy(rows.astype(np.int64)),
                    bags[slot_table[slot]],
                    torch.from_numpy(offsets),
                    mode=modes[slot],
                    sparse=True,
                )
            )
        out = model([torch.from_numpy(dense)], embs)
        loss = torch.nn.functional.binary_cross_entropy(out, torch.from_numpy(labels))
        emb_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        emb_opt.step()
        dense_opt.step()
        losses.append(loss.item())
    rows = {name: bag.detach().numpy().copy() for name, bag in bags.items()}
    return losses, rows, model


def _compare(persia_run, torch_run, initial):
    p_losses, p_rows, p_model = persia_run
    t_losses, t_rows, t_model = torch_run
    np.testing.assert_allclose(p_losses, t_losses, rtol=1e-5, atol=1e-6)
    for name in t_rows:
        np.testing.assert_allclose(p_rows[name], t_rows[name], rtol=1e-5, atol=1e-6)
        assert np.abs(p_rows[name] - initial[name]).max() > 1e-3, f"table {name} did not train"
    for (n1, w1), (n2, w2) in zip(
        p_model.state_dict().items(), t_model.state_dict().items(), strict=True
    ):
        assert n1 == n2
        np.testing.assert_allclose(w1.numpy(), w2.numpy(), rtol=1e-5, atol=1e-6)


def _stack_by_hand(values: np.ndarray, rounds: int, size: int) -> np.ndarray:
    """Each ID x -> mix64(x ^ j) % size + j * size for j = 0..rounds-1, in sample order."""
    return np.array(
        [(mix64_py(int(x) ^ j) % size) + j * size for x in values for j in range(rounds)],
        dtype=np.uint64,
    )


def test_hash_stacking_matches_plain_pytorch():
    rounds, size = 2, 5
    # slot a: 200 distinct IDs squeezed into 2 * 5 rows, summed; slot b: plain, mean-pooled
    cfg = parse_embedding_config(
        {
            "feature_index_prefix_bit": PREFIX_BITS,
            "slots_config": {
                "a": {
                    "dim": 4,
                    "hash_stack_config": {"hash_stack_rounds": rounds, "embedding_size": size},
                },
                "b": {"dim": 4, "pooling": "mean"},
            },
        }
    )
    card = {"a": 200, "b": 20}
    batches = _batches(card)
    tables = {"a": ("a", rounds * size), "b": ("b", card["b"])}

    def to_rows(slot, values, lengths):
        if slot == "a":
            return _stack_by_hand(values, rounds, size), lengths * rounds
        return values, lengths

    seed_model = Net()
    initial = {n: _persia_rows(cfg, s, np.arange(k)) for n, (s, k) in tables.items()}
    persia_run = _train_persia(cfg, batches, seed_model, tables)
    torch_run = _train_torch(
        cfg, batches, seed_model, tables, {"a": "a", "b": "b"}, {"a": "sum", "b": "mean"}, to_rows
    )
    _compare(persia_run, torch_run, initial)
    # the stacked table is all that slot a touched: 200 IDs, at most rounds * size rows
    hit = _stack_by_hand(np.concatenate([f["a"][0] for f, _, _ in batches]), rounds, size)
    assert len(np.unique(hit)) == rounds * size


def test_feature_groups_match_plain_pytorch():
    # slots a (summed) and b (mean) share one key space; c is a group of its own
    cfg = parse_embedding_config(
        {
            "feature_index_prefix_bit": PREFIX_BITS,
            "slots_config": {
                "a": {"dim": 4},
                "b": {"dim": 4, "pooling": "mean"},
                "c": {"dim": 4},
            },
            "feature_groups": {"ab": ["a", "b"]},
        }
    )
    assert cfg.prefix_of("a") == cfg.prefix_of("b") != cfg.prefix_of("c")
    card = {"a": 12, "b": 12, "c": 10}
    batches = _batches(card)
    tables = {"ab": ("a", 12), "c": ("c", card["c"])}
    seed_model = Net(emb_width=12)
    initial = {n: _persia_rows(cfg, s, np.arange(k)) for n, (s, k) in tables.items()}
    persia_run = _train_persia(cfg, batches, seed_model, tables)
    torch_run = _train_torch(
        cfg,
        batches,
        seed_model,
        tables,
        {"a": "ab", "b": "ab", "c": "c"},
        {"a": "sum", "b": "mean", "c": "sum"},
        lambda slot, values, lengths: (values, lengths),
    )
    _compare(persia_run, torch_run, initial)
    # and the grouping matters: separate tables per slot train to other rows
    separate = _train_torch(
        cfg,
        batches,
        seed_model,
        {"a": ("a", 12), "b": ("a", 12), "c": ("c", 10)},
        {"a": "a", "b": "b", "c": "c"},
        {"a": "sum", "b": "mean", "c": "sum"},
        lambda slot, values, lengths: (values, lengths),
    )
    assert not np.allclose(separate[1]["a"], persia_run[1]["ab"], rtol=1e-5, atol=1e-6)
