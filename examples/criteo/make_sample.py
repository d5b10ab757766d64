"""Writes a tiny Criteo-format sample (train.tsv, test.tsv) for the job file's smoke test.

The format of Criteo's Kaggle / Terabyte click logs: tab-separated, no header, the label (0/1)
first, then 13 integer features (counts, may be negative or empty) and 26 categorical features
(32-bit hashes written as 8 hex digits, may be empty). The rows are synthetic: the label is drawn
from a logistic model of a few columns, so a model can learn something from them.

    python examples/criteo/make_sample.py          # rewrites data/train.tsv and data/test.tsv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NUM_INT = 13
NUM_CAT = 26


def make_world(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What train and test rows share: count rates, category vocabularies, planted effects."""
    return {
        "lam": rng.uniform(0.5, 20.0, NUM_INT),
        "vocab": rng.integers(0, 2**32, size=(NUM_CAT, 40), dtype=np.uint64),
        "effect": rng.normal(0.0, 1.5, size=40),
    }


def make_rows(n: int, world: dict[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    """``n`` Criteo-format lines."""
    vocab, effect = world["vocab"], world["effect"]
    ints = rng.poisson(lam=world["lam"], size=(n, NUM_INT)).astype(np.int64)
    ints[:, 1] -= 2  # Criteo's I2 holds small negative values
    int_missing = rng.random((n, NUM_INT)) < 0.15
    zipf = np.minimum(rng.zipf(1.6, size=(n, NUM_CAT)) - 1, 39)
    cat_missing = rng.random((n, NUM_CAT)) < 0.1
    logit = -1.0 + effect[zipf[:, 0]] + 0.5 * effect[zipf[:, 5]] + 0.05 * (ints[:, 0] - 3)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    lines = []
    for i in range(n):
        fields = [str(labels[i])]
        fields += ["" if int_missing[i, j] else str(ints[i, j]) for j in range(NUM_INT)]
        fields += [
            "" if cat_missing[i, j] else f"{int(vocab[j, zipf[i, j]]):08x}" for j in range(NUM_CAT)
        ]
        lines.append("\t".join(fields))
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-rows", type=int, default=200)
    p.add_argument("--test-rows", type=int, default=100)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "data")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    world = make_world(rng)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", args.train_rows), ("test.tsv", args.test_rows)):
        (args.out / name).write_text("\n".join(make_rows(n, world, rng)) + "\n")


if __name__ == "__main__":
    main()
