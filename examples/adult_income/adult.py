"""UCI Adult, read from this folder's gzip copy and turned into persia batches.

8 ID slots (the raw category strings, hashed to uint64 with :func:`persia.hashing.hash_strings`:
no vocabulary to fit), 5 dense features (age, education_num, log1p(capital_gain),
log1p(capital_loss), hours_per_week, standardised with the training set's mean and std), label
income > 50K (the test file writes ``>50K.``). Data: Becker & Kohavi (1996), CC BY 4.0; see
data/README.md.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from persia.embedding.data import IDTypeFeatureWithSingleID, Label, NonIDTypeFeature, PersiaBatch
from persia.hashing import hash_strings

DATA_DIR = Path(__file__).resolve().parent / "data"
COLUMNS = (
    "age workclass fnlwgt education education_num marital_status occupation relationship race "
    "gender capital_gain capital_loss hours_per_week native_country income_bracket"
).split()
ID_SLOTS = (
    "workclass education marital_status occupation relationship race gender native_country"
).split()
DENSE = ("age", "education_num", "capital_gain", "capital_loss", "hours_per_week")
LOG1P = ("capital_gain", "capital_loss")


@dataclass
class Table:
    """One split: hashed IDs per slot, dense features, labels."""

    ids: dict[str, np.ndarray]  # slot -> u64[n]
    dense: np.ndarray  # f32[n, 5]
    labels: np.ndarray  # f32[n, 1]

    def __len__(self) -> int:
        return self.labels.shape[0]


def _read(path: Path, skip_first: bool) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as f:
        lines = f.read().splitlines()
    if skip_first:
        lines = lines[1:]
    rows = [r for r in csv.reader(lines, skipinitialspace=True) if len(r) == len(COLUMNS)]
    return rows


def _table(rows: list[list[str]], mean: np.ndarray | None, std: np.ndarray | None):
    cols = {name: [r[i] for r in rows] for i, name in enumerate(COLUMNS)}
    dense = np.stack([np.asarray(cols[c], dtype=np.float64) for c in DENSE], axis=1)
    for c in LOG1P:
        j = DENSE.index(c)
        dense[:, j] = np.log1p(dense[:, j])
    if mean is None or std is None:
        mean, std = dense.mean(axis=0), dense.std(axis=0)
    dense = ((dense - mean) / std).astype(np.float32)
    labels = np.array([">50K" in v for v in cols["income_bracket"]], dtype=np.float32)[:, None]
    ids = {s: hash_strings(cols[s]) for s in ID_SLOTS}
    return Table(ids, dense, labels), mean, std


def load(data_dir: Path = DATA_DIR) -> tuple[Table, Table]:
    """(train, test): adult.data and adult.test (its banner line skipped)."""
    train, mean, std = _table(_read(data_dir / "adult.data.gz", skip_first=False), None, None)
    test, _, _ = _table(_read(data_dir / "adult.test.gz", skip_first=True), mean, std)
    return train, test


def batches(table: Table, batch_size: int, *, requires_grad: bool, order: np.ndarray | None = None):
    """PersiaBatch objects over ``table`` (in ``order`` if given)."""
    idx = np.arange(len(table)) if order is None else order
    for start in range(0, len(idx), batch_size):
        sel = idx[start : start + batch_size]
        yield PersiaBatch(
            [IDTypeFeatureWithSingleID(s, table.ids[s][sel]) for s in ID_SLOTS],
            non_id_type_features=[NonIDTypeFeature(table.dense[sel])],
            labels=[Label(table.labels[sel])],
            requires_grad=requires_grad,
        )
