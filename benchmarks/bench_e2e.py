"""End-to-end benchmark: persia (hybrid and synchronous) against what users would pick instead.

    python benchmarks/bench_e2e.py --quick          # CI: small tables, < 2 minutes
    python benchmarks/bench_e2e.py                  # full: Criteo's 33.8M rows, all contenders
    python benchmarks/bench_e2e.py --sweep --chart benchmarks/e2e.png   # + AUC vs staleness
    python benchmarks/bench_e2e.py --chart-from a.jsonl b.jsonl --chart e2e.png  # saved runs
    python benchmarks/bench_e2e.py --workload embedding-bound --repeat 3    # the GPU-worker regime
    python benchmarks/bench_e2e.py --device cuda --workload embedding-bound  # dense model on a GPU
    python benchmarks/bench_e2e.py --disk-tier --only persia-hybrid,persia-hybrid+disk,persia-hybrid+disk-cold

Every contender trains one fixed model per workload, batch 2048, element-wise Adagrad on the
embeddings (row-wise Adagrad as a second setting), dense Adagrad, on the same seeded
Criteo-shaped stream (:class:`persia.datasets.SyntheticStream`), each in its own subprocess
(``_e2e_contenders.py``), one after the other. The workloads (``--workload``, comma-separated):

* ``dlrm`` (the default): bottom MLP 13-512-256-64-16, the 26 pooled dim-16 embeddings
  concatenated with it, top MLP 512-256-1; 26 one-hot slots. The dense step dominates.
* ``embedding-bound``: bottom MLP 13-16, top MLP (16 + 26 * 16)-32-1, the same slots: the dense
  step takes a few ms and the embedding path sets the pace (PERSIA's GPU-NN-worker regime).
* ``multi-hot``: the embedding-bound model, with six slots multi-hot (up to 20 IDs per sample in
  slots 2, 11, 20; up to 5 in slots 3, 15, 23; uniform from 1), summed.

The contenders:

* ``persia-hybrid``: persia's embedded backend, staleness 8;
* ``persia-sync``: the same, staleness 1;
* ``persia-hybrid-sparecore`` (workloads other than dlrm): persia-hybrid with torch on one
  thread fewer than the cores, so that the embedding path's lookup and applier threads get a
  core of their own instead of preempting one of torch's OpenMP threads (its line
  ``hybrid_sparecore_over_bound``);
* ``torch-embeddingbag``: 26 ``nn.EmbeddingBag(cardinality, 16, mode="sum", sparse=True)`` and
  ``torch.optim.Adagrad``;
* ``torchrec-fused``: TorchRec's ``FusedEmbeddingBagCollection`` on CPU (row-wise and element-wise
  Adagrad), when ``make bench-torchrec-install`` has installed it (skipped with a note otherwise);
* ``dense-only``: the model alone on pre-built embedding tensors: the ceiling;
* ``persia-hybrid-f16`` / ``persia-hybrid-bf16``: persia-hybrid with float16 / bfloat16 rows on
  the parameter servers (``--row-dtypes``; ``--row-roundings nearest,stochastic`` adds the
  stochastically rounded ``-sr`` runs), with ratio lines ``hybrid_f16_vs_f32`` (throughput) and
  ``auc_gap_hybrid_f16_vs_f32`` (``auc(persia-hybrid) - auc(persia-hybrid-f16)``; target <= 0.002).

``--device cuda`` runs every contender's dense model on the first GPU (the embeddings stay on
the CPU); where torch sees no CUDA device it stops with a message saying so.

With ``--disk-tier``, persia-hybrid also runs with a disk tier (``persia.store.disk``) under a
RAM capacity of ``--disk-ram-fraction`` of the rows the run creates, so that some of each batch's
keys are on disk when it is looked up (measured: ``disk_key_fraction``, rows read back from disk
per key looked up): ``persia-hybrid+disk`` with the page cache warm, ``persia-hybrid+disk-cold``
with the tier's pages evicted (``posix_fadvise(DONTNEED)``) before every step; ``persia-hybrid+evict``: the same RAM capacity without the tier (rows past it are
dropped). Lines ``disk_vs_ram`` and ``disk_cold_vs_ram`` (target >= 0.8 warm, with about 1% of
keys on disk), ``disk_vs_evict`` (the tier's own cost: the same RAM capacity, rows dropped
instead of spilled), ``auc_gap_evict_vs_disk`` (what dropping rows costs) and
``auc_gap_disk_vs_ram``.

With ``--links`` (default on) persia-sync and persia-hybrid also run with a simulated network link
between the embedding worker and the parameter servers (:mod:`persia.rpc.simlink`): 10 Gbit/s
with 50 us and 1 Gbit/s with 100 us one-way latency. Behind the 1 Gbit/s link (and any ``--link``)
``persia-hybrid-f16wire@NAME`` runs the hybrid with wire compression (:mod:`persia.rpc.wire`:
rows and gradients as float16 with a per-row scale); its ratio lines compare the link's MB per
step (``wire_link_mb_ratio_NAME``, compressed / plain), the AUC (``auc_gap_wire_NAME``) and the
speed (``wire_vs_plain_NAME``) with ``persia-hybrid@NAME``.

Output: one JSON line per run (``workload``, ``system``, ``samples_per_s``, ``auc``,
``logloss``, ``peak_rss_bytes``, ...), then per workload ratio lines ``{"metric": ..., "value": ...,
"unit": ..., "workload": ...}``, among them the hybrid's bound (``hybrid_bound_ms_per_step``:
a step takes at least the dense-only step and at least persia-sync's CPU time per step spread
over the cores) and ``hybrid_over_bound``. The embedding-bound and multi-hot workloads also
get the embedding path's cost per stage (``bench_emb_path.py``'s ``emb_path_ns_per_id`` lines,
from their own process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from persia.datasets.synthetic import CRITEO_CARDINALITIES  # noqa: E402
from persia.errors import ConfigError  # noqa: E402
from persia.rpc.simlink import parse_link  # noqa: E402

#: Where ``make bench-torchrec-install`` puts TorchRec and fbgemm (outside the venv's packages).
TORCHREC_DIR = ROOT / ".venv" / "bench-torchrec"
LINKS = {"10gbit": "10gbit:50us", "1gbit": "1gbit:100us"}
#: The standard links behind which the hybrid also runs with f16 wire compression (and every
#: ``--link``).
WIRE_LINKS = ("1gbit",)
#: Slot -> the most IDs per sample of the multi-hot workload (``bench_emb_path.MULTI_HOT``).
MULTI_HOT = {2: 20, 11: 20, 20: 20, 3: 5, 15: 5, 23: 5}
#: name -> the model's hidden sizes, the IDs per sample of each slot, the default timed steps.
WORKLOADS: dict[str, dict[str, Any]] = {
    "dlrm": {"bottom": [512, 256, 64], "top": [512, 256], "ids_per_sample": 1, "steps": 200},
    "embedding-bound": {"bottom": [], "top": [32], "ids_per_sample": 1, "steps": 600},
    "multi-hot": {
        "bottom": [],
        "top": [32],
        "ids_per_sample": [MULTI_HOT.get(s, 1) for s in range(len(CRITEO_CARDINALITIES))],
        "steps": 600,
    },
}
#: The contenders a quick run of a workload other than dlrm runs (in one process, to stay fast).
QUICK_CONTENDERS = ("dense-only", "torch-embeddingbag", "persia-sync", "persia-hybrid",
                    "torchrec-fused", "persia-profile", "persia-hybrid-f16",
                    "persia-hybrid-bf16", "persia-hybrid-sparecore")  # fmt: skip
#: persia-hybrid whose NN worker runs torch on one thread fewer than the cores (workloads other
#: than dlrm): the embedding path's threads get a core of their own.
SPARE_CORE = "persia-hybrid-sparecore"
#: Short names of the half-precision row dtypes in contender labels (persia-hybrid-f16, ...).
ROW_DTYPE_TAGS = {"float16": "f16", "bfloat16": "bf16"}


def half_label(row_dtype: str, rounding: str) -> str:
    """The label of persia-hybrid with ``row_dtype`` rows rounded by ``rounding``."""
    tag = ROW_DTYPE_TAGS[row_dtype]
    return f"persia-hybrid-{tag}" + ("-sr" if rounding == "stochastic" else "")


def torchrec_available(path: Path) -> bool:
    return (path / "torchrec").is_dir() and (path / "fbgemm_gpu").is_dir()


def run_one(
    spec: dict[str, Any] | list[dict[str, Any]], extra_path: Path | None, timeout_s: float
) -> list[dict[str, Any]]:
    """Runs one contender (or a list of them, one after the other) in a subprocess; returns its
    JSON lines (or an error record per contender that printed none)."""
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    cmd = [sys.executable, str(HERE / "_e2e_contenders.py"), json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        proc = None
    specs = spec if isinstance(spec, list) else [spec]
    lines = [json.loads(ln) for ln in (proc.stdout if proc else "").splitlines()
             if ln.startswith("{")]  # fmt: skip
    took = round(time.perf_counter() - t0, 1)
    out = []
    for one in specs:
        mine = [x for x in lines if (x.get("system") or x.get("run")) == one["label"]]
        if mine:
            for x in mine:
                x["process_s"] = took
                if len(specs) > 1:
                    x["shared_process"] = True  # peak RSS is the process's, not this run's
            out.extend(mine)
        elif proc is None:
            out.append({"system": one["label"], "workload": one["workload"],
                        "error": f"timed out after {timeout_s:.0f} s"})  # fmt: skip
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            out.append({"system": one["label"], "workload": one["workload"],
                        "error": f"exit {proc.returncode}: " + " | ".join(tail)})  # fmt: skip
    return out


def plan(
    args: argparse.Namespace, have_torchrec: bool, workload: str = "dlrm"
) -> list[dict[str, Any]]:
    """The runs of one workload, in order: one spec per subprocess."""
    cards = [min(c, args.max_rows) for c in CRITEO_CARDINALITIES] if args.max_rows else None
    w = WORKLOADS[workload]
    base = {
        "workload": workload,
        "bottom": w["bottom"],
        "top": w["top"],
        "cardinalities": cards or list(CRITEO_CARDINALITIES),
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "steps": args.steps if args.steps is not None else w["steps"],
        "eval_batches": args.eval_batches,
        "seed": args.seed,
        "emb_lr": args.emb_lr,
        "dense_lr": args.dense_lr,
        "ps_shards": args.ps_shards,
        "ids_per_sample": w["ids_per_sample"],
        "optimizer": "adagrad",
        "torch_threads": args.torch_threads,
        "device": args.device,
    }

    def persia(label: str, staleness: int, **kw: Any) -> dict[str, Any]:
        return {**base, "runner": "persia", "label": label, "staleness": staleness, **kw}

    runs = [
        {**base, "runner": "dense-only", "label": "dense-only"},
        {**base, "runner": "torch-embeddingbag", "label": "torch-embeddingbag"},
        persia("persia-sync", 1),
        persia("persia-hybrid", args.staleness),
    ]
    if args.rowwise:
        runs.append(persia("persia-hybrid-rowwise", args.staleness, optimizer="rowwise"))
    if workload != "dlrm":  # the NN worker's torch leaves one core to the embedding path
        spare = max(1, len(os.sched_getaffinity(0)) - 1)
        runs.append(persia(SPARE_CORE, args.staleness, torch_threads=spare))
    for row_dtype in args.row_dtypes:  # half-precision rows beside float32 (issue 17)
        for rounding in args.row_roundings:
            runs.append(
                persia(
                    half_label(row_dtype, rounding),
                    args.staleness,
                    row_dtype=row_dtype,
                    row_rounding=rounding,
                )
            )
    if have_torchrec:
        runs.append({**base, "runner": "torchrec-fused", "label": "torchrec-fused"})
        if args.rowwise:
            runs.append(
                {
                    **base,
                    "runner": "torchrec-fused",
                    "label": "torchrec-fused-rowwise",
                    "optimizer": "rowwise",
                }
            )
    if args.links:
        for name, link in {**LINKS, **args.link}.items():
            runs.append(persia(f"persia-sync@{name}", 1, link=link))
            runs.append(persia(f"persia-hybrid@{name}", args.staleness, link=link))
            if name in WIRE_LINKS or name in args.link:
                label = f"persia-hybrid-f16wire@{name}"
                runs.append(persia(label, args.staleness, link=link, wire="f16"))
    if args.sweep:
        for k in (2, 4, 16):
            runs.append(persia(f"persia-staleness-{k}", k))
    if args.disk_tier:  # rows beyond a RAM capacity on disk, prefetched within the staleness
        tier = {"ram_fraction": args.disk_ram_fraction}
        runs.append(persia("persia-hybrid+disk", args.staleness, disk_tier=tier))
        runs.append(persia("persia-hybrid+disk-cold", args.staleness, disk_tier=tier, cold=True))
        evict = {**tier, "no_tier": True}  # the same RAM capacity, rows past it dropped
        runs.append(persia("persia-hybrid+evict", args.staleness, disk_tier=evict))
    if args.metrics:  # persia-hybrid with PERSIA's metrics_config on (docs/metrics.md)
        runs.append(persia("persia-hybrid+metrics", args.staleness, metrics=True))
    if workload != "dlrm" and args.profile:
        runs.append({**base, "runner": "profile", "label": "persia-profile"})
    if args.quick and workload != "dlrm":
        runs = [r for r in runs if r["label"] in QUICK_CONTENDERS]
    return runs


def ratios(
    results: dict[str, dict[str, Any]], notes: dict[str, str], workload: str = "dlrm"
) -> list[dict[str, Any]]:
    """The ratio lines of one workload (a missing contender gives value None and a note)."""

    def sps(name: str) -> float | None:
        r = results.get(name)
        return r.get("samples_per_s") if r else None

    def auc(name: str) -> float | None:
        r = results.get(name)
        return r.get("auc") if r else None

    def ratio(metric: str, a: str, b: str, **extra: Any) -> dict[str, Any]:
        x, y = sps(a), sps(b)
        line: dict[str, Any] = {
            "metric": metric,
            "value": None if x is None or y is None else round(x / y, 3),
            "unit": "x",
            "of": f"{a} / {b} samples per second",
        }
        ca, cb = (results.get(n, {}).get("cpu_ms_per_step") for n in (a, b))
        if ca and cb:
            # CPU time per step is less sensitive to other load on a shared machine than
            # wall time (it still includes the contention's cache and barrier effects).
            line["cpu_ratio"] = round(cb / ca, 3)
        missing = [n for n in (a, b) if sps(n) is None]
        if missing:
            line["note"] = "; ".join(notes.get(n, f"{n} did not run") for n in missing)
        line.update(extra)
        return line

    def gap(metric: str, a: str, b: str) -> dict[str, Any]:
        x, y = auc(a), auc(b)
        return {
            "metric": metric,
            "value": None if x is None or y is None else round(y - x, 4),
            "unit": "auc",
            "of": f"auc({b}) - auc({a})",
        }

    def idle(name: str) -> float | None:
        r = results.get(name)
        return round(r["idle_ms_per_step"], 1) if r and "idle_ms_per_step" in r else None

    out = [
        ratio("hybrid_vs_torch", "persia-hybrid", "torch-embeddingbag"),
        ratio("hybrid_vs_sync", "persia-hybrid", "persia-sync"),
        ratio("hybrid_vs_dense_ceiling", "persia-hybrid", "dense-only"),
        *bound_lines(results, notes),
        ratio("hybrid_vs_torchrec", "persia-hybrid-rowwise", "torchrec-fused-rowwise"),
        ratio("hybrid_vs_torchrec_elementwise", "persia-hybrid", "torchrec-fused"),
        gap("auc_gap_hybrid_vs_sync", "persia-hybrid", "persia-sync"),
        gap("auc_gap_hybrid_vs_torch", "persia-hybrid", "torch-embeddingbag"),
    ]
    if "persia-hybrid+disk" in results:
        out.append(ratio("disk_vs_ram", "persia-hybrid+disk", "persia-hybrid"))
        out.append(ratio("disk_cold_vs_ram", "persia-hybrid+disk-cold", "persia-hybrid"))
        # the tier's own cost: against the same RAM capacity dropping its rows instead
        out.append(ratio("disk_vs_evict", "persia-hybrid+disk", "persia-hybrid+evict"))
        out.append(gap("auc_gap_evict_vs_disk", "persia-hybrid+evict", "persia-hybrid+disk"))
        out.append(gap("auc_gap_disk_vs_ram", "persia-hybrid+disk", "persia-hybrid"))
    for row_dtype in ROW_DTYPE_TAGS:  # half-precision rows against float32 rows
        for rounding in ("nearest", "stochastic"):
            label = half_label(row_dtype, rounding)
            if label in results:
                short = label.removeprefix("persia-hybrid-")
                out.append(ratio(f"hybrid_{short}_vs_f32", label, "persia-hybrid"))
                out.append(gap(f"auc_gap_hybrid_{short}_vs_f32", label, "persia-hybrid"))
    if "persia-hybrid+metrics" in results:  # cpu_ratio: CPU per step, metrics on / off
        out.append(ratio("metrics_overhead", "persia-hybrid", "persia-hybrid+metrics"))
    extra = [n.split("@", 1)[1] for n in results if n.startswith("persia-hybrid@")]
    for name in list(LINKS) + sorted(set(extra) - set(LINKS)):
        out.append(
            ratio(
                f"hybrid_vs_sync_{name}",
                f"persia-hybrid@{name}",
                f"persia-sync@{name}",
                sync_idle_ms_per_step=idle(f"persia-sync@{name}"),
                hybrid_idle_ms_per_step=idle(f"persia-hybrid@{name}"),
            )
        )
    for name in sorted(
        n.split("@", 1)[1] for n in results if n.startswith("persia-hybrid-f16wire@")
    ):
        wire, plain = f"persia-hybrid-f16wire@{name}", f"persia-hybrid@{name}"
        mb = [results.get(n, {}).get("link_mb_per_step") for n in (wire, plain)]
        out.append(
            {
                "metric": f"wire_link_mb_ratio_{name}",
                "value": round(mb[0] / mb[1], 4) if mb[0] and mb[1] else None,
                "unit": "x",
                "of": f"link MB/step of {wire} / {plain}",
            }
        )
        out.append(gap(f"auc_gap_wire_{name}", wire, plain))
        out.append(ratio(f"wire_vs_plain_{name}", wire, plain))
    for line in out:
        line["workload"] = workload
    return out


def bound_lines(results: dict[str, dict[str, Any]], notes: dict[str, str]) -> list[dict[str, Any]]:
    """The fastest the hybrid could go in this run, and how close it came.

    A hybrid step takes at least the dense-only step's wall time (the NN worker's part), and at
    least persia-sync's CPU time per step spread over the cores (the hybrid does the same work,
    only overlapped): ``bound = max(dense-only ms/step, persia-sync CPU ms/step / cores)``.
    """
    dense, sync, hybrid = (results.get(n) for n in ("dense-only", "persia-sync", "persia-hybrid"))
    cores = int((sync or {}).get("cores") or len(os.sched_getaffinity(0)))
    bound = None
    if dense and sync:
        bound = max(dense["ms_per_step"], sync["cpu_ms_per_step"] / cores)
    missing = [n for n, r in (("dense-only", dense), ("persia-sync", sync)) if not r]
    line: dict[str, Any] = {
        "metric": "hybrid_bound_ms_per_step",
        "value": None if bound is None else round(bound, 3),
        "unit": "ms",
        "of": "max(dense-only ms/step, persia-sync CPU ms/step / cores)",
        "cores": cores,
        "dense_ms_per_step": dense and round(dense["ms_per_step"], 3),
        "sync_cpu_ms_per_step": sync and round(sync["cpu_ms_per_step"], 3),
    }
    over: dict[str, Any] = {
        "metric": "hybrid_over_bound",
        "value": None if bound is None or not hybrid else round(hybrid["ms_per_step"] / bound, 3),
        "unit": "x",
        "of": "persia-hybrid ms/step / hybrid_bound_ms_per_step (target <= 1.15)",
        "hybrid_ms_per_step": hybrid and round(hybrid["ms_per_step"], 3),
    }
    if not hybrid:
        missing.append("persia-hybrid")
    if missing:
        note = "; ".join(notes.get(n, f"{n} did not run") for n in missing)
        line["note"] = over["note"] = note
    out = [line, over]
    spare = results.get(SPARE_CORE)
    if spare:
        out.append(
            {
                "metric": "hybrid_sparecore_over_bound",
                "value": None if bound is None else round(spare["ms_per_step"] / bound, 3),
                "unit": "x",
                "of": f"{SPARE_CORE} ms/step / hybrid_bound_ms_per_step (torch on "
                f"{spare.get('torch_threads')} thread(s); target <= 1.15)",
                "hybrid_ms_per_step": round(spare["ms_per_step"], 3),
            }
        )
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (its own AUC etc. kept with it)."""
    ordered = sorted(runs, key=lambda r: r["samples_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small tables and few steps (CI)")
    p.add_argument(
        "--workload",
        default=None,
        help="comma-separated, of " + ", ".join(WORKLOADS) + ", or all (default dlrm; quick: all)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (default 200 for dlrm, 600 for the others; quick 15)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (20; quick 4)")
    p.add_argument("--eval-batches", type=int, default=None, help="held-out batches (20; 4)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument(
        "--max-rows", type=int, default=None, help="cap each slot's cardinality (quick: 100000)"
    )
    p.add_argument("--staleness", type=int, default=8, help="persia-hybrid's staleness")
    p.add_argument("--emb-lr", type=float, default=0.05)
    p.add_argument("--dense-lr", type=float, default=0.01)
    p.add_argument("--ps-shards", type=int, default=1, help="persia parameter-server shards")
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rowwise", dest="rowwise", action="store_false")
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="no per-stage profile run (embedding-bound and multi-hot)",
    )
    p.add_argument("--no-links", dest="links", action="store_false")
    p.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="NAME=BANDWIDTH:LATENCY",
        help="one more simulated link, e.g. free=100000gbit:0us (runs persia-sync@NAME and\n"
        "persia-hybrid@NAME; repeatable)",
    )
    p.add_argument("--sweep", action="store_true", help="also staleness 2, 4, 16 (AUC chart)")
    p.add_argument("--disk-tier", action="store_true", help="also persia-hybrid with a disk tier")
    p.add_argument(
        "--disk-ram-fraction",
        type=float,
        default=0.35,
        help="RAM capacity of the disk-tier runs, as a fraction of the rows the run creates "
        "(0.35: about 1%% of the keys looked up come from disk, embedding-bound workload)",
    )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="also persia-hybrid+metrics: Prometheus metrics on (collected, not pushed)",
    )
    p.add_argument(
        "--row-dtypes",
        default="float16,bfloat16",
        help="persia-hybrid also with these half-precision rows (persia-hybrid-f16, -bf16),\n"
        "beside float32; comma-separated, or none (default float16,bfloat16)",
    )
    p.add_argument(
        "--row-roundings",
        default="nearest",
        help="their roundings: nearest and/or stochastic (labels -sr), comma-separated",
    )
    p.add_argument("--only", default=None, help="comma-separated labels to run (debugging)")
    p.add_argument("--torchrec-path", type=Path, default=TORCHREC_DIR)
    p.add_argument("--no-torchrec", action="store_true")
    p.add_argument("--json-out", type=Path, default=None, help="also write every line here")
    p.add_argument("--chart", type=Path, default=None, help="write a PNG chart here")
    p.add_argument(
        "--chart-from",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: the median runs and ratios of earlier --json-out files (and --chart)",
    )
    p.add_argument("--repeat", type=int, default=1, help="run everything N times (median)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the dense model runs (the embeddings stay on the CPU); cuda: the first GPU",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per contender")
    args = p.parse_args(argv)
    links = {}
    for item in args.link:
        name, _, spec = item.partition("=")
        if not name or not spec:
            p.error(f"--link must look like NAME=BANDWIDTH:LATENCY, got {item!r}")
        try:
            parse_link(spec)
        except ConfigError as e:
            p.error(f"--link {item!r}: {e}")
        links[name] = spec
    args.link = links
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error(
                "--device cuda: torch sees no CUDA device on this machine "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                "run with --device cpu, or on a machine with a GPU"
            )
    args.row_dtypes = [] if args.row_dtypes in ("", "none") else args.row_dtypes.split(",")
    bad = [d for d in args.row_dtypes if d not in ROW_DTYPE_TAGS]
    if bad:
        p.error(f"--row-dtypes must be among {', '.join(ROW_DTYPE_TAGS)} or none, got {bad}")
    args.row_roundings = args.row_roundings.split(",")
    bad = [r for r in args.row_roundings if r not in ("nearest", "stochastic")]
    if bad:
        p.error(f"--row-roundings must be among nearest, stochastic, got {bad}")
    quick = args.quick
    names = (args.workload or ("all" if quick else "dlrm")).split(",")
    if "all" in names:
        names = list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"--workload must be among {', '.join(WORKLOADS)} or all, got {', '.join(unknown)}")
    args.workloads = list(dict.fromkeys(names))
    if args.steps is None and quick:
        args.steps = 15
    if args.warmup is None:
        args.warmup = 4 if quick else 20
    if args.eval_batches is None:
        args.eval_batches = 4 if quick else 20
    if args.max_rows is None and quick:
        args.max_rows = 100_000
    if quick:
        args.rowwise = False
        if args.chart is None:  # --quick draws the chart, so that the chart code cannot rot
            args.chart = Path(tempfile.gettempdir()) / "persia-bench-e2e-quick.png"
    return args


def from_saved(paths: list[Path], chart: Path | None) -> int:
    """The median run of each system in earlier ``--json-out`` files, their ratio lines, and the
    chart: to draw one chart from several invocations (the contenders and the staleness sweep)."""
    done: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in paths:
        for n, text in enumerate(path.read_text().splitlines(), 1):
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if "system" in rec and "error" not in rec and "samples_per_s" in rec:
                by = done.setdefault(rec.get("workload", "dlrm"), {})
                by.setdefault(rec["system"], []).append(rec)
    if not done:
        raise SystemExit(f"no contender runs in {', '.join(map(str, paths))}")
    for workload, by in done.items():
        results = {label: _median_run(rs) for label, rs in by.items()}
        for r in results.values():
            print(json.dumps({**r, "median_of": len(by[r["system"]])}), flush=True)
        for line in ratios(results, {}, workload):
            print(json.dumps(line), flush=True)
        if chart:
            _chart(chart, workload, results)
    return 0


def chart_path(chart: Path, workload: str) -> Path:
    """Where the chart of ``workload`` goes: ``chart`` for dlrm, ``<stem>-<workload><suffix>``
    beside it for the others (``e2e.png`` -> ``e2e-embedding-bound.png``)."""
    if workload == "dlrm":
        return chart
    return chart.with_name(f"{chart.stem}-{workload}{chart.suffix}")


def _chart(chart: Path, workload: str, results: dict[str, dict[str, Any]]) -> None:
    from _e2e_chart import write_chart

    write_chart(chart_path(chart, workload), results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.chart_from:
        return from_saved(args.chart_from, args.chart)
    notes: dict[str, str] = {}
    have_torchrec = not args.no_torchrec and torchrec_available(args.torchrec_path)
    if not have_torchrec:
        note = (
            "torchrec-fused skipped: not installed (make bench-torchrec-install)"
            if not args.no_torchrec
            else "torchrec-fused skipped (--no-torchrec)"
        )
        for n in ("torchrec-fused", "torchrec-fused-rowwise"):
            notes[n] = note
        print(json.dumps({"note": note}), flush=True)
    wanted = set(args.only.split(",")) if args.only else None
    plans = {
        w: [r for r in plan(args, have_torchrec, w) if wanted is None or r["label"] in wanted]
        for w in args.workloads
    }
    lines: list[dict[str, Any]] = []
    done: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in args.workloads}
    for rep in range(args.repeat):  # interleaved, so slow phases of a shared box hit all alike
        for workload, runs in plans.items():
            # quick runs of the embedding-bound workloads share one process (seconds, not a
            # minute); full runs give every contender its own (its peak RSS is its own)
            units = [runs] if args.quick and workload != "dlrm" and runs else [[r] for r in runs]
            for specs in units:
                torchrec = any(r["runner"] == "torchrec-fused" for r in specs)
                extra = args.torchrec_path if torchrec else None
                group = specs if len(specs) > 1 else specs[0]
                for result in run_one(group, extra, args.timeout * len(specs)):
                    spec = next((r for r in specs if r["label"] == result.get("system")), None)
                    if spec is not None and "link" in spec:
                        result["link"] = spec["link"]
                    if spec is not None and spec["runner"] == "persia":
                        result["staleness"] = spec["staleness"]
                    if args.repeat > 1:
                        result["repeat"] = rep
                    print(json.dumps(result), flush=True)
                    lines.append(result)
                    if "error" in result:
                        notes[f"{workload}/{result['system']}"] = (
                            f"{result['system']} failed: {result['error']}"
                        )
                    elif "samples_per_s" in result:
                        done[workload].setdefault(result["system"], []).append(result)
    for workload in args.workloads:
        results = {label: _median_run(rs) for label, rs in done[workload].items()}
        if args.repeat > 1:
            for r in results.values():
                print(json.dumps({**r, "median_of": args.repeat}), flush=True)
        prefix = f"{workload}/"
        wnotes = {
            **notes,
            **{k[len(prefix) :]: v for k, v in notes.items() if k.startswith(prefix)},
        }
        for line in ratios(results, wnotes, workload):
            print(json.dumps(line), flush=True)
            lines.append(line)
        if args.chart:
            _chart(args.chart, workload, results)
    if args.json_out:
        args.json_out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    failed = [r["system"] for r in lines if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
