"""N parameter-server shards behind one object: routing, batched calls, row replacement.

Key -> shard by :func:`persia.store.shard.shard_of` (a fixed hash whose bits are independent of
the tables' probe hash), so the same key lands on the same shard in every process, and a
checkpoint made with N shards loads into M. Checkpoints are written and read by
:mod:`persia.checkpoint`; :meth:`ShardedStore.replace_rows` takes their arrays
``s{shard}.d{dim}.keys`` / ``.values`` / ``.state``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from persia.embedding.spec import per_shard_capacity
from persia.errors import CheckpointError, StoreError
from persia.logger import get_default_logger
from persia.store.config import Admission, Init, Uniform
from persia.store.disk import DiskTierConfig
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
        disk_tier: keep rows evicted from RAM on disk (``persia.store.disk``): a directory and the
            rows on disk over all shards (each shard holds ``ceil(capacity / num_shards)``). The
            store's tiers live in ``{directory}/{CURRENT}/s{shard}/d{dim}``, ``CURRENT`` naming
            the live set; a new store starts it empty (discarding what an earlier process left,
            with a warning); :meth:`replace_rows` and :meth:`clear` start a new one and delete
            the old (a checkpoint never points into it).
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
        disk_tier: DiskTierConfig | None = None,
        row_dtype: str | Mapping[int, str] = "float32",
        rounding: str = "nearest",
    ) -> None:
        self.row_dtype = row_dtype
        self.rounding = rounding
        self.adopt_optimizer = adopt_optimizer
        if disk_tier is not None and not isinstance(disk_tier, DiskTierConfig):
            raise StoreError(f"disk_tier must be a DiskTierConfig, got {type(disk_tier).__name__}")
        self.disk_tier = disk_tier
        self._tier_set = self._current_tier_set() if disk_tier is not None else 0
        self.num_shards = check_positive_int(num_shards, "num_shards")
        self.capacity = check_positive_int(capacity, "capacity")
        self.optimizer = optimizer
        self.init: Init = init if init is not None else Uniform(-0.01, 0.01)
        self.admission = admission if admission is not None else Admission()
        self.seed = seed
        self.weight_bound = weight_bound
        self.dims = tuple(sorted(set(dims))) if dims is not None else None
        #: how many times every row was replaced (:meth:`clear`, :meth:`replace_rows`): the
        #: incremental-delta writer then writes a reset delta (:mod:`persia.store.delta`)
        self.resets = 0
        self.shards = self._new_shards(self.num_shards)
        if disk_tier is not None:
            kept = sum(int(s.stats().get("disk_rows", 0)) for s in self.shards)
            if kept:
                # a new store starts empty, as one without a tier does: rows an earlier process
                # spilled are not this job's state (the checkpoint it wrote is; load it)
                get_default_logger("persia.store").warning(
                    "disk tier %s: %d valid row(s) left by an earlier process discarded: a new "
                    "store starts empty (load the job's checkpoint to resume it)",
                    disk_tier.directory, kept,
                )  # fmt: skip
                self.clear()
                self.resets = 0

    def _current_tier_set(self) -> int:
        """The live tier set named by ``{directory}/CURRENT`` (0 if none); other sets left by
        an earlier process are deleted."""
        if self.disk_tier is None:
            raise StoreError("this store has no disk tier")
        base = self.disk_tier.directory
        try:
            base.mkdir(parents=True, exist_ok=True)
            text = (base / "CURRENT").read_text().strip() if (base / "CURRENT").exists() else ""
        except OSError as exc:
            raise StoreError(f"disk tier directory {str(base)!r} cannot be used: {exc}") from exc
        number = int(text[3:]) if re.fullmatch(r"set\d+", text) else 0
        for p in base.glob("set*"):
            if p.name != f"set{number}" and re.fullmatch(r"set\d+", p.name):
                shutil.rmtree(p, ignore_errors=True)
        return number

    def _tier_config(self, number: int, shard: int, n: int) -> DiskTierConfig | None:
        cfg = self.disk_tier
        if cfg is None:
            return None
        per = per_shard_capacity(cfg.capacity, n)
        return DiskTierConfig(cfg.directory / f"set{number}" / f"s{shard}", per)

    def _new_shards(self, n: int, tier_set: int | None = None) -> list[Shard]:
        per = per_shard_capacity(self.capacity, n)
        number = self._tier_set if tier_set is None else tier_set
        shards: list[Shard] = []
        try:
            for i in range(n):
                shards.append(
                    Shard(
                        per,
                        self.optimizer,
                        self.init,
                        self.admission,
                        self.seed,
                        self.weight_bound,
                        dims=self.dims,
                        disk_tier=self._tier_config(number, i, n),
                        row_dtype=self.row_dtype,
                        rounding=self.rounding,
                    )
                )
        except BaseException:
            self._close_tiers(shards, remove=tier_set is not None)
            raise
        for i, shard in enumerate(shards):
            shard.replica = i
        return shards

    def _next_tier_set(self) -> int | None:
        """A new, empty tier set for replacing shards (None: no disk tier)."""
        if self.disk_tier is None:
            return None
        number = self._tier_set + 1
        shutil.rmtree(self.disk_tier.directory / f"set{number}", ignore_errors=True)
        return number

    def _switch_tier_set(self, number: int | None, old: list[Shard]) -> None:
        """After the shards were replaced: close and delete the old set, name the new one."""
        self._close_tiers(old, remove=True)
        if number is None or self.disk_tier is None:
            return
        base = self.disk_tier.directory
        tmp = base / "CURRENT.tmp"
        tmp.write_text(f"set{number}\n")
        os.replace(tmp, base / "CURRENT")
        shutil.rmtree(base / f"set{self._tier_set}", ignore_errors=True)
        self._tier_set = number

    def _close_tiers(self, shards: Sequence[Any], remove: bool) -> None:
        """Close the disk tiers of ``shards`` (``remove``: delete their files); nothing without a
        disk tier (the shards of another backend, e.g. Ray's actors, have no tier to close)."""
        if self.disk_tier is None:
            return
        for shard in shards:
            shard.close(remove_tier=remove)

    def close(self) -> None:
        """Close the shards' disk tiers (their files stay until a new store starts the tier
        empty)."""
        self._close_tiers(self.shards, remove=False)

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

    def prefetch(self, keys: Any, dim: int) -> int:
        """:meth:`Shard.prefetch` on every shard holding some of ``keys``."""
        if self.disk_tier is None:
            return 0
        keys = check_keys(keys)
        where = self.shard_of(keys)
        done = 0
        for s, shard in enumerate(self.shards):
            sel = np.flatnonzero(where == s)
            if sel.size:
                done += shard.prefetch(keys[sel], dim)
        return done

    def disk_reads_wait(self) -> bool:
        """Whether some shard's disk tier reads wait for the device (a prefetch pays off; when
        the page cache holds the tier, the lookups read it as fast as a prefetch would)."""
        return self.disk_tier is not None and any(s.disk_reads_wait() for s in self.shards)

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
        number = self._next_tier_set()
        old = list(self.shards)
        self._replace_shards(self._new_shards(self.num_shards, number))
        self._switch_tier_set(number, old)
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
        number = self._next_tier_set()
        shards: list[Shard] = []
        try:
            shards = self._new_shards(self.num_shards, number)
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
            self._close_tiers(shards, remove=True)
            raise CheckpointError(f"{where}: rows cannot be loaded: {exc}") from exc
        except BaseException:
            self.optimizer, self.row_dtype = old_optimizer, old_row_dtype
            self._close_tiers(shards, remove=True)
            raise
        old = list(self.shards)
        self._replace_shards(shards)
        self._switch_tier_set(number, old)
        self.resets += 1
