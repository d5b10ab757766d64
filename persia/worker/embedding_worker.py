"""The embedding worker: from a batch's IDs to pooled embeddings, and back to one gradient per key.

Forward, per batch (docs/ARCHITECTURE.md, "The path of one training batch", step 2):

1. per slot, put the slot's prefix in the top bits of every ID (so slots never collide) -> keys;
2. per embedding dim, concatenate the keys of all slots of that dim and de-duplicate them once;
3. route every unique key to its shard (the store's ``shard_of``) and look the rows up, one
   batched call per shard;
4. pool per sample (sum, mean, sqrt, or raw: a padded sequence plus a mask channel).

Backward: per dim, a segment sum of the per-sample gradients into one gradient per unique key
(undoing the pooling's scaling), non-finite rows counted (the shards skip them), one batched
``apply_gradients`` per shard.

The worker is stateless between batches: what backward needs travels in :class:`Lookup`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persia import telemetry
from persia.embedding.data import PersiaBatch
from persia.embedding.spec import POOLINGS, EmbeddingSpec, SlotSpec
from persia.errors import BatchError
from persia.hashing import hash_ints
from persia.rpc.base import ParameterServerClient
from persia.worker import pooling

#: ``SlotSpec`` and ``POOLINGS`` are :mod:`persia.embedding.spec`'s, kept importable from here.
__all__ = ["POOLINGS", "SlotSpec", "Lookup", "EmbeddingWorker", "hash_stack"]


@dataclass
class _SlotPart:
    spec: SlotSpec
    feature_index: int
    start: int  # range of this slot's keys inside its dim group's concatenated keys
    stop: int
    lengths: np.ndarray  # IDs per sample, as used for pooling (after hash stacking)
    column: int  # first column in the summed buffer (summed slots), else -1


@dataclass
class _DimGroup:
    dim: int
    parts: list[_SlotPart] = field(default_factory=list)
    uniques: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # u64[u]
    inverse: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # i32[n]
    shard: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # i32[u]
    one_hot: bool = False  # every part: summed, one ID per sample, columns side by side = all


@dataclass
class Lookup:
    """The worker's forward result for one batch, and what its backward needs.

    Attributes:
        summed: float32 ``(batch, total_summed_dim)``: every summed slot, side by side.
        raw: per raw slot (by feature index), float32 ``(batch, sample_fixed_size, dim + 1)``.
        layout: per ID feature in batch order, ("sum", column, dim) or ("raw", feature_index, dim).
        training: whether the lookup created rows (and gradients are expected).
    """

    batch_size: int
    summed: np.ndarray
    raw: dict[int, np.ndarray]
    layout: list[tuple[str, int, int]]
    training: bool
    groups: list[_DimGroup]
    dropped_ids: int = 0


class EmbeddingWorker:
    """Stateless embedding worker over a :class:`ParameterServerClient` (an
    :class:`persia.worker.protocol.EmbeddingWorkerProtocol`).

    Args:
        slots: the configured slots, by name.
        prefix_bits: PERSIA's ``feature_index_prefix_bit``: how many top bits hold the prefix.
        servers: the parameter servers.
    """

    def __init__(
        self, slots: Sequence[SlotSpec], prefix_bits: int, servers: ParameterServerClient
    ) -> None:
        self.slots = {s.name: s for s in slots}
        self.prefix_bits = prefix_bits
        self.servers = servers
        self._dedupers: dict[int, pooling.Deduper] = {}
        # One gather and one segment sum for a dim group whose slots are all summed with one
        # ID per sample and fill ``summed`` side by side (Criteo-style one-hot slots), instead
        # of a pooling call per slot. Same results; False forces the per-slot path.
        self.one_hot_fast_path = True
        self.nonfinite_gradients = 0  # unique keys whose gradient had a NaN or infinity
        self._rpc_s = 0.0  # shard lookup calls of the current batch (metrics on)
        self._features: tuple[Any, Any] = (None, None)  # (recorder, its FeatureStats)

    @classmethod
    def from_spec(cls, spec: EmbeddingSpec, servers: ParameterServerClient) -> EmbeddingWorker:
        """The worker of an embedding layer: its slots and prefix bits, over ``servers``."""
        return cls(spec.slots, spec.feature_index_prefix_bit, servers)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: PersiaBatch, training: bool) -> Lookup:
        """Looks up and pools the embeddings of every ID feature of ``batch``."""
        rec = telemetry.current()
        if not rec.on:
            return self._forward(batch, training, None)
        t0 = time.perf_counter()
        self._rpc_s = 0.0
        out = self._forward(batch, training, rec)
        keys = sum(len(g.inverse) for g in out.groups)
        uniques = sum(len(g.uniques) for g in out.groups)
        rec.lookup(time.perf_counter() - t0, self._rpc_s, keys, uniques)
        return out

    def _feature_stats(self, rec: Any) -> Any:
        """The recorder's per-feature statistics of this worker's slots (by key prefix)."""
        if self._features[0] is not rec:
            names = {s.prefix: s.group or s.name for s in self.slots.values()}
            self._features = (rec, rec.feature_stats(self.prefix_bits, names))
        return self._features[1]

    def _forward(self, batch: PersiaBatch, training: bool, rec: Any) -> Lookup:
        n = batch.batch_size
        groups: dict[int, _DimGroup] = {}
        keys_by_dim: dict[int, list[np.ndarray]] = {}
        layout: list[tuple[str, int, int]] = []
        column = 0
        for fi, feature in enumerate(batch.id_type_features):
            spec = self.slots.get(feature.name)
            if spec is None:
                raise BatchError(
                    f"ID feature {feature.name!r} is not a configured slot "
                    f"(slots: {sorted(self.slots)})"
                )
            keys, lengths = self._keys(spec, feature.values, feature.lengths)
            group = groups.setdefault(spec.dim, _DimGroup(spec.dim))
            chunks = keys_by_dim.setdefault(spec.dim, [])
            start = sum(len(c) for c in chunks)
            chunks.append(keys)
            if spec.pooling == "raw":
                layout.append(("raw", fi, spec.dim))
                col = -1
            else:
                layout.append(("sum", column, spec.dim))
                col = column
                column += spec.dim
            group.parts.append(_SlotPart(spec, fi, start, start + len(keys), lengths, col))

        # Every column of ``summed`` belongs to exactly one summed slot, and pooling overwrites
        # its slot's columns entirely, so no zero fill is needed.
        summed = np.empty((n, column), dtype=np.float32)
        raw: dict[int, np.ndarray] = {}
        dropped = 0
        for dim, group in groups.items():
            chunks = keys_by_dim[dim]
            keys = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
            deduper = self._dedupers.setdefault(dim, pooling.Deduper())
            uniques, inverse = deduper.unique_inverse(keys)
            group.uniques, group.inverse = uniques, inverse
            if rec is not None:
                stats = self._feature_stats(rec)
                if stats is not None:
                    ids: dict[int, int] = {}
                    for part in group.parts:
                        p = part.spec.prefix
                        ids[p] = ids.get(p, 0) + part.stop - part.start
                    stats.observe(uniques, ids)
            rows = self._gather(group, uniques, training)
            group.one_hot = self.one_hot_fast_path and _spans_summed(group, n, column)
            if group.one_hot:
                # Sample b's slot s is key s * n + b: rows[inverse] laid out (slot, sample),
                # written transposed straight into (sample, slot, dim) = ``summed``.
                np.take(
                    rows,
                    inverse.reshape(len(group.parts), n).T,
                    axis=0,
                    out=summed.reshape(n, len(group.parts), dim),
                    mode="clip",
                )
                continue
            for part in group.parts:
                inv = inverse[part.start : part.stop]
                spec = part.spec
                if spec.pooling == "raw":
                    out, d = pooling.pool_raw_forward(
                        part.lengths, inv, rows, spec.sample_fixed_size
                    )
                    dropped += d
                    raw[part.feature_index] = out
                else:
                    pooling.pool_forward(
                        part.lengths,
                        inv,
                        rows,
                        spec.pooling,  # type: ignore[arg-type]
                        out=summed,
                        col=part.column,
                    )
        return Lookup(n, summed, raw, layout, training, list(groups.values()), dropped)

    def _keys(
        self, spec: SlotSpec, values: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if spec.hash_stack_rounds > 0:
            values = hash_stack(values, spec.hash_stack_rounds, spec.hash_stack_size)
            lengths = np.asarray(lengths, dtype=np.int64) * spec.hash_stack_rounds
        keys = pooling.add_prefix(values, spec.prefix, self.prefix_bits)
        return keys, np.asarray(lengths)

    def _gather(self, group: _DimGroup, uniques: np.ndarray, training: bool) -> np.ndarray:
        rows = np.empty((len(uniques), group.dim), dtype=np.float32)
        timed = telemetry.current().on
        t0 = time.perf_counter() if timed else 0.0
        if self.servers.num_shards == 1:
            group.shard = np.zeros(len(uniques), dtype=np.int32)
            rows[:] = self.servers.lookup(0, uniques, group.dim, training)
        else:
            group.shard = self.servers.shard_of(uniques)
            for s in range(self.servers.num_shards):
                sel = np.flatnonzero(group.shard == s)
                if len(sel):
                    rows[sel] = self.servers.lookup(s, uniques[sel], group.dim, training)
        if timed:
            self._rpc_s += time.perf_counter() - t0
        return rows

    # ----------------------------------------------------------------- backward
    def backward(
        self, lookup: Lookup, summed_grad: np.ndarray | None, raw_grads: dict[int, np.ndarray]
    ) -> np.ndarray:
        """Turns per-sample gradients into per-key gradients and applies them on the shards.

        Args:
            lookup: the forward result of this batch.
            summed_grad: gradient of ``lookup.summed`` (None: no summed slot got a gradient).
            raw_grads: gradient of each raw slot's tensor, by feature index (missing: none).

        Returns:
            int64 counts ``[applied, skipped_absent, skipped_nonfinite]`` over all shards.
        """
        rec = telemetry.current()
        if not rec.on:
            return self._backward(lookup, summed_grad, raw_grads, None)
        t0 = time.perf_counter()
        out = self._backward(lookup, summed_grad, raw_grads, rec)
        rec.apply(time.perf_counter() - t0)
        return out

    def _nonfinite(self, rec: Any, group: _DimGroup, bad: np.ndarray) -> None:
        """Reports the features whose gradient had a non-finite row (PERSIA's ``nan_count``)."""
        if self.prefix_bits <= 0:
            return
        prefixes = np.unique(group.uniques[bad] >> np.uint64(64 - self.prefix_bits))
        names = {s.prefix: s.group or s.name for s in self.slots.values()}
        rec.nonfinite(sorted({names[int(p)] for p in prefixes if int(p) in names}))

    def _backward(
        self,
        lookup: Lookup,
        summed_grad: np.ndarray | None,
        raw_grads: dict[int, np.ndarray],
        rec: Any,
    ) -> np.ndarray:
        totals = np.zeros(3, dtype=np.int64)
        for group in lookup.groups:
            grad_u = np.zeros((len(group.uniques), group.dim), dtype=np.float32)
            if group.one_hot and summed_grad is not None:
                m, n = len(group.parts), lookup.batch_size
                # (sample, slot) order: the gradient buffer viewed as one row per key.
                inv = np.ascontiguousarray(group.inverse.reshape(m, n).T).reshape(-1)
                d_out = np.ascontiguousarray(summed_grad, dtype=np.float32)
                pooling.pool_backward(
                    _ones(n * m),
                    inv,
                    d_out.reshape(n * m, group.dim),
                    "sum",
                    out=grad_u,
                )
                mask, bad = pooling.nonfinite_rows(grad_u)
                self.nonfinite_gradients += bad
                if bad and rec is not None:
                    self._nonfinite(rec, group, mask)
                totals += self._apply(group, grad_u)
                continue
            touched = False
            for part in group.parts:
                inv = group.inverse[part.start : part.stop]
                spec = part.spec
                if spec.pooling == "raw":
                    g = raw_grads.get(part.feature_index)
                    if g is None:
                        continue
                    pooling.pool_raw_backward(part.lengths, inv, g, out=grad_u)
                else:
                    if summed_grad is None:
                        continue
                    pooling.pool_backward(
                        part.lengths,
                        inv,
                        summed_grad,
                        spec.pooling,  # type: ignore[arg-type]
                        col=part.column,
                        dim=group.dim,
                        out=grad_u,
                    )
                touched = True
            if not touched:
                continue
            mask, bad = pooling.nonfinite_rows(grad_u)
            self.nonfinite_gradients += bad
            if bad and rec is not None:
                self._nonfinite(rec, group, mask)
            totals += self._apply(group, grad_u)
        return totals

    def close(self) -> None:
        """Nothing to release: the client's transport belongs to whoever built it."""

    def _apply(self, group: _DimGroup, grad_u: np.ndarray) -> np.ndarray:
        totals = np.zeros(3, dtype=np.int64)
        if self.servers.num_shards == 1:
            totals += self.servers.apply_gradients(0, group.uniques, grad_u)
            return totals
        for s in range(self.servers.num_shards):
            sel = np.flatnonzero(group.shard == s)
            if len(sel):
                totals += self.servers.apply_gradients(
                    s, group.uniques[sel], np.ascontiguousarray(grad_u[sel])
                )
        return totals


def _spans_summed(group: _DimGroup, batch_size: int, width: int) -> bool:
    """Whether ``group``'s slots are all summed (sum/mean/sqrt), one ID per sample, with their
    keys in slot order and their columns side by side filling the whole ``summed`` buffer."""
    col = 0
    pos = 0
    for part in group.parts:
        if part.spec.pooling == "raw" or part.column != col or part.start != pos:
            return False
        if part.stop - part.start != batch_size or part.lengths.shape != (batch_size,):
            return False
        col += group.dim
        pos = part.stop
    if col != width or not group.parts:
        return False
    # sum(lengths) == batch_size per slot (checked above via the key count), so all ones
    # iff none is zero.
    return all(int(part.lengths.min()) >= 1 for part in group.parts)


_ONES: dict[int, np.ndarray] = {}


def _ones(n: int) -> np.ndarray:
    """An int64 array of ``n`` ones, not to be written (cached: the batch size rarely changes)."""
    a = _ONES.get(n)
    if a is None:
        a = np.ones(n, dtype=np.int64)
        _ONES.clear()
        _ONES[n] = a
    return a


def hash_stack(values: np.ndarray, rounds: int, size: int) -> np.ndarray:
    """PERSIA's hash stacking: ID x becomes ``rounds`` IDs, ``hash_ints(x, salt=j) % size + j *
    size`` for round j, each sample's IDs in order (x0 round 0, x0 round 1, ..., x1 round 0, ...).

    So a slot of any cardinality uses at most ``rounds * size`` rows, and two IDs share all
    their rows only if they collide in every round.
    """
    values = np.asarray(values, dtype=np.uint64)
    out = np.empty((len(values), rounds), dtype=np.uint64)
    for j in range(rounds):
        out[:, j] = hash_ints(values, salt=j) % np.uint64(size) + np.uint64(j * size)
    return out.reshape(-1)
