"""The Adult-income example in one process: the data set is read here (no data-loader process),
the parameter servers run embedded (the local backend). The same model, slots and data as the
PERSIA-style ``train.py`` + ``data_loader.py`` + ``Procfile`` beside it.

    python examples/adult_income/train_local.py                 # hybrid, staleness 8
    python examples/adult_income/train_local.py --staleness 1   # fully synchronous

The last stdout line is one JSON object: test_auc, test_logloss, samples_per_s, wall_s,
staleness_max, staleness_mean, embedding_rows (and the settings used).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adult import batches, load  # noqa: E402
from model import DNN  # noqa: E402

from persia.ctx import TrainCtx, eval_ctx  # noqa: E402
from persia.data import DataLoader, IterableDataset  # noqa: E402
from persia.embedding.optim import Adagrad  # noqa: E402
from persia.logger import get_default_logger  # noqa: E402
from persia.metrics import log_loss, roc_auc  # noqa: E402
from persia.utils import setup_seed  # noqa: E402

logger = get_default_logger("nn_worker")


class AdultDataset(IterableDataset):
    """Yields PersiaBatch objects over one split; a new shuffled order every epoch."""

    def __init__(self, table, batch_size: int, train: bool, seed: int, epochs: int = 1) -> None:
        super().__init__(buffer_size=10)
        self.table, self.batch_size, self.train = table, batch_size, train
        self.seed, self.epochs = seed, epochs

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.epochs):
            order = rng.permutation(len(self.table)) if self.train else None
            yield from batches(self.table, self.batch_size, requires_grad=self.train, order=order)


def evaluate(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    preds, labels = [], []
    with eval_ctx(model=model) as ctx, torch.no_grad():
        for batch in loader:
            output, label = ctx.forward(batch)
            preds.append(output.numpy().reshape(-1))
            labels.append(label[0].numpy().reshape(-1))
    model.train()
    y, p = np.concatenate(labels), np.concatenate(preds)
    return roc_auc(y, p), log_loss(y, p)


def run(
    staleness: int = 8,
    seed: int = 3,
    epochs: int = 1,
    batch_size: int = 128,
    embedding_lr: float = 0.05,
    dense_lr: float = 0.05,
    reproducible: bool = True,
    max_batches: int | None = None,
) -> dict:
    """Trains and tests once; returns the result dict that main() prints."""
    setup_seed(seed)
    train_table, test_table = load()
    model = DNN()
    embedding_optimizer = Adagrad(lr=embedding_lr)
    dense_optimizer = torch.optim.Adam(model.parameters(), lr=dense_lr / 10)
    loss_fn = torch.nn.BCELoss()
    start = time.perf_counter()
    samples = 0
    with TrainCtx(
        embedding_optimizer,
        dense_optimizer,
        model=model,
        mixed_precision=False,
        embedding_config_file=HERE / "config" / "embedding_config.yml",
        global_config_file=HERE / "config" / "global_config.yml",
    ) as ctx:
        train_loader = DataLoader(
            AdultDataset(train_table, batch_size, True, seed, epochs),
            embedding_staleness=staleness,
            reproducible=reproducible,
        )
        test_loader = DataLoader(AdultDataset(test_table, 4096, False, seed))
        for index, batch in enumerate(train_loader):
            output, labels = ctx.forward(batch)
            loss = loss_fn(output, labels[0])
            ctx.backward(loss)
            samples += labels[0].shape[0]
            if index % 200 == 0:
                logger.info(f"batch {index} loss {loss.item():.4f}")
            if max_batches is not None and index + 1 >= max_batches:
                break
        train_s = time.perf_counter() - start
        test_auc, test_logloss = evaluate(model, test_loader)
        report = train_loader.staleness_report()
        rows = sum(ctx.get_embedding_size())
    return {
        "test_auc": test_auc,
        "test_logloss": test_logloss,
        "samples_per_s": samples / train_s,
        "wall_s": time.perf_counter() - start,
        "staleness_max": report.max,
        "staleness_mean": report.mean,
        "staleness_histogram": {str(k): v for k, v in sorted(report.histogram.items())},
        "embedding_rows": rows,
        "staleness_bound": staleness,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--staleness", type=int, default=8, help="embedding staleness k (1 = sync)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-batches", type=int, default=None, help="stop early (smoke tests)")
    args = p.parse_args(argv)
    result = run(
        staleness=args.staleness,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
