"""Parameter-server core benchmark: one shard's lookups, inserts, optimizers, de-duplication, memory.

    python benchmarks/bench_store.py --quick     # CI: small sizes, a few seconds
    python benchmarks/bench_store.py             # full: 1M keys among 8M held rows (~2 minutes)
    python benchmarks/bench_store.py --scale     # + 62.5M rows x dim 16 (1e9 parameters, ~10 GB)
    python benchmarks/bench_store.py --scale-disk DIR [--scale-disk-rows N]
                                                 # + the disk tier (default 625M rows: 1e10 params)
    python benchmarks/bench_store.py --scale-only --scale-row-dtype float16 \
        --scale-optimizer rowwise --scale-rows 250000000     # 4e9 parameters (~17.5 GB)

Single thread; dim 16, element-wise Adagrad state and Uniform(-0.01, 0.01) init unless the metric
says otherwise. The shard is built for ``held + batch`` rows (``Shard(capacity, dims=[16])`` plus
``reserve``: every array allocated and its pages touched up front), filled with ``held`` rows by
training lookups, and probed with keys drawn uniformly at random from the held rows (the hard,
cache-missing case). Held keys are ``(i + 1) * 0x9E3779B97F4A7C15 mod 2**64`` (a bijection, so
distinct and spread over all 64 bits); new keys continue the sequence. Every metric is the median
of ``--repeats`` timed runs on fresh key samples, after one untimed warm-up run.

Metrics (one JSON line each: ``metric``, ``value``, ``unit`` plus ``quick``, ``machine`` and the
sizes): lookup_gather_rows_per_s (evaluation lookup), train_lookup_gather_rows_per_s (training
lookup: recency refreshed), insert_rows_per_s (training lookup of ``batch`` new keys into the shard
holding ``held``; the shard is brought back to ``held`` rows between runs, untimed),
adagrad_rows_per_s / rowwise_adagrad_rows_per_s / adam_rows_per_s (``apply_gradients`` by key,
probe included), dedupe_ids_per_s (``persia.worker.pooling.Deduper`` on ``batch`` Zipf(1.1) IDs,
reused), dict_baseline_rows_per_s (the evaluation lookup through a Python dict of key -> row plus
a numpy gather, same run) and lookup_gather_vs_dict_ratio, bytes_per_row (``stats()["bytes_used"]
/ capacity`` with the shard full at the capacity it was built for). ``--scale`` adds
scale_build_rows_per_s, scale_lookup_update_rows_per_s, scale_params, scale_bytes_per_param
(the table's arrays) and scale_peak_rss_bytes_per_param (the process's peak resident memory over
the parameters: what the issue-17 target of <= 5 bytes per parameter at 4e9 parameters reads,
with ``--scale-row-dtype float16 --scale-optimizer rowwise``). The scale store is pre-sized
(``reserve``), so no growth copy counts; ``--scale-only`` runs it alone (nothing else raises the
peak).

``--scale-disk DIR`` (alone, without the other metrics: ``--scale-disk-only``) builds a shard with
a disk tier in ``DIR`` holding ``--scale-disk-rows`` rows of dim 16 (values in
``--scale-dtype``; row-wise Adagrad, one f32 of state per row), of which ``--scale-ram-rows``
stay in RAM (default a tenth), by training lookups of new keys in chunks (the oldest spill to
disk), then times ``--scale-lookups`` training lookups + updates of keys drawn uniformly from all
rows (so about 90% hit disk: the hard case). No checkpoint is written. Metrics:
scale_disk_build_rows_per_s, scale_disk_lookup_update_rows_per_s, scale_disk_params (rows in
both tiers x 16), scale_disk_ram_bytes_per_param (peak RSS / parameters, which counts the slab's
page-cache pages mapped by the process; ``anon_bytes_per_param``: the anonymous RSS) and
scale_disk_bytes_per_param (the tier's file blocks / parameters). It refuses to start when the
tier would need more than ``--scale-disk-max-gb`` (default 60) or more than the free space.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # single thread, before numpy / numba load

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))

import numpy as np  # noqa: E402

from persia.embedding.optim import Adagrad, Adam  # noqa: E402
from persia.store.shard import Shard  # noqa: E402
from persia.store.table import ROW_DTYPES  # noqa: E402
from persia.worker.pooling import Deduper  # noqa: E402

DIM = 16
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def machine() -> str:
    """A short description of this machine (CPU model, cores, memory)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}"


def held_keys(start: int, n: int) -> np.ndarray:
    """Keys number ``start .. start + n - 1``: ``(i + 1) * GOLDEN mod 2**64`` (all distinct)."""
    i = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    return i * GOLDEN


def sample_keys(rng: np.random.Generator, held: int, n: int) -> np.ndarray:
    """``n`` keys drawn uniformly (with replacement) from the ``held`` first keys."""
    return (rng.integers(0, held, size=n, dtype=np.uint64) + np.uint64(1)) * GOLDEN


def median_rate(
    n: int, repeats: int, run: Callable[[int], Any], setup: Callable[[int], Any] | None = None
) -> tuple[float, float]:
    """Medians of ``n / wall seconds`` and ``n / thread CPU seconds`` over ``repeats`` timed calls
    ``run(r)`` after one warm-up call (``r = -1``); ``setup(r)`` runs untimed before each call.
    The CPU-time rate leaves out the time the thread waited for a core on a loaded machine."""
    rates, cpu_rates = [], []
    for r in range(-1, repeats):
        if setup is not None:
            setup(r)
        gc.collect()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        run(r)
        dt = time.perf_counter() - t0
        dc = time.thread_time() - c0
        if r >= 0:
            rates.append(n / dt)
            cpu_rates.append(n / max(dc, 1e-9))
    return statistics.median(rates), statistics.median(cpu_rates)


class Bench:
    """Prints one JSON line per metric."""

    def __init__(self, quick: bool, held: int, batch: int, repeats: int) -> None:
        self.common = {
            "quick": quick,
            "held": held,
            "batch": batch,
            "repeats": repeats,
            "dim": DIM,
            "machine": machine(),
        }

    def emit(self, metric: str, value: float, unit: str, **extra: Any) -> None:
        rec = {"metric": metric, "value": float(value), "unit": unit, **extra, **self.common}
        print(json.dumps(rec), flush=True)

    def rate(self, metric: str, rates: tuple[float, float], unit: str, **extra: Any) -> None:
        """A throughput line: the wall-clock median, plus the CPU-time median as ``value_cpu``."""
        self.emit(metric, rates[0], unit, value_cpu=round(rates[1], 1), **extra)


def build_shard(optimizer: Any, held: int, capacity: int, chunk: int) -> Shard:
    """A shard built for ``capacity`` rows (allocated and touched) holding ``held`` rows, whose
    LRU order is then shuffled (every held key looked up once more for training, in a random
    order), so that LRU neighbours are random rows as in a long-running job, not adjacent ones."""
    shard = Shard(capacity, optimizer, dims=[DIM])
    shard.reserve(capacity, DIM)
    for s in range(0, held, chunk):
        shard.lookup(held_keys(s, min(chunk, held - s)), DIM, True)
    perm = np.random.default_rng(99).permutation(held).astype(np.uint64)
    perm += np.uint64(1)
    perm *= GOLDEN
    for s in range(0, held, chunk):
        shard.lookup(perm[s : s + chunk], DIM, True)
    return shard


def bench_main(b: Bench, held: int, batch: int, repeats: int) -> None:
    capacity = held + batch
    chunk = max(1, min(batch, 1_000_000))
    rng = np.random.default_rng(20240601)
    samples = [sample_keys(rng, held, batch) for _ in range(repeats + 1)]
    grads = (rng.standard_normal((batch, DIM), dtype=np.float32) * 1e-2).astype(np.float32)

    shard = build_shard(Adagrad(), held, capacity, chunk)

    rate = median_rate(batch, repeats, lambda r: shard.lookup(samples[r + 1], DIM, False))
    b.rate("lookup_gather_rows_per_s", rate, "rows/s")
    eval_rate = rate[0]

    dict_rate = dict_baseline(shard, samples, batch, repeats)
    b.rate("dict_baseline_rows_per_s", dict_rate, "rows/s")
    b.emit("lookup_gather_vs_dict_ratio", eval_rate / dict_rate[0], "x")

    rate = median_rate(batch, repeats, lambda r: shard.lookup(samples[r + 1], DIM, True))
    b.rate("train_lookup_gather_rows_per_s", rate, "rows/s")

    rate = median_rate(batch, repeats, lambda r: shard.apply_gradients(samples[r + 1], grads))
    b.rate("adagrad_rows_per_s", rate, "rows/s", optimizer="adagrad")

    # insert: `batch` new keys into the shard holding `held`; between runs the oldest `batch` rows
    # are evicted (untimed) so every run starts at `held` rows with room for `batch` more.
    table = shard._tables[DIM]  # benchmark-only access to the one table, to shrink it back
    pending: list[np.ndarray] = []

    def reset(r: int) -> None:
        if table.rows > held:
            table.set_capacity(held)
            table.set_capacity(capacity)
            table.reserve(capacity)
        pending[:] = [held_keys(capacity + (r + 1) * batch, batch)]

    def insert(r: int) -> None:
        shard.lookup(pending[0], DIM, True)

    rate = median_rate(batch, repeats, insert, setup=reset)
    b.rate("insert_rows_per_s", rate, "rows/s")

    st = shard.stats()
    b.emit(
        "bytes_per_row",
        st["bytes_used"] / st["capacity"],
        "bytes/row",
        rows=st["rows"],
        capacity=st["capacity"],
        optimizer="adagrad",
    )


def bench_apply(
    opt: Any, held: int, capacity: int, chunk: int, samples: list[np.ndarray], grads: np.ndarray
) -> tuple[float, float]:
    """``apply_gradients`` rates of a shard with optimizer ``opt``."""
    shard = build_shard(opt, held, capacity, chunk)
    return median_rate(
        grads.shape[0], len(samples) - 1, lambda r: shard.apply_gradients(samples[r + 1], grads)
    )


def dict_baseline(
    shard: Shard, samples: list[np.ndarray], batch: int, repeats: int
) -> tuple[float, float]:
    """The evaluation lookup through a Python dict (key -> row) and a numpy gather."""
    table = shard._tables[DIM]  # benchmark-only access to the one table
    tkeys = table.row_keys[: table.rows].tolist()
    index = dict(zip(tkeys, range(len(tkeys)), strict=True))
    del tkeys
    values = table.values

    def dict_lookup(r: int) -> np.ndarray:
        get = index.get
        rows = np.array([get(k, -1) for k in samples[r + 1].tolist()], dtype=np.int64)
        out = values[rows]
        out[rows < 0] = 0.0
        return out

    return median_rate(batch, repeats, dict_lookup)


def bench_others(b: Bench, held: int, batch: int, repeats: int) -> None:
    """Row-wise Adagrad, Adam and de-duplication (after the Adagrad shard is gone)."""
    capacity = held + batch
    chunk = max(1, min(batch, 1_000_000))
    rng = np.random.default_rng(20240601)
    samples = [sample_keys(rng, held, batch) for _ in range(repeats + 1)]
    grads = (rng.standard_normal((batch, DIM), dtype=np.float32) * 1e-2).astype(np.float32)
    for name, opt in (("rowwise_adagrad", Adagrad(vectorwise_shared=True)), ("adam", Adam())):
        rate = bench_apply(opt, held, capacity, chunk, samples, grads)
        gc.collect()
        b.rate(f"{name}_rows_per_s", rate, "rows/s", optimizer=name)

    # de-duplication of Zipf(1.1) IDs (scattered over 64 bits), one Deduper reused
    zipf = [rng.zipf(1.1, size=batch).astype(np.uint64) * GOLDEN for _ in range(repeats + 1)]
    dedup = Deduper()
    rate = median_rate(batch, repeats, lambda r: dedup.unique_inverse(zipf[r + 1]))
    uniques = dedup.unique_inverse(zipf[0])[0].shape[0]
    b.rate("dedupe_ids_per_s", rate, "ids/s", uniques=uniques)


def bench_scale(
    b: Bench, rows: int, batch: int, lookups: int, row_dtype: str = "float32", rowwise: bool = False
) -> None:
    """A shard of ``rows`` x dim 16 with (row-wise) Adagrad and ``row_dtype`` rows; ``lookups``
    training lookups + updates."""
    chunk = 1_000_000
    t0 = time.perf_counter()
    tag = {"row_dtype": row_dtype, "optimizer": "rowwise_adagrad" if rowwise else "adagrad"}
    shard = Shard(rows, Adagrad(vectorwise_shared=rowwise), dims=[DIM], row_dtype=row_dtype)
    shard.reserve(rows, DIM)
    t_alloc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, rows, chunk):
        shard.lookup(held_keys(s, min(chunk, rows - s)), DIM, True)
    build = time.perf_counter() - t0
    b.emit(
        "scale_build_rows_per_s", rows / build, "rows/s", rows=rows, alloc_s=round(t_alloc, 1),
        **tag,
    )  # fmt: skip
    rng = np.random.default_rng(7)
    grads = (rng.standard_normal((batch, DIM), dtype=np.float32) * 1e-2).astype(np.float32)
    done = 0
    t0 = time.perf_counter()
    while done < lookups:
        keys = sample_keys(rng, rows, min(batch, lookups - done))
        shard.lookup(keys, DIM, True)
        shard.apply_gradients(keys, grads[: keys.shape[0]])
        done += keys.shape[0]
    dt = time.perf_counter() - t0
    st = shard.stats()
    params = st["rows"] * DIM
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    b.emit("scale_lookup_update_rows_per_s", done / dt, "rows/s", lookups=done, **tag)
    b.emit("scale_params", params, "parameters", rows=st["rows"], capacity=st["capacity"], **tag)
    b.emit(
        "scale_bytes_per_param",
        st["bytes_used"] / params,
        "bytes/parameter",
        bytes_used=st["bytes_used"],
        peak_rss_bytes=peak,
        **tag,
    )
    b.emit("scale_peak_rss_bytes_per_param", peak / params, "bytes/parameter", **tag)


def bench_scale_disk(b: Bench, args: argparse.Namespace, batch: int) -> None:
    """The disk-tier scale run (see the module docstring)."""
    from persia.store.disk import DiskTier, DiskTierConfig

    # the rows' storage dtype (bfloat16: its uint16 bit patterns)
    dtype = np.dtype(
        {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[args.scale_dtype]
    )
    rows = args.scale_disk_rows
    ram = args.scale_ram_rows or max(1, rows // 10)
    directory = Path(args.scale_disk)
    directory.mkdir(parents=True, exist_ok=True)
    probe = DiskTier(directory, 1, DIM, dtype, 1, np.float32)
    need = (rows - ram) * probe.record_size
    free = shutil.disk_usage(directory).free
    if need > args.scale_disk_max_gb * 1e9 or need > 0.95 * free:
        raise SystemExit(
            f"--scale-disk-rows {rows}: the tier needs {need / 1e9:.1f} GB "
            f"(limit {args.scale_disk_max_gb} GB, free {free / 1e9:.1f} GB)"
        )
    shutil.rmtree(directory / "shard", ignore_errors=True)
    shard = Shard(
        ram, Adagrad(vectorwise_shared=True), dims=[DIM],
        disk_tier=DiskTierConfig(directory / "shard", max(1, rows - ram)),
        row_dtype=args.scale_dtype,
    )  # fmt: skip
    shard.reserve(ram, DIM)
    chunk = min(1_000_000, max(1, ram // 2))
    t0 = time.perf_counter()
    for s in range(0, rows, chunk):
        shard.lookup(held_keys(s, min(chunk, rows - s)), DIM, True)
    build = time.perf_counter() - t0
    b.emit("scale_disk_build_rows_per_s", rows / build, "rows/s", rows=rows, ram_rows=ram)
    rng = np.random.default_rng(7)
    grads = (rng.standard_normal((batch, DIM), dtype=np.float32) * 1e-2).astype(np.float32)
    done = 0
    t0 = time.perf_counter()
    while done < args.scale_lookups:
        keys = np.unique(sample_keys(rng, rows, min(batch, args.scale_lookups - done)))
        shard.lookup(keys, DIM, True)
        shard.apply_gradients(keys, grads[: keys.shape[0]])
        done += keys.shape[0]
    dt = time.perf_counter() - t0
    st = shard.stats()
    params = (st["rows"] + st["disk_rows"]) * DIM
    tier_files = directory / "shard" / f"d{DIM}" / "tier.slab"
    disk_bytes = os.stat(tier_files).st_blocks * 512
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # peak RSS counts the slab's file pages mapped in this process (page cache, reclaimable);
    # the process's own memory is its anonymous RSS, read at the end (no growth copies by then)
    anon = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    common = {
        "rows": rows,
        "ram_rows": ram,
        "dtype": args.scale_dtype,
        "optimizer": "rowwise_adagrad",
    }
    b.emit("scale_disk_lookup_update_rows_per_s", done / dt, "rows/s", lookups=done, **common)
    b.emit("scale_disk_params", params, "parameters", disk_rows=st["disk_rows"],
           dropped=st["disk_dropped"], **common)  # fmt: skip
    b.emit("scale_disk_ram_bytes_per_param", rss / params, "bytes/parameter", peak_rss_bytes=rss,
           anon_rss_bytes=anon, anon_bytes_per_param=round(anon / params, 3),
           table_bytes=st["bytes_used"], tier_ram_bytes=st["disk_ram_bytes"], **common)  # fmt: skip
    b.emit("scale_disk_bytes_per_param", disk_bytes / params, "bytes/parameter",
           disk_bytes=disk_bytes, record_size=probe.record_size, **common)  # fmt: skip
    shard.close(remove_tier=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--scale", action="store_true", help="also the 1e9-parameter store")
    p.add_argument("--held", type=int, default=None, help="rows held (default 8M, quick 200k)")
    p.add_argument("--batch", type=int, default=None, help="keys per call (default 1M, quick 50k)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 5, quick 3)")
    p.add_argument("--scale-rows", type=int, default=62_500_000, help="rows of --scale")
    p.add_argument("--scale-lookups", type=int, default=10_000_000, help="keys of --scale")
    p.add_argument("--scale-disk", default=None, help="directory of the disk-tier scale run")
    p.add_argument("--scale-disk-only", action="store_true", help="only the disk-tier run")
    p.add_argument(
        "--scale-disk-rows",
        type=int,
        default=625_000_000,
        help="rows of --scale-disk (1e10 params)",
    )
    p.add_argument("--scale-ram-rows", type=int, default=None, help="of them in RAM (default 1/10)")
    p.add_argument(
        "--scale-dtype", choices=ROW_DTYPES, default="float32", help="row dtype of --scale-disk"
    )
    p.add_argument("--scale-disk-max-gb", type=float, default=60.0, help="tier size limit (GB)")
    p.add_argument("--scale-only", action="store_true", help="only the scale store (its peak RSS)")
    p.add_argument("--scale-row-dtype", choices=ROW_DTYPES, default="float32", help="its rows")
    p.add_argument(
        "--scale-optimizer", choices=("adagrad", "rowwise"), default="adagrad",
        help="element-wise or row-wise Adagrad",
    )  # fmt: skip
    args = p.parse_args(argv)
    held = args.held or (200_000 if args.quick else 8_000_000)
    batch = args.batch or (50_000 if args.quick else 1_000_000)
    repeats = args.repeats or (3 if args.quick else 5)
    b = Bench(args.quick, held, batch, repeats)
    if args.scale_disk is not None and args.scale_disk_only:
        bench_scale_disk(b, args, batch)
        return 0
    if not args.scale_only:
        bench_main(b, held, batch, repeats)
        gc.collect()
        bench_others(b, held, batch, repeats)
    if args.scale or args.scale_only:
        gc.collect()
        rows = 500_000 if args.quick else args.scale_rows
        lookups = 200_000 if args.quick else args.scale_lookups
        bench_scale(
            b, rows, batch, lookups, args.scale_row_dtype, args.scale_optimizer == "rowwise"
        )
    if args.scale_disk is not None:
        gc.collect()
        bench_scale_disk(b, args, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
