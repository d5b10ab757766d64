"""Where a disk-tier training step's time goes: one ``bench_e2e.py`` run (embedding-bound
workload, 600 timed steps, RAM capacity 0.35 of the rows it creates: about 1% of the keys
looked up come from disk) with the thread CPU of every
call to the store's and the tier's methods on the lookup and apply paths summed, and the NN
worker's waits for its next batch. A profiler, not a benchmark (no target; not run by CI).

    python benchmarks/profile_disk_tier.py                       # persia-hybrid+disk
    python benchmarks/profile_disk_tier.py --label persia-hybrid # RAM-only, for comparison

JSON lines out: one per method (``cpu_ms_per_step``: per step of the whole run, warm-up
included; calls), then the run's ms/step (timed steps) and the NN worker's waits.
``time.thread_time`` is the calling thread's CPU, so a method's figure is what it costs the
thread that calls it (nested methods are counted in their callers too).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _e2e_contenders as C  # noqa: E402
import bench_e2e as B  # noqa: E402

from persia.store import disk as disk_mod  # noqa: E402
from persia.store import shard as shard_mod  # noqa: E402
from persia.store import table as table_mod  # noqa: E402

_CPU: dict[str, float] = collections.defaultdict(float)
_CALLS: collections.Counter[str] = collections.Counter()

#: (owner, attribute) of every call timed
_TIMED = [
    (table_mod.EmbeddingTable, "train_lookup_rows"),
    (table_mod.EmbeddingTable, "_tier_room"),
    (table_mod.EmbeddingTable, "_spill_stamped"),
    (table_mod.EmbeddingTable, "_choose_victims"),
    (table_mod.EmbeddingTable, "_spill_rows"),
    (table_mod.EmbeddingTable, "_tier_restore"),
    (table_mod.EmbeddingTable, "recheck"),
    (table_mod.EmbeddingTable, "apply_rows"),
    (shard_mod.Shard, "apply_gradients_hinted"),
    (disk_mod.DiskTier, "put_rows"),
    (disk_mod.DiskTier, "take_into"),
    (disk_mod.DiskTier, "_grow_index"),
    (table_mod.K, "train_probe_create_kernel"),
    (table_mod.K, "train_init_kernel"),
    (table_mod.K, "evict_rows_hole_kernel"),
    (table_mod.K, "fill_holes_kernel"),
    (table_mod.K, "stamps_below_kernel"),
    (disk_mod.D, "put_kernel"),
    (disk_mod.D, "take_kernel"),
]


def _wrap(owner: Any, name: str) -> None:
    fn = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _CPU[name] += time.thread_time() - t0
            _CALLS[name] += 1

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="persia-hybrid+disk", help="the bench_e2e contender")
    p.add_argument("--disk-ram-fraction", type=float, default=0.35)
    args = p.parse_args(argv)
    e2e = B.parse_args(
        [
            "--workload", "embedding-bound", "--disk-tier", "--no-links", "--no-torchrec",
            "--row-dtypes", "none", "--disk-ram-fraction", str(args.disk_ram_fraction),
        ]
    )  # fmt: skip
    runs = {r["label"]: r for r in B.plan(e2e, False, "embedding-bound")}
    if args.label not in runs:
        raise SystemExit(f"--label: one of {sorted(runs)}")
    spec: dict[str, Any] = dict(runs[args.label])
    for owner, name in _TIMED:
        _wrap(owner, name)
    waits: list[float] = []
    timed_loop = C._timed_loop

    class Waits:
        def __init__(self, it: Any) -> None:
            self.it = it

        def __iter__(self) -> Waits:
            return self

        def __next__(self) -> Any:
            t0 = time.perf_counter()
            item = next(self.it)
            waits.append(time.perf_counter() - t0)
            return item

    def waited_loop(steps: Any, warmup: int, total: int, step_fn: Any) -> tuple[float, float]:
        return timed_loop(Waits(steps), warmup, total, step_fn)

    C._timed_loop = waited_loop
    runner: Any = C.RUNNERS[spec["runner"]]
    result: dict[str, Any] = runner(spec)
    steps = len(waits)  # warm-up steps included: the figures are per step of the whole run
    for name, cpu in sorted(_CPU.items(), key=lambda kv: -kv[1]):
        line = {"method": name, "cpu_ms_per_step": round(1e3 * cpu / steps, 3)}
        print(json.dumps(line | {"calls": _CALLS[name]}))
    timed = sorted(waits[spec["warmup_steps"] :])
    print(
        json.dumps(
            {
                "system": args.label,
                "ms_per_step": round(result["ms_per_step"], 3),
                "cpu_ms_per_step": round(result["cpu_ms_per_step"], 3),
                "wait_ms_per_step": round(1e3 * sum(timed) / max(1, len(timed)), 3),
                "longest_wait_ms": round(1e3 * timed[-1], 2) if timed else None,
                "disk_key_fraction": result.get("disk_key_fraction"),
            }
        )
    )


if __name__ == "__main__":
    main()
