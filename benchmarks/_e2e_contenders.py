"""One contender of ``bench_e2e.py``, run in its own process so its peak memory is its own.

    python benchmarks/_e2e_contenders.py '{"system": "persia-hybrid", ...}'

prints one JSON line (the contender's result). Every contender trains the same benchmark model
(:class:`BenchModel`) on the same seeded :class:`persia.datasets.SyntheticStream` batches,
prepared in memory in its native input format before the clock starts, then evaluates AUC and
log loss on the same held-out batches.
"""

from __future__ import annotations

# persia first: it sets OMP_WAIT_POLICY=PASSIVE before torch starts its OpenMP threads, so
# spinning torch threads do not starve persia's background threads.
import persia  # noqa: F401

# isort: split
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from persia.datasets.synthetic import SyntheticStream
from persia.metrics import log_loss, roc_auc

EVAL_OFFSET = 10_000_000  # held-out batches start at this index: never trained on
DIM = 16


def _mlp(sizes: list[int], last_relu: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


class BenchModel(nn.Module):
    """Bottom MLP num_dense-...-dim on the dense features, concatenated with the pooled
    embeddings, then the top MLP (returns logits). The default sizes are the DLRM workload's
    (bottom 13-512-256-64-16, top 432-512-256-1); the embedding-bound workload's are
    ``bottom=(), top=(32,)`` (bottom 13-16, top 432-32-1)."""

    def __init__(
        self,
        num_dense: int = 13,
        num_slots: int = 26,
        dim: int = DIM,
        bottom: tuple[int, ...] | list[int] = (512, 256, 64),
        top: tuple[int, ...] | list[int] = (512, 256),
    ) -> None:
        super().__init__()
        self.bottom = nn.Sequential(*_mlp([num_dense, *bottom, dim], last_relu=True))
        self.top = nn.Sequential(*_mlp([dim + num_slots * dim, *top, 1], last_relu=False))

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.top(torch.cat([self.bottom(dense), pooled], dim=1))


def make_model(spec: dict[str, Any], num_slots: int) -> BenchModel:
    """The workload's model (``spec["bottom"]``, ``spec["top"]``: hidden sizes)."""
    return BenchModel(
        num_slots=num_slots,
        bottom=spec.get("bottom", (512, 256, 64)),
        top=spec.get("top", (512, 256)),
    )


class PersiaBenchModel(nn.Module):
    """PERSIA's calling convention ``model(non_id_tensors, embedding_tensors)`` on BenchModel."""

    def __init__(self, inner: BenchModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, non_id: list[torch.Tensor], embeddings: list[torch.Tensor]) -> torch.Tensor:
        return self.inner(non_id[0], _concat_views(embeddings))


def _concat_views(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, 1)``, or the tensor they are adjacent column slices of (no copy)."""
    base = parts[0]._base
    if (
        base is not None
        and base.dim() == 2
        and all(p._base is base for p in parts)
        and parts[0].storage_offset() == base.storage_offset()
        and sum(p.shape[1] for p in parts) == base.shape[1]
    ):
        col = 0
        ok = True
        for p in parts:
            if p.storage_offset() - base.storage_offset() != col or p.stride() != base.stride():
                ok = False
                break
            col += p.shape[1]
        if ok:
            return base
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------- the data
def make_stream(spec: dict[str, Any]) -> SyntheticStream:
    return SyntheticStream(
        spec["cardinalities"], ids_per_sample=spec.get("ids_per_sample", 1), seed=spec["seed"]
    )


def train_indices(spec: dict[str, Any]) -> range:
    return range(spec["warmup_steps"] + spec["steps"])


def eval_indices(spec: dict[str, Any]) -> range:
    return range(EVAL_OFFSET, EVAL_OFFSET + spec["eval_batches"])


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _metrics(labels: list[np.ndarray], logits: list[np.ndarray]) -> tuple[float, float]:
    y = np.concatenate(labels).reshape(-1)
    z = np.concatenate(logits).reshape(-1).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    return roc_auc(y, p), log_loss(y, p)


def _dense_optimizer(model: nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(model.parameters(), lr=spec["dense_lr"])


_CPU = [0.0, 0.0]  # process CPU seconds at the start and the end of the timed part


def _device(spec: dict[str, Any]) -> torch.device:
    """Where the dense model runs (``spec["device"]``: "cpu", the default, or "cuda"; the
    embeddings stay on the CPU for every contender)."""
    return torch.device(spec.get("device", "cpu"))


def _sync(dev: torch.device) -> None:
    """Waits for the device's queued work (the clock must not stop before it is done)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


_DEV = [torch.device("cpu")]  # the dense model's device (the clock waits for its work)


def _timed_loop(
    steps: Iterator[Any], warmup: int, total: int, step_fn: Callable[[Any], None]
) -> tuple[float, float]:
    """Runs ``step_fn`` on ``total`` items; returns (seconds of the timed part, seconds spent
    waiting for the next item during it)."""
    start = time.perf_counter()
    _CPU[0] = time.process_time()
    idle = 0.0
    for i in range(total):
        if i == warmup:
            start = time.perf_counter()
            _CPU[0] = time.process_time()
        t0 = time.perf_counter()
        item = next(steps)
        if i >= warmup:
            idle += time.perf_counter() - t0
        step_fn(item)
        if i == warmup - 1:
            _sync(_DEV[0])
    _sync(_DEV[0])
    _CPU[1] = time.process_time()
    return time.perf_counter() - start, idle


# ---------------------------------------------------------------------------- contenders
def run_dense_only(spec: dict[str, Any]) -> dict[str, Any]:
    """The benchmark model on pre-built embedding tensors: this machine's ceiling."""
    stream = make_stream(spec)
    b = spec["batch_size"]
    nslots = len(spec["cardinalities"])
    dev = _device(spec)
    gen = torch.Generator().manual_seed(1)
    fixed = [(torch.rand(b, nslots * DIM, generator=gen) * 0.02 - 0.01).to(dev) for _ in range(4)]
    data = []
    for i in train_indices(spec):
        sb = stream.batch(i, b)
        data.append((torch.from_numpy(sb.dense).to(dev), torch.from_numpy(sb.labels).to(dev)))
    model = make_model(spec, nslots).to(dev)
    opt = _dense_optimizer(model, spec)
    loss_fn = nn.BCEWithLogitsLoss()
    counter = iter(range(len(data)))

    def step(i: int) -> None:
        dense, labels = data[i]
        pooled = fixed[i % len(fixed)].requires_grad_(True)
        loss = loss_fn(model(dense, pooled), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pooled.grad = None

    seconds, _ = _timed_loop(counter, spec["warmup_steps"], len(data), step)
    labels, logits = [], []
    model.eval()
    with torch.no_grad():
        for j, i in enumerate(eval_indices(spec)):
            sb = stream.batch(i, b)
            out = model(torch.from_numpy(sb.dense).to(dev), fixed[j % len(fixed)])
            labels.append(sb.labels)
            logits.append(out.cpu().numpy())
    auc, ll = _metrics(labels, logits)
    return _result(spec, seconds, auc, ll)


def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain PyTorch: one sparse nn.EmbeddingBag per slot, torch.optim.Adagrad on them."""
    stream = make_stream(spec)
    b = spec["batch_size"]
    cards = spec["cardinalities"]
    if spec["optimizer"] != "adagrad":
        raise SystemExit("torch-embeddingbag has no row-wise Adagrad (torch has none built in)")
    bag_list = [nn.EmbeddingBag(c, DIM, mode="sum", sparse=True) for c in cards]
    with torch.no_grad():
        for bag in bag_list:
            bag.weight.uniform_(-0.01, 0.01)
    bags = nn.ModuleList(bag_list)
    offsets = torch.arange(b, dtype=torch.int64)

    def prep(i: int) -> tuple[Any, ...]:
        sb = stream.batch(i, b)
        ids = [torch.from_numpy(r) for r in sb.ranks]
        # one ID per sample: offsets 0..B-1
        offs = [offsets if len(r) == b else _offsets(torch.from_numpy(n)) for r, n in
                zip(sb.ranks, sb.lengths, strict=True)]  # fmt: skip
        return torch.from_numpy(sb.dense), ids, offs, torch.from_numpy(sb.labels)

    data = [prep(i) for i in train_indices(spec)]
    dev = _device(spec)
    model = make_model(spec, len(cards)).to(dev)
    opt_dense = _dense_optimizer(model, spec)
    opt_sparse = torch.optim.Adagrad(
        bags.parameters(), lr=spec["emb_lr"], initial_accumulator_value=0.0, eps=1e-10
    )
    loss_fn = nn.BCEWithLogitsLoss()

    def forward(dense: torch.Tensor, ids: list, offs: list) -> torch.Tensor:
        pooled = torch.cat([bag_list[j](ids[j], offs[j]) for j in range(len(bag_list))], 1)
        return model(dense.to(dev, non_blocking=True), pooled.to(dev, non_blocking=True))

    def step(item: tuple[Any, ...]) -> None:
        dense, ids, offs, labels = item
        loss = loss_fn(forward(dense, ids, offs), labels.to(dev, non_blocking=True))
        opt_dense.zero_grad()
        opt_sparse.zero_grad()
        loss.backward()
        opt_dense.step()
        opt_sparse.step()

    seconds, _ = _timed_loop(iter(data), spec["warmup_steps"], len(data), step)
    del data
    labels, logits = [], []
    model.eval()
    with torch.no_grad():
        for i in eval_indices(spec):
            dense, ids, offs, lab = prep(i)
            logits.append(forward(dense, ids, offs).cpu().numpy())
            labels.append(lab.numpy())
    auc, ll = _metrics(labels, logits)
    return _result(spec, seconds, auc, ll)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(lengths, 0) - lengths


def run_torchrec(spec: dict[str, Any]) -> dict[str, Any]:
    """TorchRec's FusedEmbeddingBagCollection (fbgemm CPU kernels, optimizer fused in backward)."""
    import torchrec.optim as trec_optim
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    stream = make_stream(spec)
    b = spec["batch_size"]
    cards = spec["cardinalities"]
    names = [f"f{i}" for i in range(len(cards))]
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}",
            embedding_dim=DIM,
            num_embeddings=c,
            feature_names=[names[i]],
            weight_init_min=-0.01,
            weight_init_max=0.01,
        )
        for i, c in enumerate(cards)
    ]
    opt_type = trec_optim.RowWiseAdagrad if spec["optimizer"] == "rowwise" else torch.optim.Adagrad
    ebc = FusedEmbeddingBagCollection(
        tables=tables,
        optimizer_type=opt_type,
        optimizer_kwargs={"lr": spec["emb_lr"], "eps": 1e-10},
        device=torch.device("cpu"),
    )

    def prep(i: int) -> tuple[Any, ...]:
        sb = stream.batch(i, b)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=names,
            values=torch.from_numpy(np.concatenate(sb.ranks)),
            lengths=torch.from_numpy(np.concatenate(sb.lengths)).to(torch.int32),
        )
        return torch.from_numpy(sb.dense), kjt, torch.from_numpy(sb.labels)

    data = [prep(i) for i in train_indices(spec)]
    dev = _device(spec)
    model = make_model(spec, len(cards)).to(dev)
    opt_dense = _dense_optimizer(model, spec)
    loss_fn = nn.BCEWithLogitsLoss()

    def forward(dense: torch.Tensor, kjt: Any) -> torch.Tensor:
        pooled = ebc(kjt).values()
        return model(dense.to(dev, non_blocking=True), pooled.to(dev, non_blocking=True))

    def step(item: tuple[Any, ...]) -> None:
        dense, kjt, labels = item
        loss = loss_fn(forward(dense, kjt), labels.to(dev, non_blocking=True))
        opt_dense.zero_grad()
        loss.backward()  # the embedding optimizer runs inside backward
        opt_dense.step()

    seconds, _ = _timed_loop(iter(data), spec["warmup_steps"], len(data), step)
    del data
    labels, logits = [], []
    model.eval()
    with torch.no_grad():
        for i in eval_indices(spec):
            dense, kjt, lab = prep(i)
            logits.append(forward(dense, kjt).cpu().numpy())
            labels.append(lab.numpy())
    auc, ll = _metrics(labels, logits)
    return _result(spec, seconds, auc, ll)


def run_persia(spec: dict[str, Any]) -> dict[str, Any]:
    """persia's embedded backend through its PERSIA-compatible API, staleness ``spec["staleness"]``."""
    from persia.ctx import TrainCtx, eval_ctx
    from persia.data import DataLoader, IterableDataset
    from persia.embedding.config import parse_embedding_config, parse_global_config
    from persia.embedding.optim import Adagrad

    stream = make_stream(spec)
    b = spec["batch_size"]
    nslots = len(spec["cardinalities"])
    names = stream.slot_names()
    emb_doc: dict[str, Any] = {
        "feature_index_prefix_bit": 8,
        "slots_config": {n: {"dim": DIM} for n in names},
    }
    if spec.get("row_dtype", "float32") != "float32":  # half-precision rows (issue 17)
        emb_doc["row_dtype"] = spec["row_dtype"]
        emb_doc["row_rounding"] = spec.get("row_rounding", "nearest")
    emb_config = parse_embedding_config(emb_doc)
    train = [stream.batch(i, b).to_persia_batch(names) for i in train_indices(spec)]
    capacity = int(sum(spec["cardinalities"])) + 1
    server: dict[str, Any] = {
        "capacity": capacity,
        "num_hashmap_internal_shards": spec["ps_shards"],
    }
    if spec.get("disk_tier"):  # a RAM capacity below the rows this run creates; the rest on disk
        import tempfile

        rows = distinct_ids(train, nslots)
        server["capacity"] = max(1, int(rows * spec["disk_tier"]["ram_fraction"]))
        if not spec["disk_tier"].get("no_tier"):
            server["disk_tier_dir"] = tempfile.mkdtemp(prefix="bench_e2e_tier_")
            server["disk_tier_capacity"] = capacity
    common: dict[str, Any] = {"job_type": "Train"}
    if spec.get("metrics"):  # PERSIA's metrics_config: collected (no gateway: not pushed)
        common["metrics_config"] = {"enable_metrics": True, "job_name": "bench_e2e"}
    glob_config = parse_global_config(
        {
            "common_config": common,
            "embedding_parameter_server_config": server,
        }
    )
    held_out = [
        stream.batch(i, b).to_persia_batch(names, requires_grad=False) for i in eval_indices(spec)
    ]
    eval_labels = [pb.labels[0].data for pb in held_out]

    class ListDataset(IterableDataset):
        def __init__(self, items: list) -> None:
            super().__init__(buffer_size=10)
            self.items = items

        def __iter__(self) -> Iterator[Any]:
            return iter(self.items)

    dev = _device(spec)
    device_id = (dev.index or 0) if dev.type == "cuda" else None
    model = PersiaBenchModel(make_model(spec, nslots)).to(dev)
    emb_opt = Adagrad(
        lr=spec["emb_lr"],
        initial_accumulator_value=0.0,
        eps=1e-10,
        vectorwise_shared=spec["optimizer"] == "rowwise",
    )
    dense_opt = _dense_optimizer(model, spec)
    loss_fn = nn.BCEWithLogitsLoss()
    link_stats = None
    with TrainCtx(
        emb_opt,
        dense_opt,
        model=model,
        mixed_precision=False,
        embedding_config_file=emb_config,  # type: ignore[arg-type]
        global_config_file=glob_config,  # type: ignore[arg-type]
        device_id=device_id,
    ) as ctx:
        if spec.get("reserve", True):
            # Like torch's up-front tables, but only the rows this run will touch: the store's
            # tables then never grow (and copy) inside the timed part.
            rows = distinct_ids(train, nslots)
            shards = ctx.runtime.store.shards
            for shard in shards:
                shard.reserve(rows // len(shards) + rows // (10 * len(shards)) + 1024, DIM)
        if spec.get("link"):
            from persia.rpc.simlink import SimLinkTransport, parse_link

            bandwidth, latency = parse_link(spec["link"])
            servers = ctx.runtime.worker.servers
            servers.transport = SimLinkTransport(servers.transport, bandwidth, latency)
            link_stats = servers.transport.stats
        if spec.get("wire"):  # rows and gradients coded on the wire (persia.rpc.wire)
            ctx.runtime.worker.servers.wire = spec["wire"]
        loader = DataLoader(
            ListDataset(train),
            embedding_staleness=spec["staleness"],
            forward_buffer_size=max(2, spec["staleness"]),
            reproducible=True,
        )

        store = ctx.runtime.store
        tiers = [t.tier for s in store.shards for t in s._tables.values() if t.tier is not None]
        cold = bool(spec.get("cold"))

        def step(batch: Any) -> None:
            if cold:  # every disk read of this step's lookups goes to the disk
                for tier in tiers:
                    tier.drop_cache()
            output, labels = ctx.forward(batch)
            loss = loss_fn(output, labels[0])
            ctx.backward(loss)

        it = iter(loader)
        looked_up = sum(pb.id_type_features[s].values.size for pb in train for s in range(nslots))
        reads0 = sum(t.stats()["disk_reads"] for t in tiers)
        seconds, idle = _timed_loop(it, spec["warmup_steps"], len(train), step)
        t0 = time.perf_counter()
        ctx.runtime.flush()
        seconds += time.perf_counter() - t0
        _CPU[1] = time.process_time()
        for _ in it:  # end of the pass
            pass
        link = None
        if link_stats is not None:
            link = (link_stats.bytes_out + link_stats.bytes_in, link_stats.wait_s)
        report = loader.staleness_report()
        nn_threads = ctx.nn_threads_chosen  # TrainCtx(nn_threads="auto")'s choice (None: none)
        disk_reads = sum(t.stats()["disk_reads"] for t in tiers) - reads0
        disk_rows = sum(t.rows for t in tiers)
        del train
        model.eval()
        logits = []
        with eval_ctx(model=model, device_id=device_id) as ectx, torch.no_grad():
            for batch in DataLoader(ListDataset(held_out)):
                output, _ = ectx.forward(batch)
                logits.append(output.cpu().numpy())
    auc, ll = _metrics(eval_labels, logits)
    result = _result(spec, seconds, auc, ll)
    result["idle_ms_per_step"] = 1000.0 * idle / spec["steps"]
    result["nn_threads_chosen"] = nn_threads
    result["staleness_mean"] = report.mean
    result["staleness_max"] = report.max
    if spec.get("disk_tier"):
        result["ram_capacity"] = server["capacity"]
        result["evictions"] = store.stats()["evictions"]
    if tiers:
        result["disk_key_fraction"] = disk_reads / max(1, looked_up)
        result["disk_rows_end"] = disk_rows
        store.close()
        shutil.rmtree(server["disk_tier_dir"], ignore_errors=True)
    if link is not None:
        n = len(train_indices(spec))
        result["link_mb_per_step"] = link[0] / 1e6 / n
        result["link_wait_ms_per_step"] = 1000.0 * link[1] / n
    if spec.get("metrics"):  # what the metrics run collected (a check that they were on)
        from persia import telemetry

        text = telemetry.render()[0].decode()
        trained = [ln for ln in text.splitlines() if ln.startswith("persia_samples_trained_total")]
        result["metrics_samples_trained"] = float(trained[0].rsplit(" ", 1)[1]) if trained else 0
    return result


def distinct_ids(batches: list[Any], nslots: int) -> int:
    """How many distinct (slot, ID) pairs ``batches`` hold: the rows training will create."""
    total = 0
    for slot in range(nslots):
        values = np.concatenate([pb.id_type_features[slot].values for pb in batches])
        total += len(np.unique(values))
    return total


def _result(spec: dict[str, Any], seconds: float, auc: float, ll: float) -> dict[str, Any]:
    samples = spec["steps"] * spec["batch_size"]
    return {
        "cpu_ms_per_step": 1000.0 * (_CPU[1] - _CPU[0]) / spec["steps"],
        "system": spec["label"],
        "workload": spec.get("workload", "dlrm"),
        "samples_per_s": samples / seconds,
        "ms_per_step": 1000.0 * seconds / spec["steps"],
        "auc": auc,
        "logloss": ll,
        "peak_rss_bytes": _peak_rss(),
        "optimizer": spec["optimizer"],
        "steps": spec["steps"],
        "torch_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)),
        "device": _DEV[0].type,
        "device_name": torch.cuda.get_device_name(_DEV[0]) if _DEV[0].type == "cuda" else "cpu",
    }


def run_profile(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The embedding path's cost per stage (``bench_emb_path.py``) on this workload's batches."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_emb_path import profile_lines

    stream = make_stream(spec)
    names = stream.slot_names()
    batches = [stream.batch(i, spec["batch_size"]).to_persia_batch(names) for i in
               train_indices(spec)]  # fmt: skip
    lines = profile_lines(
        batches,
        warmup=spec["warmup_steps"],
        optimizer=spec["optimizer"],
        lr=spec["emb_lr"],
        shards=spec["ps_shards"],
        workload=spec.get("workload", "dlrm"),
    )
    return [{**line, "run": spec["label"]} for line in lines]


RUNNERS = {
    "dense-only": run_dense_only,
    "torch-embeddingbag": run_torch,
    "torchrec-fused": run_torchrec,
    "persia": run_persia,
    "profile": run_profile,
}


def main() -> None:
    """Runs one spec (a JSON object) or several in turn (a JSON list: quick mode, where peak RSS
    is then the process's, not each contender's); one JSON line per result."""
    arg = json.loads(sys.argv[1])
    default_threads = torch.get_num_threads()
    for spec in arg if isinstance(arg, list) else [arg]:
        # each contender its own setting (in quick mode several share this process)
        torch.set_num_threads(int(spec.get("torch_threads") or default_threads))
        torch.manual_seed(spec["seed"])
        _DEV[0] = _device(spec)
        result = RUNNERS[spec["runner"]](spec)
        for line in result if isinstance(result, list) else [result]:
            print(json.dumps(line), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip freeing multi-GB tables


if __name__ == "__main__":
    main()
