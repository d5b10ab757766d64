"""The embedding worker: from a batch's IDs to pooled embeddings, and back to one gradient per key.

Forward, per batch (docs/ARCHITECTURE.md, "The path of one training batch", step 2):

1. per embedding dim, the IDs of every slot of that dim, each keyed with its slot's prefix in the
   top bits (so slots never collide), de-duplicated in one pass (the keys are never written out);
2. route every unique key to its shard (the store's ``shard_of``; the uniques are grouped by
   shard, keeping their order within a shard) and look the rows up, one batched call per shard;
3. pool per sample (sum, mean, sqrt, or raw: a padded sequence plus a mask channel): one kernel
   for a dim's summed slots, or for one-hot slots filling the summed buffer side by side.

Backward: per dim, a segment sum of the per-sample gradients into one gradient per unique key
(undoing the pooling's scaling), non-finite rows counted in the same kernel (the shards skip
them), one batched ``apply_gradients`` per shard.

The worker keeps no state between batches but scratch: what backward needs travels in
:class:`Lookup`. What a batch's feature names imply (slot specs, prefixes, columns, which slots
pool together) is worked out once per set of names and cached; scratch buffers (the
de-duplication table, the gradient buffer) are reused, one set per thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persia import telemetry
from persia.embedding.data import PersiaBatch
from persia.embedding.spec import POOLINGS, EmbeddingSpec, SlotSpec
from persia.errors import BackendError, BatchError
from persia.hashing import hash_ints
from persia.rpc.base import ParameterServerClient
from persia.worker import kernels as _k
from persia.worker import pooling

#: ``SlotSpec`` and ``POOLINGS`` are :mod:`persia.embedding.spec`'s, kept importable from here.
__all__ = ["POOLINGS", "SlotSpec", "Lookup", "EmbeddingWorker", "hash_stack"]

_MODE_CODES = {"sum": _k.SUM, "mean": _k.MEAN, "sqrt": _k.SQRT}
_MAX_PLANS = 64


@dataclass
class _SlotPart:
    spec: SlotSpec
    feature_index: int
    start: int  # range of this slot's keys inside its dim group's concatenated keys
    stop: int
    lengths: np.ndarray  # IDs per sample, as used for pooling (after hash stacking)
    column: int  # first column in the summed buffer (summed slots), else -1


class _DimGroup:
    """One dim's keys of a batch: what its backward needs."""

    __slots__ = ("plan", "lengths", "bounds", "uniques", "inverse", "shard_bounds", "one_hot",
                 "hints")  # fmt: skip

    def __init__(self, plan: _GroupPlan, lengths: list[np.ndarray], bounds: list[int]) -> None:
        self.plan = plan
        self.lengths = lengths  # per part: IDs per sample, as pooled (after hash stacking)
        self.bounds = bounds  # part p's keys are ``bounds[p]:bounds[p + 1]`` of the group's
        self.uniques: np.ndarray = _NO_KEYS  # u64[u]
        self.inverse: np.ndarray = _NO_ROWS  # i32[n]
        # each shard's range of ``uniques`` (they are grouped by shard): int64[shards + 1]
        self.shard_bounds: np.ndarray = _NO_ROWS
        self.one_hot = False  # every part: summed, one ID per sample, side by side = all
        self.hints: list[object] = []  # per shard: its lookup's row hint

    @property
    def dim(self) -> int:
        return self.plan.dim

    @property
    def parts(self) -> list[_SlotPart]:
        """Each slot's part of the group (built on demand: the one-hot path needs none)."""
        gp, b = self.plan, self.bounds
        return [
            _SlotPart(gp.specs[p], gp.features[p], b[p], b[p + 1], self.lengths[p], gp.columns[p])
            for p in range(len(gp.features))
        ]


_NO_KEYS = np.empty(0, dtype=np.uint64)
_NO_ROWS = np.empty(0, dtype=np.int32)


@dataclass
class _Run:
    """Consecutive parts of a dim group pooled by one kernel call (summed) or one raw part."""

    raw: bool
    parts: list[int]  # indices into the group's parts
    cols: np.ndarray  # int64, the summed parts' first columns
    modes: np.ndarray  # int64, their pooling codes


@dataclass
class _GroupPlan:
    dim: int
    features: list[int]  # feature indices of the group's parts, in batch order
    specs: list[SlotSpec]
    columns: list[int]
    masks: pooling.PrefixMasks
    runs: list[_Run]
    spans: bool  # all summed, columns side by side from 0 filling the summed buffer
    stacked: list[bool] = field(default_factory=list)  # per part: hash stacking on


@dataclass
class _Plan:
    """What a batch's feature names imply, worked out once per set of names."""

    groups: list[_GroupPlan]
    layout: list[tuple[str, int, int]]
    width: int  # columns of the summed buffer


class _Scratch(threading.local):
    """Per-thread reusable buffers."""

    def __init__(self) -> None:
        self.dedupers: dict[int, pooling.Deduper] = {}
        self.grads: dict[int, np.ndarray] = {}
        self.acc = np.empty(0, dtype=np.float32)

    def grad(self, dim: int, rows: int) -> np.ndarray:
        """A reused ``f32[rows, dim]`` gradient buffer (contents undefined)."""
        buf = self.grads.get(dim)
        if buf is None or buf.shape[0] < rows:
            buf = np.empty((max(rows, 1024) * 5 // 4, dim), dtype=np.float32)
            self.grads[dim] = buf
        return buf[:rows]

    def vec(self, dim: int) -> np.ndarray:
        if self.acc.shape[0] < dim:
            self.acc = np.empty(dim, dtype=np.float32)
        return self.acc[:dim]


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
        self._scratch = _Scratch()
        self._plans: dict[tuple[str, ...], _Plan] = {}
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

    # ------------------------------------------------------------------ the plan
    def _plan(self, batch: PersiaBatch) -> _Plan:
        names = tuple(f.name for f in batch.id_type_features)
        plan = self._plans.get(names)
        if plan is not None:
            return plan
        groups: dict[int, _GroupPlan] = {}
        layout: list[tuple[str, int, int]] = []
        column = 0
        for fi, name in enumerate(names):
            spec = self.slots.get(name)
            if spec is None:
                raise BatchError(
                    f"ID feature {name!r} is not a configured slot (slots: {sorted(self.slots)})"
                )
            g = groups.get(spec.dim)
            if g is None:
                g = groups[spec.dim] = _GroupPlan(spec.dim, [], [], [], None, [], False)  # type: ignore[arg-type]
            g.features.append(fi)
            g.specs.append(spec)
            if spec.pooling == "raw":
                layout.append(("raw", fi, spec.dim))
                g.columns.append(-1)
            else:
                layout.append(("sum", column, spec.dim))
                g.columns.append(column)
                column += spec.dim
        for g in groups.values():
            g.masks = pooling.prefix_masks([s.prefix for s in g.specs], self.prefix_bits)
            g.stacked = [s.hash_stack_rounds > 0 for s in g.specs]
            for p, spec in enumerate(g.specs):
                raw = spec.pooling == "raw"
                if raw or not g.runs or g.runs[-1].raw:
                    g.runs.append(_Run(raw, [], np.empty(0, np.int64), np.empty(0, np.int64)))
                g.runs[-1].parts.append(p)
            for run in g.runs:
                if not run.raw:
                    run.cols = np.array([g.columns[p] for p in run.parts], dtype=np.int64)
                    run.modes = np.array(
                        [_MODE_CODES[g.specs[p].pooling] for p in run.parts], dtype=np.int64
                    )
            g.spans = column > 0 and g.columns == [i * g.dim for i in range(len(g.specs))]
            g.spans = g.spans and len(g.specs) * g.dim == column
        plan = _Plan(list(groups.values()), layout, column)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[names] = plan
        return plan

    def batch_keys(self, batch: PersiaBatch) -> dict[int, np.ndarray]:
        """The keys a lookup of ``batch`` asks for, per dim, repeats included (what a disk
        tier's prefetch brings into RAM ahead of the lookup; it looks for the keys RAM lacks
        and de-duplicates those few)."""
        plan = self._plan(batch)
        features = batch.id_type_features
        out: dict[int, np.ndarray] = {}
        for gp in plan.groups:
            parts = []
            for p, fi in enumerate(gp.features):
                spec = gp.specs[p]
                values = features[fi].values
                if gp.stacked[p]:
                    values = hash_stack(values, spec.hash_stack_rounds, spec.hash_stack_size)
                parts.append(pooling.add_prefix(values, spec.prefix, self.prefix_bits))
            if parts:
                out[gp.dim] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out

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
        plan = self._plan(batch)
        features = batch.id_type_features
        # Every column of ``summed`` belongs to exactly one summed slot, and pooling overwrites
        # its slot's columns entirely, so no zero fill is needed.
        summed = np.empty((n, plan.width), dtype=np.float32)
        raw: dict[int, np.ndarray] = {}
        groups = []
        dropped = 0
        scratch = self._scratch
        for gp in plan.groups:
            ids, lens, bounds = [], [], [0]
            pos = 0
            one_hot = gp.spans and self.one_hot_fast_path
            for p, fi in enumerate(gp.features):
                feature = features[fi]
                values, lengths = feature.values, feature.lengths
                if gp.stacked[p]:
                    spec = gp.specs[p]
                    values = hash_stack(values, spec.hash_stack_rounds, spec.hash_stack_size)
                    lengths = lengths * spec.hash_stack_rounds
                ids.append(values)
                lens.append(lengths)
                pos += values.shape[0]
                bounds.append(pos)
                # one ID per sample: as many IDs as samples, none without (lengths sum to
                # len(values), so then all are 1)
                if one_hot:
                    one_hot = values.shape[0] == n and (n == 0 or _min_length(feature) >= 1)
            group = _DimGroup(gp, lens, bounds)
            seg = np.array(bounds, dtype=np.int64)
            deduper = scratch.dedupers.get(gp.dim)
            if deduper is None:
                deduper = scratch.dedupers[gp.dim] = pooling.Deduper()
            cat = ids[0] if len(ids) == 1 else np.concatenate(ids)
            uniques, inverse = deduper.prefix_unique_unchecked(cat, seg, gp.masks)
            if rec is not None:
                stats = self._feature_stats(rec)
                if stats is not None:
                    counts: dict[int, int] = {}
                    for p, spec in enumerate(gp.specs):
                        counts[spec.prefix] = counts.get(spec.prefix, 0) + bounds[p + 1] - bounds[p]
                    stats.observe(uniques, counts)
            group.uniques, group.inverse = self._route(group, uniques, inverse)
            rows = self._gather(group, training)
            group.one_hot = one_hot
            groups.append(group)
            if one_hot:
                _k.pool_onehot_forward_kernel(group.inverse, rows, summed)
                continue
            for run in gp.runs:
                if run.raw:
                    p = run.parts[0]
                    out, d = pooling.pool_raw_forward(
                        lens[p],
                        group.inverse[bounds[p] : bounds[p + 1]],
                        rows,
                        gp.specs[p].sample_fixed_size,
                    )
                    dropped += d
                    raw[gp.features[p]] = out
                    continue
                lengths2d, run_bounds = _run_arrays(group, run, n)
                _k.pool_slots_forward_kernel(
                    lengths2d, group.inverse, run_bounds, run.cols, run.modes, rows, summed,
                    scratch.vec(gp.dim),
                )  # fmt: skip
        return Lookup(n, summed, raw, plan.layout, training, groups, dropped)

    def _route(
        self, group: _DimGroup, uniques: np.ndarray, inverse: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Groups ``uniques`` by shard (remapping ``inverse``) and records each shard's range."""
        shards = self.servers.num_shards
        if shards == 1:
            group.shard_bounds = np.array([0, uniques.shape[0]], dtype=np.int64)
            return uniques, inverse
        where = self.servers.shard_of(uniques)
        ordered = np.empty_like(uniques)
        bounds = np.empty(shards + 1, dtype=np.int64)
        _k.group_by_shard_kernel(uniques, where, shards, inverse, ordered, bounds)
        group.shard_bounds = bounds
        return ordered, inverse

    def _lookup(self, group: _DimGroup, shard: int, keys: np.ndarray, training: bool) -> np.ndarray:
        if training:
            rows, hint = self.servers.lookup_hinted(shard, keys, group.dim, training)
        else:
            rows, hint = self.servers.lookup(shard, keys, group.dim, training), None
        group.hints.append(hint)
        return _rows(rows, keys.shape[0], group.dim, shard)

    def _gather(self, group: _DimGroup, training: bool) -> np.ndarray:
        if not telemetry.current().on:
            return self._gather_rows(group, training)
        t0 = time.perf_counter()
        rows = self._gather_rows(group, training)
        self._rpc_s += time.perf_counter() - t0
        return rows

    def _gather_rows(self, group: _DimGroup, training: bool) -> np.ndarray:
        uniques, dim, bounds = group.uniques, group.dim, group.shard_bounds
        if self.servers.num_shards == 1:
            return self._lookup(group, 0, uniques, training)
        rows = np.empty((len(uniques), dim), dtype=np.float32)
        for s in range(self.servers.num_shards):
            a, b = int(bounds[s]), int(bounds[s + 1])
            if b > a:
                rows[a:b] = self._lookup(group, s, uniques[a:b], training)
            else:
                group.hints.append(None)
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

    def _nonfinite(self, rec: Any, group: _DimGroup, grad_u: np.ndarray) -> None:
        """Reports the features whose gradient had a non-finite row (PERSIA's ``nan_count``)."""
        if self.prefix_bits <= 0:
            return
        u = len(group.uniques)
        bad = ~np.isfinite(grad_u[:u]).all(axis=1)
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
        n = lookup.batch_size
        if summed_grad is not None:
            summed_grad = _f32_matrix(summed_grad, lookup.summed.shape, "summed_grad")
        scratch = self._scratch
        for group in lookup.groups:
            u = len(group.uniques)
            grad_u = scratch.grad(group.dim, u)
            if group.one_hot:
                if summed_grad is None:
                    continue
                bad = _k.pool_onehot_backward_kernel(group.inverse, summed_grad, grad_u, u)
                self.nonfinite_gradients += int(bad)
                if bad and rec is not None:
                    self._nonfinite(rec, group, grad_u)
                totals += self._apply(group, grad_u)
                continue
            grad_u.fill(0.0)
            touched = False
            gp = group.plan
            for run in gp.runs:
                if run.raw:
                    p = run.parts[0]
                    g = raw_grads.get(gp.features[p])
                    if g is None:
                        continue
                    inv = group.inverse[group.bounds[p] : group.bounds[p + 1]]
                    pooling.pool_raw_backward(group.lengths[p], inv, g, out=grad_u)
                elif summed_grad is not None:
                    lengths2d, run_bounds = _run_arrays(group, run, n)
                    _k.pool_slots_backward_kernel(
                        lengths2d, group.inverse, run_bounds, run.cols, run.modes, summed_grad,
                        grad_u, scratch.vec(group.dim),
                    )  # fmt: skip
                else:
                    continue
                touched = True
            if not touched:
                continue
            bad = int(_k.count_nonfinite_kernel(grad_u, u))
            self.nonfinite_gradients += bad
            if bad and rec is not None:
                self._nonfinite(rec, group, grad_u)
            totals += self._apply(group, grad_u)
        return totals

    def close(self) -> None:
        """Nothing to release: the client's transport belongs to whoever built it."""

    def _apply(self, group: _DimGroup, grad_u: np.ndarray) -> np.ndarray:
        servers, hints = self.servers, group.hints
        if servers.num_shards == 1:
            counts = servers.apply_gradients_hinted(0, group.uniques, grad_u, hints[0])
            return np.asarray(counts, np.int64)
        totals = np.zeros(3, dtype=np.int64)
        bounds = group.shard_bounds
        for s in range(servers.num_shards):
            a, b = int(bounds[s]), int(bounds[s + 1])
            if b > a:
                totals += servers.apply_gradients_hinted(
                    s, group.uniques[a:b], grad_u[a:b], hints[s]
                )
        return totals


def _min_length(feature: object) -> int:
    """The fewest IDs of a sample: an IDTypeFeature knows it; any other feature-like object (a
    backend's own columnar batch) is asked for its lengths."""
    known = getattr(feature, "min_length", None)
    if known is not None:
        return int(known)
    lengths = feature.lengths  # type: ignore[attr-defined]
    return int(lengths.min()) if lengths.size else 0


def _run_arrays(group: _DimGroup, run: _Run, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(parts, batch)`` lengths and the key bounds of a summed run, for its kernels."""
    lengths2d = np.empty((len(run.parts), n), dtype=np.int64)
    for i, p in enumerate(run.parts):
        lengths2d[i] = group.lengths[p]
    bounds = np.array([group.bounds[p] for p in run.parts] + [group.bounds[run.parts[-1] + 1]])
    return lengths2d, bounds


def _rows(rows: object, count: int, dim: int, shard: int) -> np.ndarray:
    """A shard's lookup reply as a C-contiguous ``f32[count, dim]``, or BackendError."""
    if not isinstance(rows, np.ndarray) or rows.shape != (count, dim):
        shape = getattr(rows, "shape", type(rows).__name__)
        raise BackendError(
            f"lookup of {count} keys of dim {dim} returned {shape}", "parameter-server", shard
        )
    if rows.dtype != np.float32 or not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
    return rows


def _f32_matrix(a: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``a`` as a C-contiguous float32 array of ``shape``, or BatchError."""
    if not isinstance(a, np.ndarray) or a.shape != shape:
        got = getattr(a, "shape", type(a).__name__)
        raise BatchError(f"{name} must have shape {shape}, got {got}")
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=np.float32)
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
