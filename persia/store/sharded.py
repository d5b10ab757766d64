"""N parameter-server shards behind one object: routing, batched calls, row replacement.

Key -> shard by :func:`persia.store.shard.shard_of` (a fixed hash whose bits are independent of
the tables' probe hash), so the same key lands on the same shard in every process, and a
checkpoint made with N shards loads into M. Checkpoints are written and read by
:mod:`persia.checkpoint`; :meth:`ShardedStore.replace_rows` takes their arrays
``s{shard}.d{dim}.keys`` / ``.values`` / ``.state``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from persia.embedding.spec import per_shard_capacity
from persia.errors import CheckpointError, StoreError
from persia.store.config import Admission, Init, Uniform
from persia.store.shard import Shard, shard_of
from persia.store.table import check_grads, check_keys, check_positive_int, row_dtype_of

__all__ = ["ShardedStore"]


class ShardedStore:
    """``num_shards`` :class:`Shard` objects holding ``capacity`` rows in all.

    Args:
        num_shards: how many shards (> 0).
        capacity: rows over all shards and dims; each shard holds ``ceil(capacity / num_shards)``.
        optimizer, init, admission, seed, weight_bound, dims, row_dtype, rounding: as for
            :class:`Shard`.
        adopt_optimizer: :meth:`replace_rows` takes the checkpoint's optimizer (and its rows'
            dtypes) instead of requiring a matching one (an evaluation or serving store that
            trains nothing). A training store converts rows saved in another row dtype (with a
            warning): a float16 checkpoint loads into a float32 job exactly, and the other way
            round rounds to nearest even.
    """

    def __init__(
        self,
        num_shards: int,
        capacity: int,
        optimizer: Any,
        init: Init | None = None,
        admission: Admission | None = None,
        seed: int = 0,
        weight_bound: float = 10.0,
        dims: Sequence[int] | None = None,
        adopt_optimizer: bool = False,
        row_dtype: str | Mapping[int, str] = "float32",
        rounding: str = "nearest",
    ) -> None:
        self.row_dtype = row_dtype
        self.rounding = rounding
        self.adopt_optimizer = adopt_optimizer
        self.num_shards = check_positive_int(num_shards, "num_shards")
        self.capacity = check_positive_int(capacity, "capacity")
        self.optimizer = optimizer
        self.init: Init = init if init is not None else Uniform(-0.01, 0.01)
        self.admission = admission if admission is not None else Admission()
        self.seed = seed
        self.weight_bound = weight_bound
        self.dims = tuple(sorted(set(dims))) if dims is not None else None
        self.shards = self._new_shards(self.num_shards)
        #: how many times every row was replaced (:meth:`clear`, :meth:`replace_rows`): the
        #: incremental-delta writer then writes a reset delta (:mod:`persia.store.delta`)
        self.resets = 0

    def _new_shards(self, n: int) -> list[Shard]:
        per = per_shard_capacity(self.capacity, n)
        shards = [
            Shard(
                per,
                self.optimizer,
                self.init,
                self.admission,
                self.seed,
                self.weight_bound,
                dims=self.dims,
                row_dtype=self.row_dtype,
                rounding=self.rounding,
            )
            for _ in range(n)
        ]
        for i, shard in enumerate(shards):
            shard.replica = i
        return shards

    def shard_of(self, keys: Any) -> np.ndarray:
        """The shard index (int32) of every key."""
        return shard_of(keys, self.num_shards)

    # ----------------------------------------------------------------------- operations
    def lookup(self, keys: Any, dim: int, training: bool) -> np.ndarray:
        """Rows of ``keys`` (any shard) as ``f32[n, dim]``; see :meth:`Shard.lookup`."""
        keys = check_keys(keys)
        dim = check_positive_int(dim, "dim")
        if self.num_shards == 1:
            return self.shards[0].lookup(keys, dim, training)
        out = np.empty((keys.shape[0], dim), dtype=np.float32)
        where = self.shard_of(keys)
        for s, shard in enumerate(self.shards):
            sel = np.flatnonzero(where == s)
            if sel.size:
                out[sel] = shard.lookup(keys[sel], dim, training)
        return out

    def apply_gradients(self, keys: Any, grads: Any) -> np.ndarray:
        """Applies one gradient row per key; int64 ``[applied, skipped_absent, skipped_nonfinite]``."""
        keys = check_keys(keys)
        if not isinstance(grads, np.ndarray) or grads.ndim != 2:
            shape = getattr(grads, "shape", type(grads).__name__)
            raise StoreError(f"grads must be a 2-D float32 array (keys x dim), got {shape}")
        grads = check_grads(grads, keys.shape[0], grads.shape[1])
        if self.num_shards == 1:
            return self.shards[0].apply_gradients(keys, grads)
        total = np.zeros(3, dtype=np.int64)
        where = self.shard_of(keys)
        for s, shard in enumerate(self.shards):
            sel = np.flatnonzero(where == s)
            if sel.size:
                total += shard.apply_gradients(keys[sel], np.ascontiguousarray(grads[sel]))
        return total

    def shard_stats(self) -> list[dict[str, Any]]:
        """Each shard's :meth:`Shard.stats`."""
        return [s.stats() for s in self.shards]

    def stats(self) -> dict[str, Any]:
        """Totals over shards, plus ``"shards"`` (each shard's stats)."""
        per = self.shard_stats()
        total: dict[str, Any] = {
            k: sum(int(s[k]) for s in per)
            for k in per[0]
            if isinstance(per[0][k], (int, np.integer)) and not isinstance(per[0][k], bool)
        }
        total["num_shards"] = self.num_shards
        total["shards"] = per
        return total

    @property
    def rows(self) -> int:
        return sum(int(s.stats()["rows"]) for s in self.shards)

    def clear(self) -> None:
        """Drops every row (the configuration stays)."""
        self._replace_shards(self._new_shards(self.num_shards))
        self.resets += 1

    def _replace_shards(self, shards: list[Shard]) -> None:
        # In place: clients (e.g. the local transport) hold this very list.
        self.shards[:] = shards

    # ---------------------------------------------------------------------- checkpoints
    def replace_rows(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], where: str) -> None:
        """Replaces every row by those of checkpoint arrays ``s{i}.d{dim}.keys / values /
        state`` (``meta``: ``dims``, ``num_shards``, ``optimizer``), re-sharding N ->
        ``num_shards``. The optimizer must keep as many state columns per row (its
        hyper-parameters may differ); with ``adopt_optimizer`` the store takes the saved one.
        The store is unchanged when this raises.

        Raises:
            CheckpointError: another optimizer state width, a dim the store does not declare,
                or rows the store refuses (``where`` names the checkpoint).
        """
        from persia.embedding.optim import EmbeddingOptimizer

        dims = meta.get("dims", [])
        optimizer = self.optimizer
        saved = meta.get("optimizer", {})
        if self.adopt_optimizer:
            try:
                optimizer = EmbeddingOptimizer.from_dict(saved)
            except Exception as exc:
                raise CheckpointError(f"{where}: bad optimizer in manifest: {exc}") from exc
        problems = []
        for dim in dims:
            want = optimizer.state_width(dim)
            for name, arr in arrays.items():
                if name.endswith(f".d{dim}.state") and arr.shape[1] != want:
                    problems.append(
                        f"dim {dim}: the checkpoint's optimizer {saved.get('type')} keeps "
                        f"{arr.shape[1]} state columns, this store's {optimizer.name} needs {want}"
                    )
                    break
            if self.dims is not None and dim not in self.dims:
                problems.append(f"the checkpoint holds dim {dim}, the store only {list(self.dims)}")
        if problems:
            raise CheckpointError(f"{where}: cannot load: " + "; ".join(problems))
        old_optimizer, old_row_dtype = self.optimizer, self.row_dtype
        self.optimizer = optimizer
        if self.adopt_optimizer:  # a store that trains nothing keeps the rows as they were saved
            saved_dtypes = {}
            for name, arr in arrays.items():
                part = name.split(".")
                if len(part) == 3 and part[2] == "values" and part[1][1:].isdigit():
                    saved_dtypes[int(part[1][1:])] = row_dtype_of(arr)
            self.row_dtype = saved_dtypes
        try:
            shards = self._new_shards(self.num_shards)
            for dim in dims:
                for i in range(int(meta["num_shards"])):
                    keys = arrays.get(f"s{i}.d{dim}.keys")
                    if keys is None:
                        continue
                    values = arrays[f"s{i}.d{dim}.values"]
                    state = arrays[f"s{i}.d{dim}.state"]
                    to = shard_of(keys, self.num_shards)
                    for s, shard in enumerate(shards):
                        sel = np.flatnonzero(to == s)
                        if sel.size:
                            shard.import_rows(dim, keys[sel], values[sel], state[sel])
        except StoreError as exc:
            self.optimizer, self.row_dtype = old_optimizer, old_row_dtype
            raise CheckpointError(f"{where}: rows cannot be loaded: {exc}") from exc
        except BaseException:
            self.optimizer, self.row_dtype = old_optimizer, old_row_dtype
            raise
        self._replace_shards(shards)
        self.resets += 1
