"""In-process predict latency: persia.serving's ``Predictor.predict`` against the hand-written
baseline handler's computation, on raw Adult rows, per batch size.

    python benchmarks/bench_predict.py --quick    # CI: a few seconds
    python benchmarks/bench_predict.py            # 12 rounds of 0.3 s per contender and batch

No server and no HTTP: what ``bench_serving.py``'s JSON-rows cells pay for the recipe itself. An
Adult-income export is trained (``--train-samples`` rows; or ``--export DIR`` reuses one) and the
baseline's files are written from it as ``bench_serving.py`` does. Contenders, on the same test
rows (every value a string, as ``bench_serving.py`` sends them):

* ``persia``: ``Predictor.predict(rows)`` on the list of dicts;
* ``persia-table``: ``Predictor.predict(rows_table(rows))``, what ``persia serve`` computes for a
  parsed ``POST /predict`` body (the server's Arrow columns, then the predictor);
* ``baseline``: the hand-written handler's computation (``bench_serving.baseline_compute``) on
  the list of dicts, without its pydantic parsing.

Before timing, the three must give the same predictions (1e-5). For each batch size, ``--rounds``
rounds; in each the contenders take turns (order rotated per round), each calling repeatedly for
``--round-s`` seconds (at most ``--max-calls`` calls). One JSON line per contender and batch
(``p50_us`` and ``p99_us`` of the pooled calls) and per persia contender and batch a ``ratio``
line: ``value`` is the median over the rounds of the contender's median / the baseline's median
in that round. ``machine`` and ``load_avg`` are on every line.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))

import numpy as np  # noqa: E402
from bench_serving import (  # noqa: E402
    ADULT,
    _load_avg,
    adult_rows,
    baseline_compute,
    write_baseline_files,
)
from bench_store import machine  # noqa: E402


def contenders(export: Path, files: Path) -> dict[str, Callable[[list[dict[str, Any]]], Any]]:
    import persia.serving
    from persia.server.app import rows_table

    predictor = persia.serving.load(export)
    return {
        "persia": predictor.predict,
        "persia-table": lambda rows: predictor.predict(rows_table(rows)),
        "baseline": baseline_compute(files),
    }


def timed(fn: Callable[[Any], Any], rows: Any, budget_s: float, max_calls: int) -> list[float]:
    """Per-call times (µs) of ``fn(rows)``, called until ``budget_s`` or ``max_calls``."""
    out: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(out) < max_calls:
        t0 = time.perf_counter()
        fn(rows)
        t1 = time.perf_counter()
        out.append((t1 - t0) * 1e6)
        if t1 > stop:
            break
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few seconds (CI)")
    p.add_argument("--batches", default="1,64,1024")
    p.add_argument("--rounds", type=int, default=None, help="default 12 (3 with --quick)")
    p.add_argument("--round-s", type=float, default=None, help="default 0.3 (0.05 with --quick)")
    p.add_argument("--max-calls", type=int, default=20000)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--export", type=Path, default=None, help="reuse this Adult export")
    args = p.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    rounds = args.rounds or (3 if args.quick else 12)
    round_s = args.round_s or (0.05 if args.quick else 0.3)
    if args.quick:
        args.train_samples = min(args.train_samples, 512)
    common = {"quick": args.quick, "machine": machine(), "load_avg": _load_avg()}

    from persia.job.config import load_job

    job = load_job(ADULT, [f"training.max_samples={args.train_samples}", "training.progress=none"])
    with tempfile.TemporaryDirectory(prefix="persia-bench-predict-") as d:
        tmp = Path(d)
        export = args.export
        if export is None:
            from persia.serving import run_and_export

            export = tmp / "export"
            run_and_export(job, export)
        write_baseline_files(export, tmp / "baseline")
        fns = contenders(export, tmp / "baseline")
        all_rows = adult_rows(job, max(batches))
        names = list(fns)
        worst: dict[str, float] = {}
        for batch in batches:
            rows = all_rows[:batch]
            got = {k: np.asarray(fn(rows), dtype=np.float64) for k, fn in fns.items()}
            for k in names:
                diff = float(np.max(np.abs(got[k] - got["baseline"])))
                if got[k].shape != (batch,) or diff > 1e-5:
                    raise SystemExit(f"{k} disagrees with the baseline at batch {batch}: {diff}")
            times: dict[str, list[float]] = {k: [] for k in names}
            medians: dict[str, list[float]] = {k: [] for k in names}
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for k in order:
                    t = timed(fns[k], rows, round_s, args.max_calls)
                    times[k] += t
                    medians[k].append(statistics.median(t))
            for k in names:
                line = {
                    **common,
                    "metric": "predict_latency",
                    "contender": k,
                    "batch": batch,
                    "p50_us": round(float(np.percentile(times[k], 50)), 1),
                    "p99_us": round(float(np.percentile(times[k], 99)), 1),
                    "calls": len(times[k]),
                }
                print(json.dumps(line), flush=True)
            for k in names[:-1]:
                per_round = [a / b for a, b in zip(medians[k], medians["baseline"], strict=True)]
                value = statistics.median(per_round)
                worst[k] = max(worst.get(k, 0.0), value)
                line = {
                    **common,
                    "metric": "ratio",
                    "contender": k,
                    "to": "baseline",
                    "batch": batch,
                    "value": round(value, 3),
                    "per_round": [round(x, 3) for x in per_round],
                }
                print(json.dumps(line), flush=True)
    summary = {
        **common,
        "metric": "summary",
        "ratio_max": {k: round(v, 3) for k, v in worst.items()},
        "load_avg_end": _load_avg(),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
