"""Checkpoint benchmark: job-checkpoint dump and load throughput, training pauses during a dump.

    python benchmarks/bench_checkpoint.py --quick    # CI: 200k rows, a few seconds
    python benchmarks/bench_checkpoint.py            # 4M rows x dim 16 + Adagrad (~1 GB on disk)

A :class:`~persia.store.ShardedStore` (``--shards`` shards, dim 16, element-wise Adagrad: 32
float32 per row) is filled with ``--rows`` rows by training lookups. Then:

* ``dump_rows_per_s`` / ``dump_mb_per_s``: :func:`persia.checkpoint.dump` (rows copied shard by
  shard under each shard's lock, written with fsync, CRC-32 on the fly, pointer switched);
* ``load_rows_per_s`` / ``load_mb_per_s``: :func:`persia.checkpoint.read` (every file verified)
  plus :func:`persia.checkpoint.restore_store` into a fresh store of the same shard count;
* ``delta_flush_rows_per_s``: one incremental delta of ``rows / 10`` changed rows;
* pauses: a training thread runs lookup + Adagrad steps of ``--batch`` keys on the store while a
  dump runs on another thread. ``train_step_ms_p50`` is its median step without a dump,
  ``train_step_ms_max_during_dump`` its longest step while the dump ran (the pause training saw),
  and ``longest_shard_lock_ms`` the longest time the dump held one shard's lock (its copy).

Each throughput is the median of ``--repeats`` runs after one warm-up. The page cache is not
dropped, so load figures are for a checkpoint still in memory (the common restart case on one
machine). One JSON line per metric: ``metric``, ``value``, ``unit`` plus sizes and ``machine``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))

import numpy as np  # noqa: E402
from bench_store import machine  # noqa: E402

from persia import checkpoint  # noqa: E402
from persia.embedding.optim import Adagrad  # noqa: E402
from persia.store import ShardedStore  # noqa: E402
from persia.store.delta import DeltaWriter  # noqa: E402

DIM = 16
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def build(rows: int, shards: int) -> ShardedStore:
    store = ShardedStore(shards, rows + 1024, Adagrad(lr=0.01), dims=[DIM])
    keys = (np.arange(1, rows + 1, dtype=np.uint64)) * GOLDEN
    for start in range(0, rows, 1 << 18):
        store.lookup(keys[start : start + (1 << 18)], DIM, True)
    return store


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    rows = args.rows or (200_000 if args.quick else 4_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    common = {
        "quick": args.quick,
        "rows": rows,
        "shards": args.shards,
        "dim": DIM,
        "optimizer": "adagrad",
        "repeats": repeats,
        "machine": machine(),
    }

    def emit(metric: str, value: float, unit: str, **extra: Any) -> None:
        print(
            json.dumps({"metric": metric, "value": float(value), "unit": unit, **extra, **common})
        )

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="persia-bench-ckpt-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        store = build(rows, args.shards)
        target = base / "ckpt"
        dumps, loads = [], []
        report = None
        for r in range(-1, repeats):
            t0 = time.perf_counter()
            report = checkpoint.dump(target, store, keep=0)
            dt = time.perf_counter() - t0
            if r >= 0:
                dumps.append((dt, report.bytes))
            fresh = ShardedStore(args.shards, rows + 1024, Adagrad(lr=0.01), dims=[DIM])
            t0 = time.perf_counter()
            checkpoint.restore_store(fresh, checkpoint.read(target))
            dt = time.perf_counter() - t0
            if r >= 0:
                loads.append((dt, report.bytes))
            del fresh
        assert report is not None
        mb = report.bytes / 1e6
        dump_s = statistics.median(d for d, _ in dumps)
        load_s = statistics.median(d for d, _ in loads)
        emit("dump_rows_per_s", rows / dump_s, "rows/s")
        emit("dump_mb_per_s", mb / dump_s, "MB/s", checkpoint_mb=round(mb, 1))
        emit("load_rows_per_s", rows / load_s, "rows/s")
        emit("load_mb_per_s", mb / load_s, "MB/s", checkpoint_mb=round(mb, 1))

        # incremental delta of rows/10 changed rows
        writer = DeltaWriter(store, base / "inc").start()
        changed = (np.arange(1, rows + 1, 10, dtype=np.uint64)) * GOLDEN
        grads = np.full((changed.size, DIM), 1e-3, dtype=np.float32)
        store.apply_gradients(changed, grads)
        t0 = time.perf_counter()
        info = writer.flush()
        dt = time.perf_counter() - t0
        writer.close()
        emit("delta_flush_rows_per_s", (info.rows if info else 0) / dt, "rows/s")

        # training pauses while a dump runs on another thread
        rng = np.random.default_rng(0)
        all_keys = (np.arange(1, rows + 1, dtype=np.uint64)) * GOLDEN
        g = rng.normal(size=(args.batch, DIM)).astype(np.float32) * 1e-3
        steps: list[tuple[float, float]] = []
        stop = threading.Event()

        def train() -> None:
            while not stop.is_set():
                keys = np.unique(all_keys[rng.integers(0, rows, args.batch)])
                t = time.perf_counter()
                store.lookup(keys, DIM, True)
                store.apply_gradients(keys, g[: keys.size])
                steps.append((t, time.perf_counter()))

        thread = threading.Thread(target=train)
        thread.start()
        time.sleep(0.5 if args.quick else 2.0)
        d0 = time.perf_counter()
        report = checkpoint.dump(target, store, keep=0)
        d1 = time.perf_counter()
        time.sleep(0.2)
        stop.set()
        thread.join()
        before = [b - a for a, b in steps if b < d0]
        during = [b - a for a, b in steps if b > d0 and a < d1]
        emit("train_step_ms_p50", 1e3 * statistics.median(before), "ms", batch=args.batch)
        emit(
            "train_step_ms_max_during_dump",
            1e3 * max(during, default=0.0),
            "ms",
            batch=args.batch,
            steps_during_dump=len(during),
            dump_s=round(d1 - d0, 3),
        )
        emit("longest_shard_lock_ms", 1e3 * report.longest_shard_pause_s, "ms")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
