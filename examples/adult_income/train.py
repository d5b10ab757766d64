"""The Adult example's NN worker (PERSIA's shape): trains on the batches the data loaders send
(``StreamingDataset``), then tests on the test split and prints one JSON line.

Run by the Procfile line ``persia-launcher nn-worker train.py``. It passes no configuration
file: the NN worker takes ``config/embedding_config.yml`` and ``config/global_config.yml`` from
the job's parameter servers, as in PERSIA. PERSIA's example knobs are read as it read them:
``EMBEDDING_STALENESS`` (default 8 here) and ``REPRODUCIBLE`` (seeds are always set here).

The last stdout line (rank 0): ``{"test_auc": ..., "test_logloss": ..., "train_batches": ...,
"train_samples": ..., "embedding_rows": ..., "train_s": ...}``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from adult import batches, load
from model import DNN

from persia.ctx import TrainCtx, eval_ctx
from persia.data import DataLoader, IterableDataset, StreamingDataset
from persia.embedding.optim import Adagrad
from persia.env import get_local_rank, get_rank, get_world_size
from persia.logger import get_default_logger
from persia.metrics import log_loss, roc_auc
from persia.utils import setup_seed

logger = get_default_logger("nn_worker")


class TestDataset(IterableDataset):
    """The test split, read in this process (as PERSIA's example read its test.npz)."""

    def __init__(self, batch_size: int = 4096) -> None:
        super().__init__(buffer_size=10)
        self.batch_size = batch_size

    def __iter__(self):
        _, test = load()
        yield from batches(test, self.batch_size, requires_grad=False)


def test(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    preds, labels = [], []
    with eval_ctx(model=model) as ctx, torch.no_grad():
        for batch in loader:
            output, label = ctx.forward(batch)
            preds.append(output.float().cpu().numpy().reshape(-1))
            labels.append(label[0].cpu().numpy().reshape(-1))
    model.train()
    y, p = np.concatenate(labels), np.concatenate(preds)
    return roc_auc(y, p), log_loss(y, p)


def main() -> None:
    staleness = int(os.environ.get("EMBEDDING_STALENESS", 8))
    setup_seed(3)
    model = DNN()
    rank, world_size = get_rank(), get_world_size()
    use_cuda = torch.cuda.is_available()
    device_id = get_local_rank() if use_cuda else None
    if use_cuda:
        torch.cuda.set_device(device_id)
        model.cuda(device_id)
    embedding_optimizer = Adagrad(lr=0.05)
    dense_optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    loss_fn = torch.nn.BCELoss()
    steps = samples = 0
    start = time.perf_counter()
    with TrainCtx(
        model=model,
        embedding_optimizer=embedding_optimizer,
        dense_optimizer=dense_optimizer,
        mixed_precision=use_cuda,
        device_id=device_id,
    ) as ctx:
        train_loader = DataLoader(StreamingDataset(10), embedding_staleness=staleness)
        for batch in train_loader:
            output, labels = ctx.forward(batch)
            loss = loss_fn(output, labels[0])
            ctx.backward(loss)
            steps += 1
            samples += labels[0].shape[0]
            if steps % 50 == 0:
                logger.info(f"rank {rank}/{world_size}: batch {steps} loss {loss.item():.4f}")
        train_s = time.perf_counter() - start
        test_auc, test_logloss = test(model, DataLoader(TestDataset()))
        rows = sum(ctx.get_embedding_size())
    logger.info(f"test auc {test_auc:.4f}, log loss {test_logloss:.4f}")
    if rank == 0:
        result = {
            "test_auc": test_auc,
            "test_logloss": test_logloss,
            "train_batches": steps,
            "train_samples": samples,
            "embedding_rows": rows,
            "train_s": train_s,
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
