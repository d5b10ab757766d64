"""The embedding path's CPU cost per ID, whole and per stage, on the embedding-bound workloads.

    python benchmarks/bench_emb_path.py --quick          # CI: small tables, a few steps
    python benchmarks/bench_emb_path.py                  # Criteo's 33.8M rows, 20 + 600 steps
    python benchmarks/ab_trees.py --base ../persia-b936917 --rounds 4 \\
        --fields value,ns_per_unique -- "$PWD/benchmarks/bench_emb_path.py"   # before / after

What it measures: one training step's embedding work in persia's embedded backend (the NN
worker's side excluded), on the workloads of ``bench_e2e.py --workload embedding-bound`` (26
Criteo one-hot slots, batch 2048, dim 16, element-wise Adagrad) and ``multi-hot`` (the same with
six slots multi-hot; see :func:`batches`):

* ``path``: the embedding worker's ``forward`` (prefix, de-duplication, routing, the shards'
  training lookups, pooling) and ``backward`` (segment sum, non-finite check, the shards'
  optimizer), called in this thread one after the other, as sync mode runs them; thread CPU time
  per ID and per unique ID (the ``total`` stage line).
* the same per stage: each stage's function is wrapped with a thread-CPU timer on every other
  step (the other steps give ``total``); ``glue`` is what the wrapped steps spent outside every
  wrapped function (Python, checks, allocation). A stage a tree runs inside a fused kernel has no
  line of its own there (the line of the kernel says what it holds).
* ``pipeline``: the whole hybrid machinery in sync mode (``TrainCtx`` + ``DataLoader``,
  staleness 1) around a near-free dense step (one ``Linear(416, 1)``, torch on one thread):
  process CPU time per ID, every thread.

Runs against any persia tree from b936917 on, using only what that commit has (``TrainCtx``,
``DataLoader``, ``ctx.runtime.worker``, ``SyntheticStream``, the store's ``Shard.reserve``). It
imports persia from ``PYTHONPATH`` when that is set (``ab_trees.py`` sets it to each tree), else
from this tree; give ab_trees.py the script's absolute path so both trees run this very file.
Rows are reserved before the clock starts (as ``bench_e2e.py`` does), so no table growth is
timed. Output: JSON lines ``{"metric": "emb_path_ns_per_id", "workload", "stage", "value",
"ns_per_unique", ...}`` and ``{"metric": "emb_pipeline_ns_per_id", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(HERE.parent))

# persia first: it sets OMP_WAIT_POLICY=PASSIVE before torch starts its OpenMP threads.
import persia  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from persia.datasets.synthetic import CRITEO_CARDINALITIES, SyntheticStream  # noqa: E402

DIM = 16
#: The multi-hot workload: slot -> the most IDs per sample (uniform 1..that many), the other
#: slots one-hot. The same table as bench_e2e.py's ``multi-hot`` workload.
MULTI_HOT = {2: 20, 11: 20, 20: 20, 3: 5, 15: 5, 23: 5}


# ------------------------------------------------------------------------------- the data
def batches(workload: str, count: int, batch_size: int, max_rows: int | None, seed: int = 0):
    """``count`` PersiaBatches of ``workload`` ("embedding-bound" or "multi-hot").

    Built only from what b936917's ``SyntheticStream`` has (one IDs-per-sample bound for every
    slot): a multi-hot slot s takes its IDs from a one-slot stream of slot s's cardinality with
    bound ``MULTI_HOT[s]`` (its own seed), the rest from the one-hot stream. Costs, not labels,
    are measured here, so the labels need not follow the multi-hot IDs.
    """
    cards = [min(c, max_rows) if max_rows else c for c in CRITEO_CARDINALITIES]
    stream = SyntheticStream(cards, seed=seed)
    names = stream.slot_names()
    extra = {}
    if workload == "multi-hot":
        extra = {
            s: SyntheticStream([cards[s]], num_dense=0, ids_per_sample=k, seed=seed + 1 + s)
            for s, k in MULTI_HOT.items()
        }
    elif workload != "embedding-bound":
        raise SystemExit(f"--workload must be embedding-bound or multi-hot, got {workload!r}")
    out = []
    for i in range(count):
        sb = stream.batch(i, batch_size)
        for s, st in extra.items():
            mb = st.batch(i, batch_size)
            sb.values[s], sb.lengths[s] = mb.values[0], mb.lengths[0]
        out.append(sb.to_persia_batch(names))
    return out


def _distinct_rows(pbs: list[Any]) -> int:
    nslots = len(pbs[0].id_type_features)
    return sum(
        len(np.unique(np.concatenate([pb.id_type_features[s].values for pb in pbs])))
        for s in range(nslots)
    )


def _train_ctx(pbs: list[Any], model: torch.nn.Module, optimizer: str, lr: float, shards: int):
    """A TrainCtx (not yet entered) of the workload's slots, and the rows to reserve per shard."""
    from persia.config import parse_embedding_config, parse_global_config
    from persia.ctx import TrainCtx
    from persia.embedding.optim import Adagrad

    names = [f.name for f in pbs[0].id_type_features]
    emb = parse_embedding_config(
        {"feature_index_prefix_bit": 8, "slots_config": {n: {"dim": DIM} for n in names}}
    )
    glob = parse_global_config(
        {
            "common_config": {"job_type": "Train"},
            "embedding_parameter_server_config": {
                "capacity": int(sum(CRITEO_CARDINALITIES)) + 1,
                "num_hashmap_internal_shards": shards,
            },
        }
    )
    emb_opt = Adagrad(
        lr=lr, initial_accumulator_value=0.0, eps=1e-10, vectorwise_shared=optimizer == "rowwise"
    )
    ctx = TrainCtx(
        emb_opt,
        torch.optim.SGD(model.parameters(), lr=0.01),
        model=model,
        mixed_precision=False,
        embedding_config_file=emb,
        global_config_file=glob,
    )
    # room for every row the run creates plus one batch's keys: a training lookup creates rows
    # in its probing kernel only while the arrays have room for all of the call's keys
    rows = _distinct_rows(pbs)
    ids = max(sum(len(f.values) for f in pb.id_type_features) for pb in pbs)
    return ctx, rows // shards + rows // (10 * shards) + ids + 1024


def _reserve(ctx: Any, per_shard: int) -> None:
    for shard in ctx.runtime.store.shards:
        shard.reserve(per_shard, DIM)


# ----------------------------------------------------------------------- stage wrappers
class _Stages:
    """Thread-CPU timers wrapped around named functions; exclusive time (a wrapped function
    called inside another is charged to its own stage only)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self._stack: list[int] = []  # child time accumulated per open frame
        self._saved: list[tuple[Any, str, Any]] = []

    def wrap(self, stage: str, owner: Any, attr: str) -> None:
        """Times ``owner.attr`` (a module's function, or a class's method or static method)."""
        if owner is None:
            return
        if isinstance(owner, type):
            raw = next((vars(k)[attr] for k in owner.__mro__ if attr in vars(k)), None)
            own = attr in vars(owner)
        else:
            raw, own = getattr(owner, attr, None), True
        if raw is None:
            return
        original = raw.__func__ if isinstance(raw, staticmethod) else raw
        stages = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            stages._stack.append(0)
            t0 = time.thread_time_ns()
            try:
                return original(*args, **kwargs)
            finally:
                took = time.thread_time_ns() - t0
                child = stages._stack.pop()
                stages.ns[stage] = stages.ns.get(stage, 0) + took - child
                if stages._stack:
                    stages._stack[-1] += took

        self._saved.append((owner, attr, raw if own else None))
        setattr(owner, attr, staticmethod(timed) if isinstance(raw, staticmethod) else timed)

    def unwrap(self) -> None:
        for owner, attr, original in reversed(self._saved):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._saved.clear()


#: (stage, where the function lives, its name), for every tree: an entry a tree lacks is skipped.
#: ``worker``: persia.worker.embedding_worker; ``pooling``: persia.worker.pooling; ``kernels``:
#: persia.worker.kernels; ``table``: the EmbeddingTable class; ``servers``: the client's class;
#: ``optimizer``: the embedding optimizer's class; ``numpy``: the numpy module.
STAGE_FUNCTIONS = [
    ("prefix_route", "pooling", "add_prefix"),
    ("prefix_route", "pooling", "prefix_concat"),
    ("prefix_route", "servers", "shard_of"),
    ("prefix_route", "kernels", "group_by_shard_kernel"),
    ("dedupe", "Deduper", "unique_inverse"),
    ("dedupe", "Deduper", "unique_inverse_segments"),
    ("dedupe", "Deduper", "prefix_unique_inverse"),  # prefixing fused in (since issue 16)
    ("dedupe", "Deduper", "prefix_unique_unchecked"),
    # the store's training lookup: probe, create missing rows, gather (one kernel since b936917)
    ("probe_insert_gather", "table", "train_lookup_probed"),
    ("probe_insert_gather", "table", "train_lookup"),
    ("probe_insert_gather", "table", "train_lookup_rows"),
    # the LRU relinks a training lookup defers to its touch log (since issue 16)
    ("lru_relink", "table", "flush_lru"),
    ("lru_relink", "table", "_stamp_lru"),
    ("pooling", "numpy", "take"),
    ("pooling", "pooling", "pool_forward"),
    ("pooling", "pooling", "pool_raw_forward"),
    ("pooling", "kernels", "pool_onehot_forward_kernel"),
    ("pooling", "kernels", "pool_slots_forward_kernel"),
    ("segment_sum", "pooling", "pool_backward"),
    ("segment_sum", "pooling", "pool_raw_backward"),
    ("segment_sum", "kernels", "pool_onehot_backward_kernel"),  # counts non-finite rows too
    ("segment_sum", "kernels", "pool_slots_backward_kernel"),
    ("nonfinite_check", "pooling", "nonfinite_rows"),
    ("nonfinite_check", "kernels", "count_nonfinite_kernel"),
    ("probe_gradients", "table", "probe"),
    ("optimizer", "optimizer", "_run"),
]


def _owners(ctx: Any) -> dict[str, Any]:
    import persia.worker.embedding_worker as worker_mod
    import persia.worker.pooling as pooling

    worker = ctx.runtime.worker
    shard = ctx.runtime.store.shards[0]
    table = next(iter(shard._tables.values()))
    try:
        import persia.worker.kernels as kernels
    except ImportError:  # pragma: no cover - every tree has it
        kernels = None
    return {
        "worker": worker_mod,
        "pooling": pooling,
        "Deduper": pooling.Deduper,
        "kernels": kernels,
        "table": type(table),
        "servers": type(worker.servers),
        "optimizer": type(table.optimizer),
        "numpy": np,
    }


def _gather_alone(ctx: Any, lookup: Any, scratch: dict[str, np.ndarray]) -> int:
    """Thread CPU ns of gathering this batch's unique rows from the store's values alone (a
    measure of the gather inside the fused training lookup; not part of the step)."""
    ns = 0
    store = ctx.runtime.store
    shards = store.shards
    for group in lookup.groups:
        where = store.shard_of(group.uniques) if len(shards) > 1 else None
        for s, shard in enumerate(shards):
            keys = group.uniques if where is None else group.uniques[where == s]
            table = shard._tables[group.dim]
            rows = table.probe(keys)
            rows = rows[rows >= 0]
            buf = scratch.get("buf")
            if buf is None or buf.shape[0] < len(rows):
                buf = scratch["buf"] = np.empty((max(len(rows), 1) * 2, group.dim), np.float32)
            t0 = time.thread_time_ns()
            np.take(table.values, rows, axis=0, out=buf[: len(rows)])
            ns += time.thread_time_ns() - t0
    return ns


# ------------------------------------------------------------------------------- measures
def profile_lines(
    pbs: list[Any],
    warmup: int,
    optimizer: str = "adagrad",
    lr: float = 0.05,
    shards: int = 1,
    workload: str = "embedding-bound",
) -> list[dict[str, Any]]:
    """The ``path`` measure of this module's docstring on ``pbs`` (the first ``warmup`` steps
    untimed): one line for the total, one per stage, one for the separately timed gather."""
    model = torch.nn.Linear(1, 1)
    ctx, per_shard = _train_ctx(pbs, model, optimizer, lr, shards)
    nslots = len(pbs[0].id_type_features)
    rng = np.random.default_rng(0)
    b = pbs[0].batch_size
    grads = [(rng.standard_normal((b, nslots * DIM)) * 1e-3).astype(np.float32) for _ in range(4)]
    grad = np.empty_like(grads[0])
    stages = _Stages()
    plain = {"ns": 0, "ids": 0, "uniques": 0, "steps": 0}
    wrapped = {"ns": 0, "ids": 0, "uniques": 0, "steps": 0, "gather": 0}
    scratch: dict[str, np.ndarray] = {}
    with ctx:
        _reserve(ctx, per_shard)
        worker = ctx.runtime.worker
        owners = _owners(ctx)
        for i, pb in enumerate(pbs):
            timed = i >= warmup
            wrap = timed and (i - warmup) % 2 == 1
            if wrap:
                for stage, where, attr in STAGE_FUNCTIONS:
                    stages.wrap(stage, owners.get(where), attr)
            t0 = time.thread_time_ns()
            lookup = worker.forward(pb, True)
            t1 = time.thread_time_ns()
            # the dense step writes the gradient just before the embedding backward reads it
            np.copyto(grad, grads[i % len(grads)])
            t2 = time.thread_time_ns()
            worker.backward(lookup, grad, {})
            took = time.thread_time_ns() - t2 + t1 - t0
            stages.unwrap()
            if timed:
                acc = wrapped if wrap else plain
                acc["ns"] += took
                acc["ids"] += sum(len(f.values) for f in pb.id_type_features)
                acc["uniques"] += sum(len(g.uniques) for g in lookup.groups)
                acc["steps"] += 1
                if wrap:
                    wrapped["gather"] += _gather_alone(ctx, lookup, scratch)
            if i + 1 == warmup:
                stages.ns.clear()
        ctx.runtime.flush()
    common = {"metric": "emb_path_ns_per_id", "unit": "ns", "workload": workload,
              "optimizer": optimizer, "shards": shards, "persia_tree": _tree()}  # fmt: skip
    lines = []
    ids, uniques = max(plain["ids"], 1), max(plain["uniques"], 1)
    lines.append(
        {
            **common,
            "stage": "total",
            "value": round(plain["ns"] / ids, 2),
            "ns_per_unique": round(plain["ns"] / uniques, 2),
            "ids_per_step": plain["ids"] / max(plain["steps"], 1),
            "uniques_per_step": plain["uniques"] / max(plain["steps"], 1),
            "steps": plain["steps"],
        }
    )
    wids, wuniques = max(wrapped["ids"], 1), max(wrapped["uniques"], 1)
    staged = dict(stages.ns)
    staged["glue"] = wrapped["ns"] - sum(stages.ns.values())
    for stage, ns in staged.items():
        lines.append(
            {
                **common,
                "stage": stage,
                "value": round(ns / wids, 2),
                "ns_per_unique": round(ns / wuniques, 2),
                "steps": wrapped["steps"],
            }
        )
    lines.append(
        {
            **common,
            "stage": "gather_alone",
            "value": round(wrapped["gather"] / wids, 2),
            "ns_per_unique": round(wrapped["gather"] / wuniques, 2),
            "steps": wrapped["steps"],
            "note": "the unique rows gathered apart from the step (inside probe_insert_gather)",
        }
    )
    return lines


class _SumModel(torch.nn.Module):
    """A near-free dense step: one Linear over the pooled embeddings (their common base tensor,
    as bench_e2e's model takes it: ``torch.cat`` of the 26 column views would cost torch's
    autograd a full-width gradient per view, ~17 ms a step here, and measure torch, not persia)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, 1)

    def forward(self, non_id: list[torch.Tensor], embeddings: list[torch.Tensor]) -> torch.Tensor:
        base = embeddings[0]._base
        return self.linear(base if base is not None else torch.cat(embeddings, dim=1))


def pipeline_line(
    pbs: list[Any], warmup: int, optimizer: str, lr: float, shards: int, workload: str
) -> dict[str, Any]:
    """The ``pipeline`` measure: process CPU ns per ID of sync-mode training steps."""
    from persia.data import DataLoader, IterableDataset

    class ListDataset(IterableDataset):
        def __init__(self, items: list) -> None:
            super().__init__(buffer_size=10)
            self.items = items

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(self.items)

    nslots = len(pbs[0].id_type_features)
    model = _SumModel(nslots * DIM)
    ctx, per_shard = _train_ctx(pbs, model, optimizer, lr, shards)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    cpu = [0.0, 0.0]
    main = [0.0, 0.0]
    apply = [0.0, 0.0]

    def apply_cpu() -> float:
        for t in threading.enumerate():
            if t.name == "persia-apply" and t.ident is not None:
                return time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        return 0.0

    with ctx:
        _reserve(ctx, per_shard)
        loader = DataLoader(ListDataset(pbs), embedding_staleness=1, reproducible=True)
        for i, batch in enumerate(loader):
            if i == warmup:
                ctx.runtime.flush()
                cpu[0], main[0], apply[0] = time.process_time(), time.thread_time(), apply_cpu()
            output, labels = ctx.forward(batch)
            ctx.backward(loss_fn(output, labels[0]))
        ctx.runtime.flush()
        cpu[1], main[1], apply[1] = time.process_time(), time.thread_time(), apply_cpu()
    ids = max(sum(sum(len(f.values) for f in pb.id_type_features) for pb in pbs[warmup:]), 1)
    per_id = {k: 1e9 * (v[1] - v[0]) / ids for k, v in (("all", cpu), ("main", main),
                                                         ("apply", apply))}  # fmt: skip
    return {
        "metric": "emb_pipeline_ns_per_id",
        "unit": "ns",
        "workload": workload,
        "optimizer": optimizer,
        "shards": shards,
        "persia_tree": _tree(),
        "value": round(per_id["all"], 2),
        # the NN worker's thread (the near-free model, the context's conversions), the applier
        # thread (gradients), the rest (the lookup thread, the data loader's reader)
        "main_ns_per_id": round(per_id["main"], 2),
        "apply_ns_per_id": round(per_id["apply"], 2),
        "other_ns_per_id": round(per_id["all"] - per_id["main"] - per_id["apply"], 2),
        "steps": len(pbs) - warmup,
        "torch_threads": torch.get_num_threads(),
    }


def _tree() -> str:
    return str(Path(persia.__file__).resolve().parents[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small tables and few steps (CI)")
    p.add_argument("--workload", default="embedding-bound,multi-hot", help="comma-separated")
    p.add_argument("--steps", type=int, default=None, help="timed steps (600; quick 12)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (20; quick 3)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-rows", type=int, default=None, help="cap each slot (quick: 100000)")
    p.add_argument("--optimizer", choices=("adagrad", "rowwise"), default="adagrad")
    p.add_argument("--ps-shards", type=int, default=1)
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    steps = args.steps if args.steps is not None else (12 if args.quick else 600)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 20)
    max_rows = args.max_rows if args.max_rows is not None else (100_000 if args.quick else None)
    torch.set_num_threads(1)
    emit: Callable[[dict[str, Any]], None] = lambda line: print(json.dumps(line), flush=True)  # noqa: E731
    for workload in args.workload.split(","):
        pbs = batches(workload, warmup + steps, args.batch_size, max_rows, args.seed)
        for line in profile_lines(pbs, warmup, args.optimizer, 0.05, args.ps_shards, workload):
            emit(line)
        if args.pipeline:
            emit(pipeline_line(pbs, warmup, args.optimizer, 0.05, args.ps_shards, workload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
