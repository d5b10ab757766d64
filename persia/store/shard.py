"""One parameter-server shard: an ``EmbeddingTable`` per dim behind one lock.

Capacity rule: ``capacity`` (rows) is split evenly between the shard's dims; the first
``capacity % k`` dims (ascending) get one row more. The dims are those given as ``dims=`` up front
(then a lookup of any other dim is an error), or else the dims seen so far: when a lookup brings a
new dim, the split is recomputed and tables above their new share evict their least recently used
rows. Declare the dims to avoid that reshuffle.

Every key keeps the dim it was created with: a lookup (or gradient) for a key held under another
dim raises ``StoreError``. This is checked only for the keys missing from the asked dim's table, so
hits cost nothing extra.

Checkpoints are store-wide (:mod:`persia.checkpoint`), built on :meth:`Shard.export_rows` /
:meth:`Shard.import_rows` (rows oldest first, so an import restores the LRU order).

Thread safety: every public method takes the shard's lock for its whole duration; the kernels
release the GIL, so different shards run in parallel on different threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from persia import telemetry
from persia.errors import StoreError
from persia.store.config import Admission, Init, Uniform
from persia.store.disk import DiskTier, DiskTierConfig
from persia.store.kernels import table as K
from persia.store.table import (
    EmbeddingTable,
    Optimizer,
    check_grads,
    check_keys,
    check_positive_int,
    check_row_dtype,
)

__all__ = ["RowHint", "Shard", "shard_of"]


class RowHint:
    """Where a training lookup found (or made) its keys: a table, its eviction count and layout
    then, the first stamp the lookup gave, and the row of every key.
    :meth:`Shard.apply_gradients_hinted` uses the rows while the table is the same and has
    moved no row since (rows move by eviction and by removal); after that, it keeps the rows
    the table knows unmoved (:meth:`EmbeddingTable.rows_kept_below`) and those that still hold
    their keys, and finds the others again. Opaque to callers; valid only in the process of
    the shard that gave it."""

    __slots__ = ("table", "evictions", "layout", "clock", "rows")

    def __init__(self, table: EmbeddingTable, rows: np.ndarray, clock: int = -1) -> None:
        self.table = table
        self.evictions = table.evictions
        self.layout = table.layout
        self.clock = clock
        self.rows = rows


def shard_of(keys: Any, num_shards: int) -> np.ndarray:
    """The shard (``i32[n]`` in ``[0, num_shards)``) of each key.

    ``h = splitmix64_finaliser(key ^ 0xD1B54A32D192ED03)``; ``shard = ((h >> 32) * num_shards) >>
    32``. The tables probe with another mixer (MurmurHash3's finaliser) and another salt, so the
    keys of one shard still spread over all of its index slots. Fixed forever: checkpoints re-shard
    with it.
    """
    keys = check_keys(keys)
    n = check_positive_int(num_shards, "num_shards")
    if n >= 2**31:
        raise StoreError(f"num_shards must be < 2**31, got {num_shards}")
    out = np.empty(keys.shape[0], dtype=np.int32)
    K.shard_of_kernel(keys, n, out)
    return out


def check_row_dtypes(row_dtype: Any) -> str | dict[int, str]:
    """A store's ``row_dtype``: one row dtype for every dim, or ``{dim: row_dtype}``;
    ``StoreError`` naming the field otherwise."""
    if isinstance(row_dtype, Mapping):
        return {
            check_positive_int(d, "row_dtype dim"): check_row_dtype(v, f"row_dtype[{d}]")
            for d, v in row_dtype.items()
        }
    return check_row_dtype(row_dtype)


def row_dtype_for(row_dtype: str | Mapping[int, str], dim: int) -> str:
    """The row dtype of dim ``dim`` (float32 for a dim a mapping does not name)."""
    if isinstance(row_dtype, Mapping):
        return row_dtype.get(dim, "float32")
    return row_dtype


def split_capacity(capacity: int, dims: Sequence[int]) -> dict[int, int]:
    """Rows per dim: ``capacity // k`` each, one more for the first ``capacity % k`` dims
    (ascending); at least one row each."""
    dims = sorted(dims)
    k = len(dims)
    base, extra = divmod(capacity, k)
    return {d: max(1, base + (1 if i < extra else 0)) for i, d in enumerate(dims)}


class Shard:
    """One parameter-server shard (thread-safe); implements ``persia.rpc.protocol.ShardProtocol``.

    Args:
        capacity: rows in all dims together (> 0); split between dims as the module says.
        optimizer: the optimizer of every row (see docs/CONTRACTS.md).
        init: initialiser of new rows.
        admission: which missed keys a training lookup creates.
        seed: seed of init and admission.
        weight_bound: values are clipped to [-bound, bound] after updates (<= 0 or inf: never).
        dims: the dims this shard holds, when known up front (recommended).
        disk_tier: keep rows evicted from RAM on disk (``persia.store.disk``): the shard's
            directory (one subdirectory ``d{dim}`` per table, validated when it exists) and
            the rows on disk, split between the dims as ``capacity`` is (each table of a shard
            without declared dims gets all of it).
        row_dtype: how rows are stored (``float32``, ``float16`` or ``bfloat16``): one for every
            dim, or ``{dim: row_dtype}`` (dims not named: float32).
        rounding: how updates round half-precision rows (``nearest`` or ``stochastic``).
    """

    def __init__(
        self,
        capacity: int,
        optimizer: Optimizer,
        init: Init | None = None,
        admission: Admission | None = None,
        seed: int = 0,
        weight_bound: float = 10.0,
        dims: Sequence[int] | None = None,
        disk_tier: DiskTierConfig | None = None,
        row_dtype: str | Mapping[int, str] = "float32",
        rounding: str = "nearest",
    ) -> None:
        self.capacity = check_positive_int(capacity, "capacity")
        if disk_tier is not None and not isinstance(disk_tier, DiskTierConfig):
            raise StoreError(f"disk_tier must be a DiskTierConfig, got {type(disk_tier).__name__}")
        self.disk_tier = disk_tier
        self._wipe_tier = False
        self.row_dtype = check_row_dtypes(row_dtype)
        self.rounding = rounding
        self.optimizer = optimizer
        self.init: Init = init if init is not None else Uniform(-0.01, 0.01)
        self.admission = admission if admission is not None else Admission()
        self.seed = seed
        self.weight_bound = weight_bound
        #: this shard's index among its store's (the ``replica`` label of its metrics)
        self.replica = 0
        self._lock = threading.Lock()
        self._tables: dict[int, EmbeddingTable] = {}
        self._absent_no_table = 0
        self._misses_no_table = 0
        # change record for incremental updates (persia.store.delta): None = not tracking
        self._changed: dict[int, list[np.ndarray]] | None = None
        self._changed_count = 0
        # per dim, the keys of every row (row order) just before the first operation since the
        # last take_changes that may evict: what take_changes compares to find the evicted keys
        self._evict_snap: dict[int, np.ndarray] = {}
        self.declared_dims: tuple[int, ...] | None = None
        if dims is not None:
            checked = sorted({check_positive_int(d, "dims[]") for d in dims})
            if not checked:
                raise StoreError("dims must name at least one dim, got []")
            if len(checked) > self.capacity:
                raise StoreError(
                    f"capacity must be >= the number of dims ({len(checked)}), got {capacity}"
                )
            self.declared_dims = tuple(checked)
            for d, cap in split_capacity(self.capacity, checked).items():
                self._tables[d] = self._new_table(d, cap)
        else:
            self._new_table(1, 1, tier=False)  # validate the configuration now

    def _new_table(self, dim: int, capacity: int, tier: bool = True) -> EmbeddingTable:
        table = EmbeddingTable(
            dim, capacity, self.optimizer, self.init, self.admission, self.seed, self.weight_bound,
            row_dtype_for(self.row_dtype, dim), self.rounding,
        )  # fmt: skip
        cfg = self.disk_tier
        if cfg is not None and tier:
            disk = cfg.capacity
            if self.declared_dims is not None:
                disk = split_capacity(cfg.capacity, self.declared_dims)[dim]
            table.attach_tier(
                DiskTier.open(
                    cfg.directory / f"d{dim}", disk, dim, table.values.dtype, table.state_width,
                    table.state.dtype, wipe=self._wipe_tier,
                )
            )  # fmt: skip
            if self._changed is not None and table.tier is not None:
                table.tier.take_dropped()  # record the rows dropped past the disk capacity
        return table

    def close(self, remove_tier: bool = False) -> None:
        """Close the tables' disk tiers (``remove_tier``: delete their files); the shard is not
        used after this."""
        with self._lock:
            for t in self._tables.values():
                if t.tier is not None:
                    t.tier.close(remove=remove_tier)

    # ------------------------------------------------------------------------------- helpers
    @property
    def dims(self) -> tuple[int, ...]:
        """The dims that have a table, ascending."""
        return tuple(sorted(self._tables))

    def _table_for(self, dim: int, create: bool) -> EmbeddingTable | None:
        table = self._tables.get(dim)
        if table is not None:
            return table
        if self.declared_dims is not None:
            raise StoreError(f"dim must be one of {list(self.declared_dims)}, got {dim}")
        if not create:
            return None
        dims = [*self._tables, dim]
        if len(dims) > self.capacity:
            raise StoreError(
                f"a shard of capacity {self.capacity} cannot hold {len(dims)} dims; got dim {dim}"
            )
        shares = split_capacity(self.capacity, dims)
        for d, t in self._tables.items():
            self._before_evicting(d, t, t.rows > shares[d])
            t.set_capacity(shares[d])
        table = self._new_table(dim, shares[dim])
        self._tables[dim] = table
        return table

    def _check_other_dims(self, keys: np.ndarray, rows: np.ndarray, dim: int) -> None:
        """Raise if a key missing from dim ``dim`` is held under another dim."""
        if len(self._tables) <= (1 if dim in self._tables else 0):
            return
        missing = keys[rows < 0]
        if missing.size == 0:
            return
        for d, t in self._tables.items():
            if d == dim:
                continue
            found = t.probe(missing) >= 0
            if found.any():
                key = int(missing[np.argmax(found)])
                raise StoreError(
                    f"key {key} has dim {d}, but dim {dim} was asked for "
                    f"({int(found.sum())} such keys in this call)"
                )

    # ----------------------------------------------------------------------------- operations
    def lookup(self, keys: Any, dim: int, training: bool) -> np.ndarray:
        """Rows of ``keys`` in dim ``dim`` as ``f32[n, dim]`` (absent / not admitted: zeros).

        A training lookup refreshes the recency of found keys and creates admitted missing ones;
        an evaluation lookup changes nothing.
        """
        rec = telemetry.current()
        if not rec.on:
            return self._lookup(keys, dim, training)
        t0 = time.perf_counter()
        misses = self._misses()
        out = self._lookup(keys, dim, training)
        rec.shard_lookup(self.replica, time.perf_counter() - t0, len(out), self._misses() - misses)
        return out

    def _misses(self) -> int:
        """Keys missed so far (read without the lock: for the metrics' miss ratio)."""
        return self._misses_no_table + sum(
            int(t.meta[K.M_MISSES]) for t in list(self._tables.values())
        )

    def _lookup(self, keys: Any, dim: int, training: bool) -> np.ndarray:
        keys = check_keys(keys)
        dim = check_positive_int(dim, "dim")
        n = keys.shape[0]
        with self._lock:
            table = self._table_for(dim, create=training)
            if table is None:
                self._check_other_dims(keys, np.full(n, -1, dtype=np.int32), dim)
                self._misses_no_table += n
                return np.zeros((n, dim), dtype=np.float32)
            if not training:
                out, rows, missing = table.eval_lookup(keys)
                if missing:
                    self._check_other_dims(keys, rows, dim)
                return out
            if len(self._tables) == 1 and self._changed is None:
                # no other dim to check the misses against, no changes to note: one kernel
                # probes and refreshes
                return table.train_lookup_probed(keys)
            rows = table.probe(keys)
            self._check_other_dims(keys, rows, dim)
            if self._changed is not None:
                missing = keys[rows < 0]
                self._note_changed(dim, missing)  # rows this lookup may create
                self._before_evicting(dim, table, table.rows + missing.size > table.capacity)
            return table.train_lookup(keys, rows)

    def lookup_hinted(self, keys: Any, dim: int) -> tuple[np.ndarray, RowHint | None]:
        """A training :meth:`lookup`, plus a :class:`RowHint` for
        :meth:`apply_gradients_hinted` when this lookup could give one (one table, no change
        tracking, room for every key, distinct keys), else None."""
        keys = check_keys(keys)
        dim = check_positive_int(dim, "dim")
        with self._lock:
            table = self._tables.get(dim)
            if table is not None and len(self._tables) == 1 and self._changed is None:
                clock, layout = table.clock, table.layout
                out, rows = table.train_lookup_rows(keys)
                if rows is None:
                    return out, None
                # the lookup's stamps start at ``clock`` unless it renumbered them
                return out, RowHint(table, rows, clock if table.layout == layout else -1)
        return self.lookup(keys, dim, True), None

    def apply_gradients_hinted(self, keys: Any, grads: Any, hint: RowHint | None) -> np.ndarray:
        """:meth:`apply_gradients` of the keys a :meth:`lookup_hinted` gave ``hint`` for (in
        the same order): the same result, without finding the rows again while the hint holds
        (same table, no eviction since); after evictions, only the rows that no longer hold
        their keys are found again (evictions move rows)."""
        if not isinstance(hint, RowHint):
            return self.apply_gradients(keys, grads)
        keys = check_keys(keys)
        n = keys.shape[0]
        if not isinstance(grads, np.ndarray) or grads.ndim != 2 or hint.rows.shape[0] != n:
            return self.apply_gradients(keys, grads)
        dim = grads.shape[1]
        grads = check_grads(grads, n, dim)
        with self._lock:
            table = self._tables.get(dim)
            if table is not hint.table or len(self._tables) != 1:
                return self._apply_locked(keys, grads, dim)
            rows = hint.rows
            if table.evictions != hint.evictions or table.layout != hint.layout:
                low = table.rows_kept_below(hint.evictions, hint.layout, hint.clock)
                rows = table.recheck(keys, rows, low)
            if self._changed is not None:  # as _apply_locked notes them
                self._note_changed(dim, keys[rows >= 0] if table.tier is None else keys)
            return table.apply_rows(rows, grads, keys)

    def apply_gradients(self, keys: Any, grads: Any) -> np.ndarray:
        """Apply ``grads[i]`` (``f32[n, dim]``) to the row of ``keys[i]`` in dim ``dim``.

        Absent keys and non-finite gradient rows are skipped and counted; nothing is created and
        recency is not refreshed.

        Returns:
            int64 ``[applied, skipped_absent, skipped_nonfinite]``.
        """
        rec = telemetry.current()
        if not rec.on:
            return self._apply_gradients(keys, grads)
        t0 = time.perf_counter()
        out = self._apply_gradients(keys, grads)
        rec.shard_apply(self.replica, time.perf_counter() - t0)
        return out

    def _apply_gradients(self, keys: Any, grads: Any) -> np.ndarray:
        keys = check_keys(keys)
        n = keys.shape[0]
        if not isinstance(grads, np.ndarray) or grads.ndim != 2:
            shape = getattr(grads, "shape", type(grads).__name__)
            raise StoreError(f"grads must be a 2-D float32 array (keys x dim), got {shape}")
        dim = grads.shape[1]
        if dim <= 0:
            raise StoreError(f"grads must have dim > 0 columns, got shape {grads.shape}")
        grads = check_grads(grads, n, dim)
        with self._lock:
            return self._apply_locked(keys, grads, dim)

    def _apply_locked(self, keys: np.ndarray, grads: np.ndarray, dim: int) -> np.ndarray:
        n = keys.shape[0]
        table = self._table_for(dim, create=False)
        rows = table.probe(keys) if table is not None else np.full(n, -1, dtype=np.int32)
        self._check_other_dims(keys, rows, dim)
        if table is None:
            self._absent_no_table += n
            return np.array([0, n, 0], dtype=np.int64)
        if self._changed is not None:
            self._note_changed(dim, keys[rows >= 0] if table.tier is None else keys)
        return table.apply_rows(rows, grads, keys)

    def prefetch(self, keys: Any, dim: int) -> int:
        """Bring the rows of ``keys`` (dim ``dim``) that the disk tier holds into RAM ahead of
        their training lookup (a hint: nothing without a tier). Returns how many came back."""
        keys = check_keys(keys)
        with self._lock:
            table = self._tables.get(dim)
            if table is None or table.tier is None:
                return 0
            if self._changed is not None:
                self._before_evicting(dim, table, True)
            return table.prefetch(keys)

    def disk_reads_wait(self) -> bool:
        """Whether a table's disk tier holds rows whose reads wait for the device (see
        :attr:`persia.store.disk.DiskTier.reads_wait`): a prefetch ahead of the lookups pays."""
        tiers = (t.tier for t in list(self._tables.values()) if t.tier is not None)
        return any(tier.rows and tier.reads_wait for tier in tiers)

    def reserve(self, rows: int, dim: int) -> None:
        """Allocate room for ``rows`` rows of dim ``dim`` now (at most its capacity share)."""
        dim = check_positive_int(dim, "dim")
        with self._lock:
            table = self._table_for(dim, create=True)
            if table is None:  # pragma: no cover - create=True always gives a table
                raise StoreError(f"dim {dim} has no table")
            table.reserve(rows)

    def export_rows(self, dim: int | None = None) -> dict[int, dict[str, np.ndarray]]:
        """Copies of the rows of one dim (or all), oldest first, keyed by dim:
        ``{dim: {"keys": u64[n], "values": [n, dim], "state": f32[n, W]}}``, the values in the
        table's row dtype (f32, f16, or u16 bfloat16 bit patterns)."""
        if dim is not None:
            dim = check_positive_int(dim, "dim")
        with self._lock:  # only the sequential copies; the LRU ordering runs after
            snaps = {
                d: t.snapshot() for d, t in sorted(self._tables.items()) if dim is None or d == dim
            }
        return {d: EmbeddingTable.rows_from_snapshot(snap) for d, snap in snaps.items()}

    def import_rows(self, dim: int, keys: Any, values: Any, state: Any | None = None) -> None:
        """Insert or overwrite rows of dim ``dim`` in order (each becomes the newest, so importing
        an export restores its LRU order); ``state`` None = the optimizer's initial state. A key
        held under another dim is an error; past capacity the oldest rows are evicted."""
        dim = check_positive_int(dim, "dim")
        keys = check_keys(keys)
        with self._lock:
            table = self._table_for(dim, create=True)
            if table is None:  # pragma: no cover - create=True always gives a table
                raise StoreError(f"dim {dim} has no table")
            self._check_other_dims(keys, table.probe(keys), dim)
            self._before_evicting(dim, table, table.rows + keys.size > table.capacity)
            table.import_rows(keys, values, state)

    def remove_rows(self, dim: int, keys: Any) -> int:
        """Deletes the rows of ``keys`` in dim ``dim`` (absent keys are ignored): what a reader
        of incremental deltas does with the rows training evicted. Returns how many were held."""
        dim = check_positive_int(dim, "dim")
        keys = check_keys(keys)
        with self._lock:
            table = self._tables.get(dim)
            if table is None:
                if self.declared_dims is not None and dim not in self.declared_dims:
                    raise StoreError(f"dim must be one of {list(self.declared_dims)}, got {dim}")
                return 0
            held = table.remove_keys(keys)
            if table.tier is not None:
                held += table.tier.remove_keys(keys)
            return held

    def clear(self) -> None:
        """Drops every row (the configuration, the declared dims and change tracking stay; the
        change record restarts empty)."""
        with self._lock:
            for t in self._tables.values():
                if t.tier is not None:
                    t.tier.close()
            self._wipe_tier = True  # the new tables' tiers start empty
            if self.declared_dims is not None:
                shares = split_capacity(self.capacity, self.declared_dims)
                self._tables = {d: self._new_table(d, cap) for d, cap in shares.items()}
            else:
                self._tables = {}
            if self._changed is not None:
                self._changed = {}
                self._changed_count = 0
            self._evict_snap = {}

    # ------------------------------------------------------------------ change tracking
    def _note_changed(self, dim: int, keys: np.ndarray) -> None:
        if keys.size:
            self._changed.setdefault(dim, []).append(keys)  # type: ignore[union-attr]
            self._changed_count += int(keys.size)

    def _before_evicting(self, dim: int, table: EmbeddingTable, may_evict: bool) -> None:
        """Called (under the lock) before an operation on ``table`` that ``may_evict``: while
        tracking, the first one since the last :meth:`take_changes` takes a copy of the table's
        row keys (what :meth:`take_changes` compares)."""
        if may_evict and self._changed is not None and dim not in self._evict_snap:
            self._evict_snap[dim] = table.row_keys[: table.rows].copy()

    def track_changes(self, enabled: bool = True) -> None:
        """Start (or stop) recording the keys that training lookups create and gradients
        change, and the rows evicted, for :meth:`take_changes` (incremental updates). Off by
        default: costs one copy of the keys per call while on and, once per
        :meth:`take_changes` in which a table is full, one copy of its row keys (8 bytes a
        row)."""
        with self._lock:
            if enabled and self._changed is None:
                self._changed = {}
                self._changed_count = 0
                self._evict_snap = {}
                for t in self._tables.values():
                    if t.tier is not None:
                        t.tier.take_dropped()  # record the rows dropped past the disk capacity
            elif not enabled:
                self._changed = None
                self._changed_count = 0
                self._evict_snap = {}
                for t in self._tables.values():
                    if t.tier is not None:
                        t.tier.dropped_keys = None

    @property
    def tracking_changes(self) -> bool:
        """Whether :meth:`track_changes` is on."""
        return self._changed is not None

    @property
    def changed_count(self) -> int:
        """Keys recorded since the last :meth:`take_changes` (with repeats; a cheap bound)."""
        return self._changed_count

    def take_changes(self) -> dict[int, dict[str, np.ndarray]]:
        """The current rows of every key changed since the last call, the keys evicted since
        then, and reset the record.

        Returns ``{dim: {"keys": u64[n], "values": [n, dim] (row dtype), "state": f32[n, W],
        "removed": u64[m]}}``, keys unique and ascending: ``keys`` are the changed keys still
        held (those evicted, or not admitted, are left out); ``removed`` are the keys that were
        held at the last call, or noted since, and are held no more (LRU eviction, a capacity
        split; also missed keys that were not admitted, which no reader holds); the two never
        share a key. A reader that started from any state between the two calls (a checkpoint
        dumped in between) reaches this shard's state by deleting ``removed`` and writing
        ``keys``. Taken under the shard's lock, so each row is whole.
        Empty when not tracking.
        """
        with self._lock:
            changed = self._changed
            snaps = self._evict_snap
            if not changed and not snaps:
                return {}
            if changed is not None:
                self._changed = {}
                self._changed_count = 0
            self._evict_snap = {}
            out: dict[int, dict[str, np.ndarray]] = {}
            for dim in sorted(set(changed or {}) | set(snaps)):
                table = self._tables.get(dim)
                if table is None:
                    continue
                parts = (changed or {}).get(dim)
                keys = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
                rows = table.probe(keys)
                held = rows >= 0
                values, state = table.values[rows[held]], table.state[rows[held]]
                if table.tier is not None and table.tier.rows and not held.all():
                    recs = np.full(keys.shape[0], -1, dtype=np.int32)
                    recs[~held] = table.tier.find(keys[~held])
                    if (recs >= 0).any():  # rows on disk are held too
                        disk_values, disk_state = table.tier.read(recs)
                        values = np.where((rows >= 0)[:, None], 0, disk_values)
                        state = np.where((rows >= 0)[:, None], 0, disk_state)
                        values[held] = table.values[rows[held]]
                        state[held] = table.state[rows[held]]
                        held = held | (recs >= 0)
                        values, state = values[held], state[held]
                rows = rows[held]
                # keys noted since the last take and not held now: created and evicted since
                # (held by a checkpoint dumped in between), or never admitted (absent anywhere)
                gone = [keys[~held]]
                old = snaps.get(dim)
                if old is not None and old.size:
                    # a key held at the snapshot is gone iff its row now holds another key (or
                    # is past the live rows) and it is not held elsewhere (rows move on eviction)
                    n = min(table.rows, old.size)
                    moved = np.ones(old.size, dtype=bool)
                    moved[:n] = table.row_keys[:n] != old[:n]
                    candidates = old[moved]
                    if candidates.size:
                        gone.append(candidates[~table.holds(candidates)])
                if table.tier is not None:  # rows dropped past the disk capacity
                    dropped = table.tier.take_dropped()
                    gone.append(dropped[~table.holds(dropped)])
                removed = np.unique(np.concatenate(gone))
                if not rows.size and not removed.size:
                    continue
                out[dim] = {
                    "keys": keys[held],
                    "values": values,
                    "state": state,
                    "removed": removed,
                }
            return out

    def stats(self) -> dict[str, Any]:
        """Totals over dims (rows, capacity, evictions, misses, admissions, rejections, applied,
        skipped_absent, skipped_nonfinite, bytes_used) plus ``"dims": {dim: table stats}``."""
        with self._lock:
            per = {d: t.stats() for d, t in sorted(self._tables.items())}
            total: dict[str, Any] = {
                k: sum(s[k] for s in per.values())
                for k in (
                    "rows", "evictions", "misses", "admissions", "rejections", "applied",
                    "skipped_absent", "skipped_nonfinite", "bytes_used",
                )
            }  # fmt: skip
            total["capacity"] = self.capacity
            for k in (
                "disk_rows",
                "disk_dropped",
                "disk_writes",
                "disk_reads",
                "disk_bytes",
                "disk_ram_bytes",
            ):
                if any(k in s for s in per.values()):
                    total[k] = sum(s.get(k, 0) for s in per.values())
            total["misses"] += self._misses_no_table
            total["skipped_absent"] += self._absent_no_table
            total["dims"] = per
            return total
