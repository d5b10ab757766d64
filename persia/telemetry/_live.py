"""The recorder that collects: prometheus_client metrics in a registry of this process."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from persia.telemetry._catalog import BY_NAME, CATALOG, EW, LOADER, NN, PS, SERVER
from persia.telemetry._distinct import DistinctEstimator
from persia.telemetry._recorder import FeatureStats, Recorder
from persia.telemetry._sources import SOURCES

LABELS = ("role", "replica")
SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Features(FeatureStats):
    """Per-feature gauges of one embedding worker: unique rate and distinct IDs."""

    def __init__(self, live: Live, prefix_bits: int, features: dict[int, str]) -> None:
        self.live = live
        self.shift = np.uint64(64 - prefix_bits)
        self.features = dict(features)
        self.size = max(features) + 1 if features else 1
        self.distinct = DistinctEstimator(prefix_bits, features)
        #: per group of features (a dim's; keyed by its first prefix): the last batch's unique
        #: keys per prefix and IDs per prefix, replaced whole (a collection in another thread
        #: reads one batch's pair); the rates are computed when the metrics are collected
        self.last: dict[int, tuple[np.ndarray, dict[int, int]]] = {}
        with live._lock:
            live._estimators.add(self.distinct)
            live._features.add(self)

    def observe(self, uniques: np.ndarray, ids_per_prefix: dict[int, int]) -> None:
        if uniques.size == 0 or not ids_per_prefix:
            return
        counts = np.zeros(self.distinct.row_of.size, dtype=np.int64)
        # one numba pass: the keys per prefix and the distinct-ID registers
        self.distinct.add(np.ascontiguousarray(uniques, dtype=np.uint64), counts)
        self.last[next(iter(ids_per_prefix))] = (counts, ids_per_prefix)

    def rates(self) -> dict[str, float]:
        """Feature name -> unique keys / IDs of the last batch observed."""
        per_name: dict[str, list[int]] = {}
        for counts, ids_per_prefix in list(self.last.values()):
            for prefix, ids in ids_per_prefix.items():
                name = self.features.get(prefix)
                if name is None or prefix >= counts.size:
                    continue
                acc = per_name.setdefault(name, [0, 0])
                acc[0] += int(counts[prefix])
                acc[1] += ids
        return {name: unique / ids for name, (unique, ids) in per_name.items() if ids}


class Live(Recorder):
    """Collects into its own :class:`prometheus_client.CollectorRegistry`.

    Args:
        role, replica: this process's own role (its push's ``instance``); the other roles that
            run in this process take the replica numbers of ``replicas``.
        replicas: role -> replica for the roles of this process (default 0).
    """

    on = True

    def __init__(self, role: str, replica: int, replicas: dict[str, int] | None = None) -> None:
        self.role, self.replica = role, int(replica)
        self.replicas = {NN: 0, EW: 0, LOADER: 0, SERVER: 0, PS: 0, **(replicas or {})}
        self.replicas[role] = self.replica
        disable_created_metrics()  # no *_created series (this process's registry only reads)
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._persia_counts: dict[tuple[str, str, str, str], float] = {}
        # the live embedding workers' estimators (a worker that is gone stops counting)
        self._estimators: weakref.WeakSet[DistinctEstimator] = weakref.WeakSet()
        self._features: weakref.WeakSet[_Features] = weakref.WeakSet()
        self._model_time: float | None = None
        self.c: dict[str, Counter] = {}
        self.g: dict[str, Gauge] = {}
        self.h: dict[str, Histogram] = {}
        for m in CATALOG:
            labels = LABELS + m.labels
            if (
                m.name in ("estimated_distinct_id", "batch_unique_indices_rate")
                or m.role == PS
                and m.name
                not in (
                    "index_miss_ratio",
                    "lookup_hashmap_time_cost_sec",
                    "persia_shard_lookup_seconds",
                    "persia_shard_apply_seconds",
                )
            ):
                continue  # read from the shards / estimators when collected (collect())
            if m.name == "persia_serving_freshness_seconds" or m.name == "persia_delta_lag_seconds":
                continue  # computed when collected
            if m.type == "counter":
                if not m.persia:
                    self.c[m.name] = Counter(m.name, m.help, labels, registry=self.registry)
            elif m.type == "gauge":
                self.g[m.name] = Gauge(m.name, m.help, labels, registry=self.registry)
            else:
                buckets = (
                    STALENESS_BUCKETS
                    if m.name == "persia_staleness_batches"
                    else CHECKPOINT_BUCKETS
                    if m.name == "persia_checkpoint_seconds"
                    else SECONDS_BUCKETS
                )
                self.h[m.name] = Histogram(
                    m.name, m.help, labels, buckets=buckets, registry=self.registry
                )
        self.registry.register(_Collected(self))  # type: ignore[arg-type]
        self._children: dict[tuple[str, str, str], Any] = {}

    def replica_of(self, role: str) -> str:
        return str(self.replicas.get(role, 0))

    def _k(self, name: str, role: str, replica: int | str | None = None) -> Any:
        """The child of metric ``name`` for ``role`` (and ``replica``: default, this process's
        replica of ``role``), created on first use so that a role this process does not hold
        shows no series."""
        rep = self.replica_of(role) if replica is None else str(replica)
        key = (name, role, rep)
        child = self._children.get(key)
        if child is None:
            metric = self.h.get(name) or self.g.get(name) or self.c[name]
            child = metric.labels(role, rep)
            self._children[key] = child
        return child

    # ---------------------------------------------------------------------- NN worker
    def trained(self, samples: int) -> None:
        self._k("persia_samples_trained", NN).inc(samples)
        self._k("persia_batches_trained", NN).inc()

    def staleness_taken(self, staleness: int, in_flight: int) -> None:
        self._k("persia_staleness_batches", NN).observe(staleness)
        self._k("staleness", NN).set(in_flight)

    def staleness_returned(self, in_flight: int) -> None:
        self._k("staleness", NN).set(in_flight)

    def pending_batches(self, n: int) -> None:
        self._k("num_pending_batches", NN).set(n)

    def forward_client(self, seconds: float) -> None:
        self._k("forward_client_time_cost_sec", NN).set(seconds)

    def backward_client(self, seconds: float) -> None:
        self._k("backward_client_time_cost_sec", NN).set(seconds)

    def progress(self, samples_per_s: float | None, loss: float | None) -> None:
        if samples_per_s is not None:
            self._k("persia_samples_per_second", NN).set(samples_per_s)
        if loss is not None:
            self._k("persia_train_loss", NN).set(loss)

    def test_auc(self, auc: float | None) -> None:
        if auc is not None:
            self._k("persia_test_auc", NN).set(auc)

    def checkpoint(self, seconds: float) -> None:
        self._k("persia_checkpoint_seconds", NN).observe(seconds)

    def recovery(self, shards: int = 1) -> None:
        self._k("persia_recoveries", NN).inc(shards)

    def delta_written(self, rows: int) -> None:
        self._k("persia_deltas_written", NN).inc()
        self._k("persia_delta_rows_written", NN).inc(rows)

    def delta_applied(self, delay_s: float | None) -> None:
        self._k("persia_deltas_applied", self.role).inc()
        if delay_s is not None:
            self._k("inc_update_delay_sec", self.role).set(delay_s)

    # ---------------------------------------------------------------- embedding worker
    def lookup(self, total_s: float, rpc_s: float, keys: int, uniques: int) -> None:
        self._k("persia_lookup_seconds", EW).observe(total_s)
        self._k("lookup_total_time_cost_sec", EW).set(total_s)
        self._k("lookup_rpc_time_cost_sec", EW).set(rpc_s)
        self._k("persia_lookup_keys", EW).inc(keys)
        self._k("persia_lookup_unique_keys", EW).inc(uniques)

    def apply(self, seconds: float) -> None:
        self._k("persia_apply_seconds", EW).observe(seconds)
        self._k("update_gradient_time_cost_sec", EW).set(seconds)

    def feature_stats(self, prefix_bits: int, features: dict[int, str]) -> FeatureStats | None:
        if not 0 < prefix_bits <= 16 or not features:
            return None
        return _Features(self, prefix_bits, features)

    def nonfinite(self, features: Iterable[str]) -> None:
        replica = self.replica_of(EW)
        with self._lock:
            for feat in features:
                key = ("nan_count", EW, replica, feat)
                self._persia_counts[key] = self._persia_counts.get(key, 0) + 1

    def grads_skipped(self, features: Iterable[str]) -> None:
        replica = self.replica_of(NN)
        with self._lock:
            for feat in features:
                key = ("nan_grad_skipped", NN, replica, feat)
                self._persia_counts[key] = self._persia_counts.get(key, 0) + 1

    # --------------------------------------------------------------- parameter server
    def shard_lookup(self, replica: int, seconds: float, keys: int, misses: int) -> None:
        self._k("persia_shard_lookup_seconds", PS, replica).observe(seconds)
        self._k("lookup_hashmap_time_cost_sec", PS, replica).set(seconds)
        if keys:
            self._k("index_miss_ratio", PS, replica).set(misses / keys)

    def shard_apply(self, replica: int, seconds: float) -> None:
        self._k("persia_shard_apply_seconds", PS, replica).observe(seconds)

    # ---------------------------------------------------------------------- data loader
    def loader_batch(self, samples: int, wait_s: float) -> None:
        self._k("persia_loader_batches", LOADER).inc()
        self._k("persia_loader_samples", LOADER).inc(samples)
        self._k("persia_loader_wait_seconds", LOADER).observe(wait_s)

    # --------------------------------------------------------------------------- server
    def serving_request(self, seconds: float, samples: int) -> None:
        self._k("persia_serving_request_seconds", SERVER).observe(seconds)
        self._k("persia_serving_requests", SERVER).inc()
        self._k("persia_serving_samples", SERVER).inc(samples)

    def serving_response(self, endpoint: str, code: str) -> None:
        self.c["persia_serving_responses"].labels(
            SERVER, self.replica_of(SERVER), endpoint, code
        ).inc()

    def serving_model_time(self, unix_s: float) -> None:
        self._model_time = float(unix_s)

    # ------------------------------------------------------------------------ rendering
    def render(self) -> bytes:
        return generate_latest(self.registry) + self._persia_counters_text().encode()

    def _persia_counters_text(self) -> str:
        """PERSIA's counters under PERSIA's exact names (prometheus_client would add
        ``_total``)."""
        with self._lock:
            counts = dict(self._persia_counts)
        for stats in SOURCES.read("shards"):
            for replica, s in stats:
                for name, field in (
                    ("index_miss_count", "misses"),
                    ("gradient_id_miss_count", "skipped_absent"),
                ):
                    key = (name, PS, str(replica), "")
                    counts[key] = counts.get(key, 0) + int(s[field])
        out = []
        for name in ("index_miss_count", "gradient_id_miss_count", "nan_count", "nan_grad_skipped"):
            m = BY_NAME[name]
            out.append(f"# HELP {name} {_esc(m.help)}\n# TYPE {name} counter\n")
            for (n, role, replica, feat), value in sorted(counts.items()):
                if n != name:
                    continue
                labels = f'role="{role}",replica="{_esc(replica)}"'
                if m.labels:
                    labels = f'feat="{_esc(feat)}",' + labels
                out.append(f"{name}{{{labels}}} {float(value)!r}\n")
        return "".join(out)


_SHARD_GAUGES = (
    ("persia_rows_held", "rows"),
    ("persia_capacity_rows", "capacity"),
    ("persia_bytes_used", "bytes_used"),
)
_SHARD_COUNTERS = (
    ("persia_evictions", "evictions"),
    ("persia_admissions", "admissions"),
    ("persia_admission_rejections", "rejections"),
    ("persia_gradients_applied", "applied"),
    ("persia_nonfinite_gradients_skipped", "skipped_nonfinite"),
)


def _per_feature(name: str, replica: str, values: dict[str, float]) -> GaugeMetricFamily:
    """The embedding worker's gauge ``name`` with one sample per feature (label ``feat``)."""
    g = GaugeMetricFamily(name, BY_NAME[name].help, labels=(*LABELS, "feat"))
    for feat, value in sorted(values.items()):
        g.add_metric([EW, replica, feat], value)
    return g


class _Collected:
    """What is read when the metrics are collected: every watched shard's stats, the distinct-ID
    estimates, the delta writers' lag and the served model's age."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        live = self.live
        shards = [pair for stats in SOURCES.read("shards") for pair in stats]
        for name, field in _SHARD_GAUGES:
            g = GaugeMetricFamily(name, BY_NAME[name].help, labels=LABELS)
            for replica, s in shards:
                g.add_metric([PS, str(replica)], float(s[field]))
            yield g
        for name, field in _SHARD_COUNTERS:
            c = CounterMetricFamily(name, BY_NAME[name].help, labels=LABELS)
            for replica, s in shards:
                c.add_metric([PS, str(replica)], float(s[field]))
            yield c
        with live._lock:
            estimators = list(live._estimators)
            features = list(live._features)
        ew = live.replica_of(EW)
        totals: dict[str, float] = {}
        for est in estimators:
            for feat, value in est.estimates().items():
                totals[feat] = totals.get(feat, 0.0) + value
        yield _per_feature("estimated_distinct_id", ew, totals)
        rates: dict[str, float] = {}
        for f in features:  # one embedding worker per process: the last one's rate wins
            rates.update(f.rates())
        yield _per_feature("batch_unique_indices_rate", ew, rates)
        lag = GaugeMetricFamily(
            "persia_delta_lag_seconds", BY_NAME["persia_delta_lag_seconds"].help, labels=LABELS
        )
        ages = [a for a in SOURCES.read("delta_lag") if a is not None]
        if ages:
            lag.add_metric([NN, live.replica_of(NN)], max(ages))
        yield lag
        fresh = GaugeMetricFamily(
            "persia_serving_freshness_seconds",
            BY_NAME["persia_serving_freshness_seconds"].help,
            labels=LABELS,
        )
        if live._model_time is not None:
            fresh.add_metric(
                [SERVER, live.replica_of(SERVER)], max(0.0, time.time() - live._model_time)
            )
        yield fresh
