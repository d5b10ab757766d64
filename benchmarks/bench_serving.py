"""Serving benchmark: ``persia serve`` against a hand-written FastAPI baseline, and freshness.

    python benchmarks/bench_serving.py --quick    # CI: 16 requests per cell (~40 s)
    python benchmarks/bench_serving.py            # >= 1,000 requests per cell and server

**Latency and throughput** (JSON-rows endpoint). An Adult-income export is trained
(``--train-samples`` rows). Two servers run, each in its own process on 127.0.0.1:

* ``persia``: ``persia serve EXPORT --no-grpc`` (``POST /predict``);
* ``fastapi-predictor`` (a reference, not a target): the baseline's FastAPI handler calling
  ``persia.serving``'s ``Predictor.predict``, so ``persia`` / ``fastapi-predictor`` is what the
  server layer costs and ``fastapi-predictor`` / ``baseline`` what the export's recipe costs;
* ``baseline``: what a user would write by hand (:func:`baseline_app`): a minimal FastAPI handler
  with the same request schema, the same ID hash (:mod:`persia.hashing`), the same TorchScript
  dense model and one plain ``nn.EmbeddingBag`` per slot holding the same rows (a sorted ID array
  and ``searchsorted`` in front of it), the dense columns standardised with the same statistics.
  Before timing, both must give the same predictions (1e-5) on 1,024 test rows.

Clients run in another process (one per run, ``concurrency`` threads, each with its own
keep-alive ``httpx`` connection; request bodies are encoded once). For each cell (batch 1, 64,
1024 rows x 1 and 8 concurrent clients) the two servers take turns, ``--rounds`` times (ABBA
order), each run with ``requests / rounds`` requests after a warm-up; the latencies of a server's
runs are pooled for p50 / p99, throughput is requests (and rows) per wall second. Every loop is
bounded in count and in time (``--run-budget-s``); a run cut short says so (``truncated``).
Target: persia's p99 <= 1.2 x the baseline's at every cell. A ``p99_ratio`` line's ``value`` is the
median over the rounds of persia's p99 / the baseline's p99 in that round (``per_round``; the
ratio of the pooled p99s is ``pooled``).

**Freshness**: a training process (TrainCtx with incremental updates; a delta flushed every
``--delta-interval`` s) keeps training and, every ``--marker-interval`` s, trains one batch holding a
marker ID never seen before, waits until its gradient is applied on the training parameter server
and records that time. ``persia serve CKPT --follow DELTAS`` serves the checkpoint it dumped first;
a prober process asks for every announced marker (one sample each, with one sample of an unknown ID
in the same ``POST /predict/batch``) every ``--probe-interval`` s until the marker's prediction
differs from the unknown ID's: freshness is the time from the applied update to that answer. Target: p99 <= delta interval + 1 s.

One JSON line per figure (``metric``, ``server``, ``batch``, ``concurrency``, ...), then a summary
line; ``machine`` and ``load_avg`` (the 1/5/15-minute load averages at the start) are on every line:
on a shared machine the ratios are what to read. The exit status is 0 unless a request failed or
the two servers disagreed (missing a target is reported, not an error).
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
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

ADULT = ROOT / "examples" / "adult_income" / "job.yaml"
START_TIMEOUT_S = 180.0
P99_TARGET = 1.2


def _load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


# ---------------------------------------------------------------------------------- baseline
def write_baseline_files(export_dir: Path, out: Path) -> None:
    """What the hand-written baseline loads: the TorchScript model, per slot its IDs (sorted) and
    rows, and the request recipe's constants, taken once from the export's files."""
    import torch

    import persia.serving

    p = persia.serving.load(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for s in p.meta["slots"]:
        keys, values = p.tables[int(s["dim"])]
        bits = int(s["prefix_bits"])
        low = (1 << (64 - bits)) - 1 if bits else (1 << 64) - 1
        mine = (keys >> np.uint64(64 - bits)) == np.uint64(s["prefix"]) if bits else slice(None)
        ids = keys[mine] & np.uint64(low)
        order = np.argsort(ids)
        tables[f"{s['name']}.ids"] = ids[order]
        tables[f"{s['name']}.rows"] = values[mine][order]
    np.savez(out / "tables.npz", **tables)
    torch.jit.save(p.model, str(out / "model.pt"))
    meta = {
        "slots": [
            {"name": s["name"], "column": s["column"], "prefix_bits": s["prefix_bits"]}
            for s in p.meta["slots"]
        ],
        "dense": p.meta["dense"],
        "input": p.meta["input"],
        "logits": p.logits,
    }
    (out / "recipe.json").write_text(json.dumps(meta))


def baseline_compute(files: Path) -> Any:
    """The baseline handler's computation, ``rows (list of dicts) -> list of floats``: what a user
    would write by hand for this model (also timed in process by ``bench_predict.py``)."""
    import torch

    from persia.hashing import hash_strings

    recipe = json.loads((files / "recipe.json").read_text())
    arrays = np.load(files / "tables.npz")
    model = torch.jit.load(str(files / "model.pt"))
    model.eval()
    missing = set(recipe["input"]["missing_values"])
    token = recipe["input"]["missing_token"]
    slots = []
    for s in recipe["slots"]:
        ids = arrays[f"{s['name']}.ids"]
        rows = arrays[f"{s['name']}.rows"]
        table = torch.nn.EmbeddingBag(rows.shape[0] + 1, rows.shape[1], mode="sum")
        with torch.no_grad():
            table.weight.copy_(torch.from_numpy(np.vstack([rows, np.zeros((1, rows.shape[1]))])))
        bits = int(s["prefix_bits"])
        mask = np.uint64((1 << (64 - bits)) - 1) if bits else np.uint64((1 << 64) - 1)
        slots.append((s["column"], ids, table, mask))

    def text(v: Any) -> str:
        if v is None:
            return token
        v = str(v).strip()
        return token if v in missing else v

    def number(v: Any, c: dict[str, Any]) -> float:
        if isinstance(v, str):
            v = v.strip()
            v = None if v in missing else v
        if v is None:
            return 0.0 if c["standardize"] else c["mean"]  # the mean, standardised
        x = float(v)
        if c["log1p"]:
            x = float(np.log1p(max(x, 0.0)))
        return (x - c["mean"]) / c["std"] if c["standardize"] else x

    def compute(rows: list[dict[str, Any]]) -> list[float]:
        n = len(rows)
        embeddings = []
        offsets = torch.arange(n, dtype=torch.int64)
        for column, ids, table, mask in slots:
            hashed = hash_strings([text(r.get(column)) for r in rows]) & mask
            at = np.minimum(np.searchsorted(ids, hashed), len(ids) - 1)
            index = np.where(ids[at] == hashed, at, len(ids))  # unknown: the zero row
            embeddings.append(table(torch.from_numpy(index.astype(np.int64)), offsets))
        dense = torch.tensor(
            [[number(r.get(c["name"]), c) for c in recipe["dense"]] for r in rows],
            dtype=torch.float32,
        )
        with torch.no_grad():
            out = model([dense], embeddings)
            if recipe["logits"]:
                out = torch.sigmoid(out)
        return out.reshape(-1).tolist()  # type: ignore[no-any-return]

    return compute


def baseline_app(files: Path) -> Any:
    """The baseline: a minimal FastAPI handler a user would write for this model by hand."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    compute = baseline_compute(files)

    class Rows(BaseModel):
        rows: list[dict[str, str | int | float | bool | None | list[str | int | float]]]

    app = FastAPI()

    @app.post("/predict")
    def predict(req: Rows) -> dict[str, list[float]]:
        return {"predictions": compute(req.rows)}

    return app


def predictor_app(export_dir: Path) -> Any:
    """The server-layer reference: the baseline's FastAPI handler, calling persia's own
    :meth:`persia.serving.Predictor.predict` (what ``persia serve`` computes) on the rows."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    import persia.serving

    predictor = persia.serving.load(export_dir)

    class Rows(BaseModel):
        rows: list[dict[str, str | int | float | bool | None | list[str | int | float]]]

    app = FastAPI()

    @app.post("/predict")
    def predict(req: Rows) -> dict[str, list[float]]:
        return {"predictions": predictor.predict(req.rows).tolist()}

    return app


def run_baseline_server(spec: str) -> None:
    import uvicorn

    from persia.server.run import bind

    kind, where = spec.split(":", 1)
    sock = bind("127.0.0.1", 0)
    app = baseline_app(Path(where)) if kind == "baseline" else predictor_app(Path(where))
    sys.stdout.write(json.dumps({"http": f"http://127.0.0.1:{sock.getsockname()[1]}"}) + "\n")
    sys.stdout.flush()
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


# ----------------------------------------------------------------------------------- clients
def run_client(spec: dict[str, Any]) -> None:
    """One run: ``concurrency`` threads send ``requests`` requests in all (after ``warmup``
    each), bounded by ``budget_s``; prints the latencies (ms) and the wall time."""
    import httpx

    body = Path(spec["body"]).read_bytes()
    headers = {"content-type": spec["content_type"]}
    conc, total, budget = spec["concurrency"], spec["requests"], spec["budget_s"]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = {"sent": 0}
    start_gate = threading.Barrier(conc + 1)
    deadline = [0.0]

    def worker() -> None:
        with httpx.Client(base_url=spec["url"], timeout=60) as client:
            for _ in range(spec["warmup"]):
                client.post(spec["path"], content=body, headers=headers)
            start_gate.wait()
            mine = []
            while True:
                with lock:
                    if counter["sent"] >= total or time.perf_counter() > deadline[0]:
                        break
                    counter["sent"] += 1
                t0 = time.perf_counter()
                r = client.post(spec["path"], content=body, headers=headers)
                dt = (time.perf_counter() - t0) * 1e3
                if r.status_code != 200:
                    with lock:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                mine.append(dt)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + budget + 600  # warm-up first, then the real bound
    start_gate.wait()
    t0 = time.perf_counter()
    deadline[0] = t0 + budget
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "latencies_ms": latencies,
                "wall_s": wall,
                "errors": errors[:5],
                "n_errors": len(errors),
                "truncated": counter["sent"] < total,
            }
        )
    )


def client_run(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--role", "client", "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=spec["budget_s"] + 300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- servers
class Proc:
    """A child process that prints one JSON line once it listens."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, **(env or {})}
        )
        self.info = self._line()

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline, line = time.monotonic() + START_TIMEOUT_S, b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select(
                [self.proc.stdout], [], [], max(0, deadline - time.monotonic())
            )
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.close()
                raise RuntimeError(f"{self.proc.args[:4]} did not start; see {self.log.name}")
            line += chunk
        return json.loads(line.decode().splitlines()[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def persia_serve(args: list[str], log: Path) -> Proc:
    return Proc(
        [
            sys.executable,
            "-m",
            "persia.cli.main",
            "serve",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-grpc",
        ],
        log,
    )


# ----------------------------------------------------------------------------------- latency
def adult_rows(job: Any, n: int) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    path = job.data.test.files()[0]
    cols = list(job.data.columns)
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=cols, skip_rows=job.data.test.skip_rows),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in cols}),
    )
    return table.slice(0, n).drop_columns([job.data.label.column]).to_pylist()


def latency(args: argparse.Namespace, tmp: Path, common: dict[str, Any]) -> list[dict[str, Any]]:
    import httpx

    from persia.job.config import load_job
    from persia.serving import run_and_export

    job = load_job(ADULT, [f"training.max_samples={args.train_samples}", "training.progress=none"])
    run_and_export(job, tmp / "export")
    write_baseline_files(tmp / "export", tmp / "baseline")
    rows = adult_rows(job, max(args.batches))
    servers = {
        "persia": persia_serve([str(tmp / "export"), "--max-batch", "4096"], tmp / "persia.log"),
        "baseline": Proc(
            [sys.executable, __file__, "--role", "baseline-server"]
            + ["--spec", f"baseline:{tmp / 'baseline'}"],
            tmp / "baseline.log",
        ),
    }
    if args.predictor_server:
        servers["fastapi-predictor"] = Proc(
            [sys.executable, __file__, "--role", "baseline-server"]
            + ["--spec", f"predictor:{tmp / 'export'}"],
            tmp / "fastapi-predictor.log",
        )
    lines = []
    try:
        check = {}
        for name, proc in servers.items():
            r = httpx.post(f"{proc.info['http']}/predict", json={"rows": rows}, timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"{name}: {r.status_code} {r.text[:500]}")
            check[name] = np.asarray(r.json()["predictions"])
        for name in servers:
            diff = float(np.max(np.abs(check["persia"] - check[name])))
            if not diff <= 1e-5:
                raise RuntimeError(f"persia and {name} disagree by {diff}")
            line = {**common, "metric": "max_abs_diff", "server": name, "value": diff}
            lines.append({**line, "rows": len(rows)})
            print(json.dumps(lines[-1]), flush=True)
        per_run = max(1, args.requests // args.rounds)
        for batch in args.batches:
            body = tmp / f"rows{batch}.json"
            body.write_bytes(json.dumps({"rows": rows[:batch]}).encode())
            for conc in args.concurrency:
                pooled: dict[str, dict[str, Any]] = {
                    s: {"lat": [], "wall": 0.0, "truncated": False, "p99s": []} for s in servers
                }
                for rnd in range(args.rounds):
                    order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        res = client_run(
                            {
                                "url": servers[name].info["http"],
                                "path": "/predict",
                                "body": str(body),
                                "content_type": "application/json",
                                "concurrency": conc,
                                "requests": per_run,
                                "warmup": 2,
                                "budget_s": args.run_budget_s,
                            }
                        )
                        p = pooled[name]
                        p["lat"] += res["latencies_ms"]
                        p["wall"] += res["wall_s"]
                        p["truncated"] |= res["truncated"]
                        p["p99s"].append(_percentile(res["latencies_ms"], 99))
                        if res["n_errors"]:
                            raise RuntimeError(f"{name}: failed requests: {res['errors']}")
                cell = {"batch": batch, "concurrency": conc}
                for name, p in pooled.items():
                    n = len(p["lat"])
                    line = {
                        **common,
                        "metric": "latency",
                        "server": name,
                        **cell,
                        "requests": n,
                        "p50_ms": round(_percentile(p["lat"], 50), 3),
                        "p99_ms": round(_percentile(p["lat"], 99), 3),
                        "throughput_rps": round(n / p["wall"], 2) if p["wall"] else None,
                        "rows_per_s": round(n * batch / p["wall"], 1) if p["wall"] else None,
                        "truncated": p["truncated"],
                    }
                    lines.append(line)
                    print(json.dumps(line), flush=True)
                for ref in [n for n in servers if n != "persia"]:
                    per_round = [
                        a / b
                        for a, b in zip(pooled["persia"]["p99s"], pooled[ref]["p99s"], strict=True)
                    ]
                    ratio = float(np.median(per_round))
                    pooled_ratio = _percentile(pooled["persia"]["lat"], 99) / _percentile(
                        pooled[ref]["lat"], 99
                    )
                    line = {
                        **common,
                        "metric": "p99_ratio" if ref == "baseline" else f"p99_ratio_vs_{ref}",
                        **cell,
                        "value": round(ratio, 3),
                        "per_round": [round(x, 3) for x in per_round],
                        "pooled": round(pooled_ratio, 3),
                    }
                    if ref == "baseline":
                        line.update({"target": P99_TARGET, "met": ratio <= P99_TARGET})
                    lines.append(line)
                    print(json.dumps(line), flush=True)
    finally:
        for proc in servers.values():
            proc.close()
    return lines


# --------------------------------------------------------------------------------- freshness
SLOTS = {"a": {"dim": 4}, "b": {"dim": 4, "pooling": "mean"}}
PREFIX_BITS = 12
MARKER_BASE = 10**9  # marker IDs of slot a: never used by the ordinary batches
#: a marker is served once its prediction differs from an unknown ID's by more than this (the
#: batch's other rows change the dense model's float rounding by ~1e-7; a trained row, by ~1e-3)
SEEN_TOLERANCE = 1e-5


def _net() -> Any:
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.l1 = torch.nn.Linear(3 + 8, 16)
            self.l2 = torch.nn.Linear(16, 1)

        def forward(
            self, non_id: list[torch.Tensor], embeddings: list[torch.Tensor]
        ) -> torch.Tensor:
            x = torch.cat([non_id[0]] + [e.flatten(1) for e in embeddings], dim=1)
            return torch.sigmoid(self.l2(torch.tanh(self.l1(x))))

    return Net()


def _batch(rng: np.random.Generator, n: int, marker: int | None = None, train: bool = True) -> Any:
    from persia.embedding.data import IDTypeFeature, Label, NonIDTypeFeature, PersiaBatch

    a = rng.integers(0, 1000, n).astype(np.uint64)
    if marker is not None:
        a[:] = np.uint64(MARKER_BASE + marker)
    lb = rng.integers(1, 4, n).astype(np.int64)
    b = rng.integers(0, 500, int(lb.sum())).astype(np.uint64)
    return PersiaBatch(
        [
            IDTypeFeature.from_columnar("a", a, np.ones(n, dtype=np.int64)),
            IDTypeFeature.from_columnar("b", b, lb),
        ],
        non_id_type_features=[NonIDTypeFeature(rng.normal(size=(n, 3)).astype(np.float32))],
        labels=[Label(rng.integers(0, 2, (n, 1)).astype(np.float32))] if train else None,
        requires_grad=train,
    )


def run_trainer(spec: dict[str, Any]) -> None:
    """Trains continuously with incremental updates; see the module docstring (freshness)."""
    import torch

    from persia.ctx import TrainCtx
    from persia.embedding.config import parse_embedding_config, parse_global_config
    from persia.embedding.optim import Adagrad

    rng = np.random.default_rng(0)
    model = _net()
    glob = parse_global_config(
        {
            "embedding_parameter_server_config": {
                "enable_incremental_update": True,
                "incremental_dir": spec["deltas"],
                "incremental_buffer_size": 10**9,  # flushed every delta_interval_s below
            }
        }
    )
    emb = parse_embedding_config({"feature_index_prefix_bit": PREFIX_BITS, "slots_config": SLOTS})
    log = open(spec["log"], "a", buffering=1)  # noqa: SIM115

    def step(batch: Any) -> None:
        item = ctx.get_embedding_from_data(batch)
        out, labels = ctx.forward(item)
        ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))

    with TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.05),
        model=model,
        embedding_config_file=emb,
        global_config_file=glob,
    ) as ctx:
        for _ in range(20):
            step(_batch(rng, 256))
        ctx.dump_checkpoint(spec["ckpt"], with_jit_model=True)
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
        sys.stdin.readline()  # the server follows the deltas: go
        start = time.monotonic()
        next_marker = next_delta = start
        marker = 0
        writer = ctx._delta_writer  # TrainCtx's DeltaWriter (the local backend has no timer)
        while marker < spec["markers"] and time.monotonic() - start < spec["budget_s"]:
            now = time.monotonic()
            if now >= next_marker:
                step(_batch(rng, 1, marker=marker))
                ctx.runtime.flush()  # the marker's gradient is applied on the parameter server
                log.write(json.dumps({"marker": marker, "applied_unix_s": time.time()}) + "\n")
                marker += 1
                next_marker += spec["marker_interval_s"]
            else:
                step(_batch(rng, 64))
            if time.monotonic() >= next_delta:
                ctx.runtime.flush()  # only applied gradients go into a delta
                writer.flush()
                next_delta += spec["delta_interval_s"]
            time.sleep(spec["step_sleep_s"])
        ctx.runtime.flush()
        writer.flush()
    log.write(json.dumps({"done": True}) + "\n")


def run_prober(spec: dict[str, Any]) -> None:
    """Asks for every announced marker until its prediction changes; prints the freshness of
    each (seconds from the training update applied to the answer reflecting it)."""
    import httpx

    rng = np.random.default_rng(1)
    probe = _batch(rng, 1, train=False)
    log = Path(spec["log"])
    fresh: dict[int, float] = {}
    pending: dict[int, float] = {}
    done, offset = False, 0
    deadline = time.monotonic() + spec["budget_s"]

    def marker_batch(markers: list[int]) -> bytes:
        from persia.embedding.data import IDTypeFeature, NonIDTypeFeature, PersiaBatch

        n = len(markers)
        a = np.array([MARKER_BASE + m for m in markers], dtype=np.uint64)
        b = probe.id_type_features[1]
        return PersiaBatch(
            [
                IDTypeFeature.from_columnar("a", a, np.ones(n, dtype=np.int64)),
                IDTypeFeature.from_columnar("b", np.tile(b.values, n), np.repeat(b.lengths, n)),
            ],
            non_id_type_features=[
                NonIDTypeFeature(np.repeat(probe.non_id_type_features[0].data, n, axis=0))
            ],
            requires_grad=False,
        ).to_bytes()

    unknown = spec["markers"] + 10**6  # an ID no batch ever trains
    with httpx.Client(base_url=spec["url"], timeout=60) as client:
        while time.monotonic() < deadline and not (done and not pending):
            with open(log) as f:
                f.seek(offset)
                for line in f:
                    if not line.endswith("\n"):
                        break
                    offset += len(line.encode())
                    rec = json.loads(line)
                    if rec.get("done"):
                        done = True
                    else:
                        pending[rec["marker"]] = rec["applied_unix_s"]
            if pending:
                markers = sorted(pending)
                # the unknown ID rides in the same batch: its prediction is the "not yet" one
                r = client.post("/predict/batch", content=marker_batch([*markers, unknown]))
                r.raise_for_status()
                now = time.time()
                *preds, p0 = r.json()["predictions"]
                for m, p in zip(markers, preds, strict=True):
                    if abs(p - p0) > SEEN_TOLERANCE:
                        fresh[m] = now - pending.pop(m)
            time.sleep(spec["probe_interval_s"])
    print(json.dumps({"freshness_s": [fresh[m] for m in sorted(fresh)], "unseen": sorted(pending)}))


def freshness(args: argparse.Namespace, tmp: Path, common: dict[str, Any]) -> dict[str, Any]:
    import yaml

    deltas, ckpt, log = tmp / "deltas", tmp / "ckpt", tmp / "markers.jsonl"
    log.write_text("")
    emb_file = tmp / "embedding_config.yml"
    emb_file.write_text(
        yaml.safe_dump({"feature_index_prefix_bit": PREFIX_BITS, "slots_config": SLOTS})
    )
    budget = args.markers * args.marker_interval + 60
    spec = {
        "deltas": str(deltas),
        "ckpt": str(ckpt),
        "log": str(log),
        "markers": args.markers,
        "marker_interval_s": args.marker_interval,
        "delta_interval_s": args.delta_interval,
        "step_sleep_s": 0.02,
        "budget_s": budget,
    }
    trainer = subprocess.Popen(
        [sys.executable, __file__, "--role", "trainer", "--spec", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp / "trainer.log", "w"),  # noqa: SIM115
        text=True,
    )
    server = None
    try:
        assert trainer.stdout is not None and trainer.stdin is not None
        if not trainer.stdout.readline():
            raise RuntimeError(f"the trainer did not start; see {tmp / 'trainer.log'}")
        server = persia_serve(
            [
                str(ckpt),
                "--follow",
                str(deltas),
                "--embedding-config",
                str(emb_file),
                "--poll-interval",
                str(args.poll_interval),
            ],
            tmp / "persia-follow.log",
        )
        prober = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "prober",
                "--spec",
                json.dumps(
                    {
                        "url": server.info["http"],
                        "log": str(log),
                        "markers": args.markers,
                        "probe_interval_s": args.probe_interval,
                        "budget_s": budget + 30,
                    }
                ),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        trainer.stdin.write("go\n")
        trainer.stdin.flush()
        out, _ = prober.communicate(timeout=budget + 120)
        trainer.wait(budget + 60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
        if server is not None:
            server.close()
    res = json.loads(out.strip().splitlines()[-1])
    values = res["freshness_s"]
    target = args.delta_interval + 1.0
    p99 = _percentile(values, 99)
    line = {
        **common,
        "metric": "freshness",
        "markers": len(values),
        "unseen": len(res["unseen"]),
        "p50_s": round(_percentile(values, 50), 3),
        "p99_s": round(p99, 3),
        "max_s": round(max(values), 3) if values else None,
        "delta_interval_s": args.delta_interval,
        "poll_interval_s": args.poll_interval,
        "probe_interval_s": args.probe_interval,
        "target_s": target,
        "met": bool(values) and not res["unseen"] and p99 <= target,
    }
    print(json.dumps(line), flush=True)
    if res["unseen"]:
        raise RuntimeError(f"markers never served: {res['unseen']}")
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few requests per cell (CI)")
    p.add_argument("--requests", type=int, default=None, help="per cell and server (default 1000)")
    p.add_argument("--rounds", type=int, default=None, help="turns per cell (default 4)")
    p.add_argument("--batches", default="1,64,1024")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--train-samples", type=int, default=4096)
    p.add_argument("--run-budget-s", type=float, default=None, help="time bound of one client run")
    p.add_argument("--markers", type=int, default=None, help="freshness samples (default 200)")
    p.add_argument("--marker-interval", type=float, default=0.3)
    p.add_argument("--delta-interval", type=float, default=1.0)
    p.add_argument("--poll-interval", type=float, default=0.1, help="persia serve --poll-interval")
    p.add_argument("--probe-interval", type=float, default=0.01)
    p.add_argument("--only", choices=("latency", "freshness"), default=None)
    p.add_argument(
        "--predictor-server",
        choices=("yes", "no"),
        default=None,
        help="run the fastapi-predictor reference (default: yes, no with --quick)",
    )
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "client":
        run_client(json.loads(args.spec))
        return 0
    if args.role == "baseline-server":
        run_baseline_server(args.spec)
        return 0
    if args.role == "trainer":
        run_trainer(json.loads(args.spec))
        return 0
    if args.role == "prober":
        run_prober(json.loads(args.spec))
        return 0
    args.batches = [int(x) for x in args.batches.split(",")]
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.requests = args.requests or (16 if args.quick else 1000)
    args.predictor_server = (args.predictor_server or ("no" if args.quick else "yes")) == "yes"
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.run_budget_s = args.run_budget_s or (30.0 if args.quick else 300.0)
    args.markers = args.markers or (4 if args.quick else 200)
    if args.quick:
        args.train_samples = min(args.train_samples, 2048)
    from bench_store import machine

    common = {"quick": args.quick, "machine": machine(), "load_avg": _load_avg()}
    summary: dict[str, Any] = {**common, "metric": "summary"}
    with tempfile.TemporaryDirectory(prefix="persia-bench-serving-") as d:
        tmp = Path(d)
        if args.only in (None, "latency"):
            lines = latency(args, tmp, common)
            ratios = [x for x in lines if x["metric"] == "p99_ratio"]
            summary["p99_ratio_max"] = max(x["value"] for x in ratios)
            summary["p99_target_met"] = all(x["met"] for x in ratios)
        if args.only in (None, "freshness"):
            fresh = freshness(args, tmp, common)
            summary["freshness_p99_s"] = fresh["p99_s"]
            summary["freshness_target_met"] = fresh["met"]
    summary["load_avg_end"] = _load_avg()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
