"""Incremental updates: numbered deltas of the rows changed since the last flush.

With incremental updates on, every shard records the keys that training lookups create and
gradients change (:meth:`persia.store.Shard.track_changes`). A :class:`DeltaWriter` *flushes*
every ``interval_s`` seconds or as soon as ``max_rows`` keys were recorded (whichever comes
first): it takes each shard's changed rows (embedding and optimizer state, whole rows, copied
under the shard's lock) and writes them as the next numbered delta::

    incremental_dir/
      CURRENT          names the newest complete delta
      gen-000001/      delta 1: d{dim}.keys.npy / .values.npy / .state.npy / .removed.npy
                                + manifest.json
      gen-000002/      delta 2 ...
      .tmp-gen-000003-4242/   being written (or left by a crash): not a delta yet

with ``d{dim}.removed.npy`` (u64: the keys evicted since the previous delta) beside the rows.

Each delta is one generation of :mod:`persia.store.checkpoint` (kind ``"persia-delta"``): it is
written under a ``.tmp-`` name, the manifest (sizes and CRC-32 of every file) last, and only then
renamed to ``gen-NNNNNN``; **that rename is the completion marker**. Numbers are consecutive (one
writer per directory, serialised by a file lock).

A :class:`DeltaReader` applies complete deltas strictly in order: the next one must be number
``last + 1``; an incomplete one (still ``.tmp-``) is waited for, never skipped, and a missing
number, a corrupt file or a delta from another base raises
:class:`~persia.errors.CheckpointError`. A delta is read and verified whole before any of its rows
is applied, so none is ever half-applied. Deltas hold whole rows, so applying one that is newer
than a full checkpoint's copy of a row is always right: a restore is "full checkpoint, then every
delta after the ``delta_seq`` it recorded".

**Evictions** travel too: the keys a shard evicted since the previous delta (LRU eviction at
capacity, see :meth:`persia.store.Shard.take_changes`) are the delta's ``removed`` keys, and a
reader deletes them, so that they read as zeros on the inference side as they would in training.
A store emptied or reloaded while deltas are written (``clear_embeddings``, ``load_checkpoint``,
``load_embedding`` of the training job) makes the next delta a **reset** delta (``"reset": true``
in its meta): it holds every row of the store, and a reader drops all its rows before applying
it. Not propagated: the admission sketch.

Format: deltas written before ``removed`` existed (``delta_format`` absent) are read as deltas
without removals; a reader refuses a ``delta_format`` newer than its own
(:data:`DELTA_FORMAT`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persia import telemetry
from persia.errors import CheckpointError, StoreError
from persia.store.checkpoint import list_generations, read_generation, write_generation

__all__ = ["KIND", "DELTA_FORMAT", "DeltaInfo", "DeltaWriter", "DeltaReader", "apply_rows"]

KIND = "persia-delta"
#: Version of the delta meta and arrays (2: ``removed`` keys and reset deltas).
DELTA_FORMAT = 2
_KEEP_ALL = 1 << 40
_POLL_S = 0.05


@dataclass(frozen=True)
class DeltaInfo:
    """One written delta: its number, rows, bytes and the time span whose changes it holds."""

    seq: int
    rows: int
    path: Path
    first_unix_s: float
    flushed_unix_s: float


def apply_rows(store: Any, dim: int, keys: np.ndarray, values: np.ndarray, state: Any) -> None:
    """Insert or overwrite rows of ``store`` (routed to their shards by the fixed hash)."""
    where = store.shard_of(keys)
    for s, shard in enumerate(store.shards):
        sel = np.flatnonzero(where == s)
        if sel.size:
            shard.import_rows(dim, keys[sel], values[sel], state[sel])


def remove_rows(store: Any, dim: int, keys: np.ndarray) -> None:
    """Delete the rows of ``keys`` from ``store`` (routed to their shards by the fixed hash)."""
    where = store.shard_of(keys)
    for s, shard in enumerate(store.shards):
        sel = np.flatnonzero(where == s)
        if sel.size:
            shard.remove_rows(dim, keys[sel])


class DeltaWriter:
    """Writes the changed rows of ``store`` as numbered deltas in ``directory``.

    Args:
        store: a :class:`~persia.store.ShardedStore` (anything with ``shards``).
        directory: where the deltas go (PERSIA's ``incremental_dir``).
        interval_s: flush at least this often (None: only by rows or by hand).
        max_rows: flush once this many changes were recorded (PERSIA's
            ``incremental_buffer_size``; None: only by time or by hand).
        base: an id of the full checkpoint the deltas follow (stored in every delta).

    :meth:`start` turns tracking on and, with a trigger, starts the flushing thread; :meth:`close`
    flushes what is left and stops it. Errors of the thread are raised by the next call.
    """

    def __init__(
        self,
        store: Any,
        directory: str | os.PathLike[str],
        *,
        interval_s: float | None = None,
        max_rows: int | None = None,
        base: str | None = None,
    ) -> None:
        if interval_s is not None and not (isinstance(interval_s, (int, float)) and interval_s > 0):
            raise StoreError(f"interval_s must be > 0 or None, got {interval_s!r}")
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
        ):
            raise StoreError(f"max_rows must be an int >= 1 or None, got {max_rows!r}")
        self.store = store
        self.directory = Path(directory)
        self.interval_s = interval_s
        self.max_rows = max_rows
        self.base = base
        existing = list_generations(self.directory)
        self.last_seq = int(existing[-1].name.split("-")[1]) if existing else 0
        self.written: list[DeltaInfo] = []
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._since = time.time()
        # the store's count of clears and reloads when the last delta was taken: a change means
        # the next delta must be a reset delta
        self._resets_seen = int(getattr(store, "resets", 0))

    def _track(self) -> None:
        for shard in self.store.shards:  # shards replaced by a load need tracking again
            if not shard.tracking_changes:
                shard.track_changes(True)

    def start(self) -> DeltaWriter:
        """Turn change tracking on and start the flushing thread (if a trigger is set)."""
        self._track()
        self._since = time.time()
        # the metrics' persia_delta_lag_seconds: how old the oldest change not in a delta is
        telemetry.watch_delta_lag(self, lambda w: time.time() - w._since)
        if (self.interval_s is not None or self.max_rows is not None) and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="persia-delta", daemon=True)
            self._thread.start()
        return self

    def pending(self) -> int:
        """Changes recorded and not yet flushed (with repeats)."""
        return sum(int(s.changed_count) for s in self.store.shards)

    def _loop(self) -> None:
        try:
            last = time.monotonic()
            while not self._stop.wait(_POLL_S):
                due_time = (
                    self.interval_s is not None and time.monotonic() - last >= self.interval_s
                )
                due_rows = self.max_rows is not None and self.pending() >= self.max_rows
                if due_time or due_rows:
                    self.flush()
                    last = time.monotonic()
        except BaseException as exc:  # raised by the next flush() / close()
            self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def flush(self) -> DeltaInfo | None:
        """Write the rows changed since the last flush as the next delta (None if none)."""
        with self._flush_lock:
            self._track()
            first, now = self._since, time.time()
            resets = int(getattr(self.store, "resets", 0))
            reset = resets != self._resets_seen
            merged: dict[int, list[dict[str, np.ndarray]]] = {}
            for shard in self.store.shards:
                changes = shard.take_changes()  # taken (and the record reset) in both cases
                parts = shard.export_rows() if reset else changes
                for dim, part in parts.items():
                    merged.setdefault(dim, []).append(part)
            self._since = now
            if not merged and not reset:
                return None
            arrays: dict[str, np.ndarray] = {}
            rows = removed = 0
            for dim, parts in sorted(merged.items()):
                for what in ("keys", "values", "state"):
                    arrays[f"d{dim}.{what}"] = np.concatenate([p[what] for p in parts])
                arrays[f"d{dim}.removed"] = np.concatenate(
                    [p.get("removed", np.zeros(0, np.uint64)) for p in parts]
                    if not reset
                    else [np.zeros(0, np.uint64)]
                ).astype(np.uint64, copy=False)
                rows += int(arrays[f"d{dim}.keys"].shape[0])
                removed += int(arrays[f"d{dim}.removed"].shape[0])
            seq = self.last_seq + 1
            meta = {
                "seq": seq,
                "delta_format": DELTA_FORMAT,
                "base": self.base,
                "dims": sorted(merged),
                "rows": rows,
                "removed": removed,
                "reset": reset,
                "first_unix_s": first,
                "flushed_unix_s": now,
                "optimizer": self.store.optimizer.to_dict(),
            }
            path = write_generation(self.directory, arrays, meta, kind=KIND, keep=_KEEP_ALL)
            if path.name != f"gen-{seq:06d}":
                raise CheckpointError(
                    f"{self.directory}: delta written as {path.name}, expected number {seq}; "
                    "is another writer using this directory?"
                )
            self.last_seq = seq
            self._resets_seen = resets
            info = DeltaInfo(seq, rows, path, first, now)
            self.written.append(info)
            rec = telemetry.current()
            if rec.on:
                rec.delta_written(rows)
            return info

    def close(self) -> DeltaInfo | None:
        """Stop the thread, write what is left, and turn tracking off."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._raise_pending()
        info = self.flush()
        for shard in self.store.shards:
            shard.track_changes(False)
        telemetry.unwatch(self)
        return info


class DeltaReader:
    """Applies the complete deltas of ``directory`` in order, starting after ``after_seq``.

    Args:
        directory: the writer's directory.
        after_seq: the last delta already reflected (a full checkpoint's ``delta_seq``).
        base: if given, every delta must carry this base id.
    """

    def __init__(
        self, directory: str | os.PathLike[str], after_seq: int = 0, base: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.last_seq = int(after_seq)
        self.base = base
        self.last_flushed_unix_s: float | None = None

    def pending(self) -> list[Path]:
        """The complete deltas after ``last_seq``, in order; raises on a gap."""
        found = {int(p.name.split("-")[1]): p for p in list_generations(self.directory)}
        later = sorted(n for n in found if n > self.last_seq)
        expected = self.last_seq + 1
        for n in later:
            if n != expected:
                raise CheckpointError(
                    f"{self.directory}: delta {expected} is missing but delta {n} exists; "
                    "refusing to skip a delta"
                )
            expected += 1
        return [found[n] for n in later]

    def apply_pending(self, store: Any, lock: Any = None) -> list[int]:
        """Apply every complete delta after ``last_seq`` to ``store``, in order.

        Args:
            store: the store to update.
            lock: if given (a ``threading.Lock``, say), held while one delta's rows are written
                and only then (each delta is read and verified before): a reader that takes the
                same lock sees whole deltas only (``persia.ctx.InferCtx``'s lookups).

        Returns:
            The numbers applied (possibly none: an incomplete next delta is waited for).

        Raises:
            CheckpointError: a gap, a corrupt delta, another base, a dim the store does not
                declare, a newer delta format, or rows the store refuses; the deltas before it
                stay applied and ``last_seq`` names the last one.
        """
        applied = []
        for path in self.pending():
            arrays, meta = read_generation(path, kind=KIND)
            seq = meta.get("seq")
            if seq != self.last_seq + 1:
                raise CheckpointError(
                    f"{path}: manifest says delta {seq!r}, expected {self.last_seq + 1}"
                )
            if self.base is not None and meta.get("base") != self.base:
                raise CheckpointError(
                    f"{path}: delta of base {meta.get('base')!r}, expected {self.base!r}"
                )
            dims = meta.get("dims")
            if not isinstance(dims, list):
                raise CheckpointError(f"{path}: dims must be a list, got {dims!r}")
            version = meta.get("delta_format", 1)
            if isinstance(version, bool) or not isinstance(version, int) or version > DELTA_FORMAT:
                raise CheckpointError(
                    f"{path}: delta_format {version!r} is not one this persia reads "
                    f"(<= {DELTA_FORMAT}); upgrade persia to follow these deltas"
                )
            reset = meta.get("reset", False)
            if not isinstance(reset, bool):
                raise CheckpointError(f"{path}: reset must be true or false, got {reset!r}")
            removed: dict[int, np.ndarray] = {}
            for dim in dims:
                gone = arrays.get(f"d{dim}.removed")
                if gone is None and version >= 2:
                    raise CheckpointError(f"{path}: dim {dim}: the removed keys are missing")
                if gone is not None:
                    if gone.dtype != np.uint64 or gone.ndim != 1:
                        raise CheckpointError(
                            f"{path}: dim {dim}: removed keys must be u64[m], got "
                            f"{gone.dtype}{list(gone.shape)}"
                        )
                    removed[dim] = gone
                keys = arrays.get(f"d{dim}.keys")
                values = arrays.get(f"d{dim}.values")
                state = arrays.get(f"d{dim}.state")
                if (
                    keys is None
                    or values is None
                    or state is None
                    or keys.dtype != np.uint64
                    or values.shape != (keys.shape[0], dim)
                    or state.ndim != 2
                    or state.shape[0] != keys.shape[0]
                    or state.shape[1] != store.optimizer.state_width(dim)
                ):
                    raise CheckpointError(
                        f"{path}: dim {dim}: keys, values or state missing or of the wrong shape "
                        f"for this store's optimizer {store.optimizer.name}"
                    )
                declared = getattr(store, "dims", None)
                if declared is not None and dim not in declared:
                    raise CheckpointError(
                        f"{path}: delta of dim {dim}, the store only holds {list(declared)}"
                    )
            try:
                with lock if lock is not None else contextlib.nullcontext():
                    if reset:  # the training store was emptied or reloaded: start over
                        for shard in store.shards:
                            shard.clear()
                    for dim, gone in removed.items():
                        if gone.size:
                            remove_rows(store, dim, gone)
                    for dim in dims:
                        apply_rows(
                            store,
                            dim,
                            arrays[f"d{dim}.keys"],
                            arrays[f"d{dim}.values"],
                            arrays[f"d{dim}.state"],
                        )
            except StoreError as exc:
                raise CheckpointError(f"{path}: rows cannot be applied: {exc}") from exc
            self.last_seq = int(seq)
            flushed = meta.get("flushed_unix_s")
            self.last_flushed_unix_s = float(flushed) if isinstance(flushed, (int, float)) else None
            applied.append(int(seq))
            rec = telemetry.current()
            if rec.on:  # PERSIA's inc_update_delay_sec: written -> loaded
                written = self.last_flushed_unix_s
                rec.delta_applied(None if written is None else max(0.0, time.time() - written))
        return applied
