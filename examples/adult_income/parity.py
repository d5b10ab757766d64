"""The paper's central claim on real data: hybrid (staleness 8) trains as well as synchronous (1).

    python examples/adult_income/parity.py [--seeds 3 4 5] [--epochs 1]

For each seed both modes get the same initialisation (dense model and embedding rows) and the same
data order; only the staleness differs. Prints one JSON line per run, then a summary line with the
mean test AUC of each mode and their difference (target: |difference| <= 0.002).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

# Load train_local.py by path: a module of that name may already be imported (another test).
_spec = importlib.util.spec_from_file_location(
    "adult_income_train", Path(__file__).resolve().parent / "train_local.py"
)
if _spec is None or _spec.loader is None:
    raise ImportError("cannot load train_local.py beside parity.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)
run = _train.run


def parity(seeds: list[int], epochs: int = 1, hybrid: int = 8) -> dict:
    runs = []
    for seed in seeds:
        for staleness in (hybrid, 1):
            r = run(staleness=staleness, seed=seed, epochs=epochs)
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("seed", "staleness_bound", "test_auc",
                                                "test_logloss", "staleness_mean", "wall_s")}))  # fmt: skip
    mean = {
        k: sum(r["test_auc"] for r in runs if r["staleness_bound"] == k) / len(seeds)
        for k in (hybrid, 1)
    }
    return {
        "seeds": seeds,
        "epochs": epochs,
        "hybrid_staleness": hybrid,
        "mean_auc_hybrid": mean[hybrid],
        "mean_auc_sync": mean[1],
        "auc_gap_hybrid_vs_sync": mean[1] - mean[hybrid],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--staleness", type=int, default=8, help="the hybrid run's staleness")
    args = p.parse_args()
    print(json.dumps(parity(args.seeds, args.epochs, args.staleness)))


if __name__ == "__main__":
    main()
