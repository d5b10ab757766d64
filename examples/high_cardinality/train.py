"""A job whose embedding table is far larger than its capacity: eviction and admission at work.

    python examples/high_cardinality/train.py [--batches 360] [--capacity 200000]

A generated stream (persia.datasets.SyntheticStream): 8 ID slots of 5M possible IDs each, drawn
from a Zipf-like law, and labels from a planted teacher with a per-ID effect. Over the run more
than 1M distinct IDs arrive, while the parameter servers hold at most ``--capacity`` rows: the
least recently used rows are evicted, and new IDs are admitted with probability
``--admit-probability``. The held-out AUC is compared with a model on the dense features alone
(same data, same steps) and with the teacher's own AUC (the ceiling). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from persia.ctx import TrainCtx, eval_ctx
from persia.data import DataLoader
from persia.datasets import SyntheticStream
from persia.embedding import EmbeddingConfig
from persia.embedding.config import parse_embedding_config, parse_global_config
from persia.embedding.optim import Adagrad
from persia.metrics import roc_auc
from persia.utils import setup_seed

DIM = 8


class Model(torch.nn.Module):
    def __init__(self, num_dense: int, num_slots: int, use_embeddings: bool = True) -> None:
        super().__init__()
        self.use_embeddings = use_embeddings
        width = num_dense + (num_slots * DIM if use_embeddings else 0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        )

    def forward(self, non_id, embeddings):
        parts = [non_id[0], *embeddings] if self.use_embeddings else [non_id[0]]
        return self.net(torch.cat(parts, dim=1)).squeeze(1)


def dense_only_auc(stream, batches, batch_size, held_out) -> float:
    """The same steps on the dense features alone (plain PyTorch)."""
    model = Model(stream.num_dense, stream.num_slots, use_embeddings=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for b in stream.batches(0, batches, batch_size):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model([torch.from_numpy(b.dense)], []), torch.from_numpy(b.labels[:, 0])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ys, ps = [], []
        for b in stream.batches(*held_out, batch_size):
            ps.append(model([torch.from_numpy(b.dense)], []).numpy())
            ys.append(b.labels[:, 0])
    return roc_auc(np.concatenate(ys), np.concatenate(ps))


def run(
    batches: int = 360,
    batch_size: int = 1024,
    capacity: int = 200_000,
    admit_probability: float = 0.8,
    slots: int = 8,
    cardinality: int = 5_000_000,
    staleness: int = 4,
    seed: int = 0,
) -> dict:
    setup_seed(seed)
    stream = SyntheticStream(
        [cardinality] * slots, num_dense=4, zipf_exponent=1.0, id_effect_scale=0.6,
        dense_effect_scale=0.3, bias=-1.0, seed=seed,
    )  # fmt: skip
    names = stream.slot_names()
    held_out = (1_000_000, 20)  # batch indices never trained on
    emb_cfg = parse_embedding_config({"slots_config": {n: {"dim": DIM} for n in names}})
    glob_cfg = parse_global_config(
        {
            "embedding_parameter_server_config": {
                "capacity": capacity,
                "num_hashmap_internal_shards": 2,
            }
        }
    )
    model = Model(stream.num_dense, slots)
    start = time.perf_counter()
    with TrainCtx(
        Adagrad(lr=0.05),
        torch.optim.Adam(model.parameters(), lr=1e-3),
        model=model,
        embedding_config=EmbeddingConfig(admit_probability=admit_probability),
        embedding_config_file=emb_cfg,
        global_config_file=glob_cfg,
    ) as ctx:
        loader = DataLoader(
            stream.dataset(names, 0, batches, batch_size), embedding_staleness=staleness
        )
        for batch in loader:
            logits, labels = ctx.forward(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[0][:, 0])
            ctx.backward(loss)
        train_s = time.perf_counter() - start
        stats = ctx.runtime.store.stats()
        test = DataLoader(stream.dataset(names, *held_out, batch_size, requires_grad=False))
        ys, ps = [], []
        model.eval()
        with eval_ctx(model=model) as ectx, torch.no_grad():
            for batch in test:
                logits, labels = ectx.forward(batch)
                ps.append(logits.numpy())
                ys.append(labels[0].numpy()[:, 0])
        report = loader.staleness_report()
    distinct = sum(
        len(np.unique(np.concatenate([b.ranks[s] for b in stream.batches(0, batches, batch_size)])))
        for s in range(slots)
    )
    return {
        "test_auc": roc_auc(np.concatenate(ys), np.concatenate(ps)),
        "dense_only_auc": dense_only_auc(stream, batches, batch_size, held_out),
        "teacher_auc": stream.teacher_auc(*held_out, batch_size),
        "distinct_ids": int(distinct),
        "capacity": capacity,
        "embedding_rows": int(stats["rows"]),
        "evictions": int(stats["evictions"]),
        "admissions": int(stats["admissions"]),
        "rejections": int(stats["rejections"]),
        "samples_per_s": batches * batch_size / train_s,
        "staleness_max": report.max,
        "staleness_mean": report.mean,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, default=360)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--capacity", type=int, default=200_000)
    p.add_argument("--admit-probability", type=float, default=0.8)
    p.add_argument("--staleness", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(run(a.batches, a.batch_size, a.capacity, a.admit_probability,
                         staleness=a.staleness, seed=a.seed)))  # fmt: skip


if __name__ == "__main__":
    main()
