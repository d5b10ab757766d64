"""Every metric persia exposes: name, type, unit, extra labels, meaning, role and PERSIA's name.

One table, read by the recorder (which creates the metrics from it), by ``docs/metrics.md`` (a
test checks that the page lists every row) and by the dashboard test. Every metric also carries
the labels ``role`` and ``replica``; a push adds ``job`` and ``instance`` (the Pushgateway's
grouping key).

PERSIA's own names are kept, with its meaning and type, where persia has the same quantity
(``persia`` column: True); persia's other metrics are prefixed ``persia_`` so that no name means
two things. A counter is exposed as ``NAME_total`` by prometheus_client's rule, except PERSIA's
counters, which keep PERSIA's exact name (as PERSIA's Rust client exposed them).
"""

from __future__ import annotations

from typing import NamedTuple


class MetricDef(NamedTuple):
    name: str  # as exposed (a persia_ counter without its _total suffix)
    type: str  # counter | gauge | histogram
    unit: str
    labels: tuple[str, ...]  # besides role and replica
    role: str
    help: str
    persia: bool = False  # PERSIA's name, meaning and type


NN, EW, PS, LOADER, SERVER, ANY = (
    "nn-worker",
    "embedding-worker",
    "parameter-server",
    "data-loader",
    "server",
    "any",
)
ROLES = (NN, EW, PS, LOADER, SERVER)

CATALOG: tuple[MetricDef, ...] = (
    # ---- PERSIA's names ----------------------------------------------------------------------
    MetricDef("staleness", "gauge", "batches", (), NN,
              "batches looked up whose gradients are not applied yet (PERSIA: +1 at a lookup, "
              "-1 when the batch's gradients are applied)", True),
    MetricDef("num_pending_batches", "gauge", "batches", (), NN,
              "looked-up batches waiting in the forward buffer for the NN worker", True),
    MetricDef("index_miss_count", "counter", "keys", (), PS,
              "lookups of keys the shard did not hold", True),
    MetricDef("index_miss_ratio", "gauge", "ratio", (), PS,
              "missed keys / keys of the shard's last lookup call", True),
    MetricDef("gradient_id_miss_count", "counter", "keys", (), PS,
              "gradients for keys the shard no longer holds (evicted or never admitted), skipped",
              True),
    MetricDef("estimated_distinct_id", "gauge", "IDs", ("feat",), EW,
              "distinct IDs seen per feature (HyperLogLog over a 1/16 hash sample)", True),
    MetricDef("batch_unique_indices_rate", "gauge", "ratio", ("feat",), EW,
              "unique IDs / IDs of the feature in the last batch", True),
    MetricDef("lookup_hashmap_time_cost_sec", "gauge", "seconds", (), PS,
              "the shard's last lookup call", True),
    MetricDef("lookup_total_time_cost_sec", "gauge", "seconds", (), EW,
              "the last batch's whole lookup (keys, de-duplication, shard calls, pooling)", True),
    MetricDef("lookup_rpc_time_cost_sec", "gauge", "seconds", (), EW,
              "the last batch's shard lookup calls (transport included)", True),
    MetricDef("update_gradient_time_cost_sec", "gauge", "seconds", (), EW,
              "the last batch's gradient aggregation and application", True),
    MetricDef("forward_client_time_cost_sec", "gauge", "seconds", (), NN,
              "the NN worker's last wait for a batch's embeddings (its lookup call)", True),
    MetricDef("backward_client_time_cost_sec", "gauge", "seconds", (), NN,
              "the NN worker's last hand-over of a batch's gradients until applied", True),
    MetricDef("inc_update_delay_sec", "gauge", "seconds", (), ANY,
              "delay between an incremental delta being written and being loaded", True),
    MetricDef("nan_grad_skipped", "counter", "feature gradients", ("feat",), NN,
              "feature gradients dropped by the NN worker for a NaN or infinity: with a grad "
              "scaler (mixed precision) a skipped step drops every feature's gradient of its "
              "batch", True),
    MetricDef("nan_count", "counter", "feature gradients", ("feat",), EW,
              "batches x features whose embedding gradient held a NaN or infinity (those rows "
              "are skipped by the shards)", True),
    # ---- persia's own --------------------------------------------------------------------------
    MetricDef("persia_samples_trained", "counter", "samples", (), NN,
              "samples whose gradients the NN worker handed back (ctx.backward)"),
    MetricDef("persia_batches_trained", "counter", "batches", (), NN,
              "training batches handed back (ctx.backward)"),
    MetricDef("persia_samples_per_second", "gauge", "samples/s", (), NN,
              "throughput as the job's summary defines it, at the last log interval"),
    MetricDef("persia_train_loss", "gauge", "loss", (), NN,
              "mean training loss of the last log interval (persia train)"),
    MetricDef("persia_test_auc", "gauge", "AUC", (), NN,
              "test AUC of the last evaluation (persia train)"),
    MetricDef("persia_staleness_batches", "histogram", "batches", (), NN,
              "per training batch, the earlier batches whose gradients it did not see"),
    MetricDef("persia_lookup_seconds", "histogram", "seconds", (), EW,
              "per batch, the embedding worker's whole lookup"),
    MetricDef("persia_apply_seconds", "histogram", "seconds", (), EW,
              "per batch, the embedding worker's gradient aggregation and application"),
    MetricDef("persia_lookup_keys", "counter", "keys", (), EW,
              "IDs looked up (before de-duplication)"),
    MetricDef("persia_lookup_unique_keys", "counter", "keys", (), EW,
              "distinct keys looked up, summed over batches"),
    MetricDef("persia_shard_lookup_seconds", "histogram", "seconds", (), PS,
              "per shard call, a lookup"),
    MetricDef("persia_shard_apply_seconds", "histogram", "seconds", (), PS,
              "per shard call, a gradient application"),
    MetricDef("persia_rows_held", "gauge", "rows", (), PS, "embedding rows the shard holds"),
    MetricDef("persia_capacity_rows", "gauge", "rows", (), PS, "the shard's capacity"),
    MetricDef("persia_bytes_used", "gauge", "bytes", (), PS,
              "memory of the shard's tables (values, optimizer state, index)"),
    MetricDef("persia_evictions", "counter", "rows", (), PS,
              "rows evicted (least recently used) to make room"),
    MetricDef("persia_admissions", "counter", "rows", (), PS, "rows created by training lookups"),
    MetricDef("persia_admission_rejections", "counter", "keys", (), PS,
              "missed keys a training lookup did not admit (admit_probability)"),
    MetricDef("persia_gradients_applied", "counter", "rows", (), PS,
              "gradient rows applied"),
    MetricDef("persia_nonfinite_gradients_skipped", "counter", "rows", (), PS,
              "gradient rows skipped because they held a NaN or infinity"),
    MetricDef("persia_loader_batches", "counter", "batches", (), LOADER,
              "batches read from the dataset (local) or sent to the NN workers (actor)"),
    MetricDef("persia_loader_samples", "counter", "samples", (), LOADER,
              "samples of those batches"),
    MetricDef("persia_loader_wait_seconds", "histogram", "seconds", (), LOADER,
              "per batch, the wait for the dataset (local) or for a receiver (actor)"),
    MetricDef("persia_deltas_written", "counter", "deltas", (), NN,
              "incremental-update deltas written"),
    MetricDef("persia_delta_rows_written", "counter", "rows", (), NN,
              "rows in the deltas written"),
    MetricDef("persia_delta_lag_seconds", "gauge", "seconds", (), NN,
              "age of the oldest change not yet in a delta (time since the last flush)"),
    MetricDef("persia_deltas_applied", "counter", "deltas", (), ANY,
              "incremental-update deltas applied by a reader"),
    MetricDef("persia_checkpoint_seconds", "histogram", "seconds", (), NN,
              "per checkpoint, the time to write it (dump_checkpoint)"),
    MetricDef("persia_recoveries", "counter", "shards", (), NN,
              "parameter-server shards restored during the job (cluster backend)"),
    MetricDef("persia_serving_request_seconds", "histogram", "seconds", (), SERVER,
              "per prediction request, its latency"),
    MetricDef("persia_serving_requests", "counter", "requests", (), SERVER,
              "prediction requests answered"),
    MetricDef("persia_serving_samples", "counter", "samples", (), SERVER,
              "samples predicted"),
    MetricDef("persia_serving_responses", "counter", "responses", ("endpoint", "code"), SERVER,
              "answers by endpoint and status code (HTTP status, or gRPC status name), refusals "
              "and errors included"),
    MetricDef("persia_serving_freshness_seconds", "gauge", "seconds", (), SERVER,
              "age of the served model: now - when its newest rows were trained"),
)  # fmt: skip

BY_NAME = {m.name: m for m in CATALOG}


def exposed_names(m: MetricDef) -> tuple[str, ...]:
    """The sample names ``m`` is exposed under."""
    if m.type == "histogram":
        return (f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count")
    if m.type == "counter" and not m.persia:
        return (f"{m.name}_total",)
    return (m.name,)
