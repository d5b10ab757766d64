"""The shard protocol: what the embedding worker, checkpoints, deltas and stats need of one
parameter-server shard, declared once.

Four classes implement it: :class:`persia.store.Shard` (the shard itself, in this process),
the Ray ``ParameterServer`` actor class (a shard behind an actor), ``RemoteShard`` (the NN
worker's proxy of one actor, in ``RayStore.shards``) and ``RecoverableShard`` (that proxy with
restore-and-retry). ``tests/rpc/test_shard_protocol.py`` checks with :mod:`inspect` that each
has every member with a compatible signature.

Who calls what:

* the embedding worker, through :class:`persia.rpc.base.ParameterServerClient`:
  :meth:`~ShardProtocol.lookup`, :meth:`~ShardProtocol.apply_gradients`;
* job checkpoints (:mod:`persia.checkpoint`), store dumps and exports:
  :meth:`~ShardProtocol.export_rows`; checkpoint and delta restores:
  :meth:`~ShardProtocol.import_rows`;
* incremental updates (:class:`persia.store.delta.DeltaWriter`):
  :meth:`~ShardProtocol.track_changes`, :attr:`~ShardProtocol.tracking_changes`,
  :attr:`~ShardProtocol.changed_count`, :meth:`~ShardProtocol.take_changes`;
* store statistics: :meth:`~ShardProtocol.stats`.

A Ray actor has no properties: the actor class serves each of :data:`PROPERTIES` as a method
without arguments, and its proxy turns it back into a property.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["PROPERTIES", "RowParts", "ShardProtocol"]

#: ``{dim: {"keys": u64[n], "values": f32[n, dim], "state": f32[n, W]}}``: rows of a shard
#: (``take_changes`` adds ``"removed": u64[m]``, the keys evicted).
RowParts = dict[int, dict[str, np.ndarray]]

#: Members that are read-only properties in this process and zero-argument methods on an actor.
PROPERTIES = ("tracking_changes", "changed_count")


@runtime_checkable
class ShardProtocol(Protocol):
    """One parameter-server shard (in this process, or reached by a proxy)."""

    def lookup(self, keys: Any, dim: int, training: bool) -> np.ndarray:
        """Rows of ``keys`` in dim ``dim`` as ``f32[n, dim]``; a training lookup creates the
        admitted missing rows, an evaluation lookup changes nothing (absent: zeros)."""
        ...

    def apply_gradients(self, keys: Any, grads: Any) -> np.ndarray:
        """Applies ``grads[i]`` to the row of ``keys[i]``; returns int64
        ``[applied, skipped_absent, skipped_nonfinite]``."""
        ...

    def stats(self) -> dict[str, Any]:
        """Totals over dims (rows, capacity, evictions, ...) plus ``"dims"``."""
        ...

    def export_rows(self, dim: int | None = None) -> RowParts:
        """Copies of the rows of one dim (or all), oldest first, keyed by dim."""
        ...

    def import_rows(self, dim: int, keys: Any, values: Any, state: Any | None = None) -> None:
        """Inserts or overwrites rows of dim ``dim`` in order (``state`` None: initial)."""
        ...

    def track_changes(self, enabled: bool = True) -> None:
        """Starts (or stops) recording the keys that training changes."""
        ...

    @property
    def tracking_changes(self) -> bool:
        """Whether changes are recorded."""
        ...

    @property
    def changed_count(self) -> int:
        """Keys recorded since the last :meth:`take_changes` (with repeats)."""
        ...

    def take_changes(self) -> RowParts:
        """The current rows of every key changed since the last call, and (``"removed"``) the
        keys evicted since; resets the record."""
        ...
