"""The recorder interface, and the no-op that is in place while metrics are off."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class FeatureStats:
    """One embedding worker's per-feature statistics (unique rate, distinct IDs)."""

    def observe(self, uniques: np.ndarray, ids_per_prefix: dict[int, int]) -> None:
        """One dim group of one batch: its unique keys, and IDs per key prefix."""


class Recorder:
    """What the roles report; this base class records nothing (metrics off).

    Code on the hot path asks :func:`persia.telemetry.current` for the recorder and tests
    :attr:`on` before it takes a time or counts anything, so that with metrics off a batch costs
    one attribute read per call site.
    """

    on = False

    # NN worker
    def trained(self, samples: int) -> None:
        """One batch's gradients handed back (``ctx.backward``)."""

    def staleness_taken(self, staleness: int, in_flight: int) -> None:
        """A training batch took its staleness permit, seeing ``staleness``."""

    def staleness_returned(self, in_flight: int) -> None:
        """A permit came back."""

    def pending_batches(self, n: int) -> None:
        """Looked-up batches waiting for the NN worker."""

    def forward_client(self, seconds: float) -> None:
        """The NN worker's lookup call of one batch."""

    def backward_client(self, seconds: float) -> None:
        """One batch's gradients, from the applier taking them to applied."""

    def progress(self, samples_per_s: float | None, loss: float | None) -> None:
        """A log interval of ``persia train``."""

    def test_auc(self, auc: float | None) -> None:
        """An evaluation of ``persia train``."""

    def checkpoint(self, seconds: float) -> None:
        """A checkpoint was written."""

    def recovery(self, shards: int = 1) -> None:
        """Shards were restored."""

    def delta_written(self, rows: int) -> None:
        """An incremental delta was written."""

    def delta_applied(self, delay_s: float | None) -> None:
        """An incremental delta was applied, ``delay_s`` after it was written."""

    # embedding worker
    def lookup(self, total_s: float, rpc_s: float, keys: int, uniques: int) -> None:
        """One batch's lookup on the embedding worker."""

    def apply(self, seconds: float) -> None:
        """One batch's gradient aggregation and application on the embedding worker."""

    def feature_stats(self, prefix_bits: int, features: dict[int, str]) -> FeatureStats | None:
        """Per-feature statistics for a worker whose key prefixes name ``features``."""
        return None

    def nonfinite(self, features: Iterable[str]) -> None:
        """One batch's gradient of each of ``features`` held a NaN or infinity."""

    def grads_skipped(self, features: Iterable[str]) -> None:
        """The NN worker dropped one batch's gradient of each of ``features`` (a skipped step)."""

    # parameter server
    def shard_lookup(self, replica: int, seconds: float, keys: int, misses: int) -> None:
        """One lookup call on shard ``replica``."""

    def shard_apply(self, replica: int, seconds: float) -> None:
        """One gradient call on shard ``replica``."""

    # data loader
    def loader_batch(self, samples: int, wait_s: float) -> None:
        """A batch read (local) or sent (data-loader actor)."""

    # server
    def serving_request(self, seconds: float, samples: int) -> None:
        """One prediction request answered."""

    def serving_response(self, endpoint: str, code: str) -> None:
        """One answer of ``endpoint`` with status ``code`` (any status, errors included)."""

    def serving_model_time(self, unix_s: float) -> None:
        """The served model's newest rows were trained at ``unix_s``."""

    def render(self) -> bytes:
        """The metrics in Prometheus's text format (empty: metrics off)."""
        return b""
