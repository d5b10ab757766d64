"""Parameter-server recovery on the Ray backend (opt-in: ``ClusterConfig(recover=True)``).

With incremental updates on (``enable_incremental_update`` in ``global_config.yml``), the
training context's :class:`persia.store.delta.DeltaWriter` writes the rows changed since its last
flush every ``delta_interval_s / 2`` seconds. When a parameter-server actor dies, the first call
that finds it dead (a lookup, a gradient, a control call) runs :meth:`ShardRecovery.recover`:

1. wait until a delta being written is complete (the writer's flush lock), so that no delta
   holding rows of the dead shard is still in flight;
2. rebuild the shard in this process from the newest usable full checkpoint in
   ``RecoveryConfig.checkpoint_dir`` (or from empty when the job started empty and loaded
   nothing since) plus every complete delta after it, keeping only the keys
   ``persia.store.shard_of(keys, num_shards) == rank`` (deltas are written per store, see
   below);
3. start a new actor for that rank with those rows (change tracking on), stop the old one, and
   re-point the data channel and the store facade at it; the failed call is then retried.

**Deltas per store, filtered per shard.** A delta holds the changed rows of every shard, each
taken under its own shard's lock; the rows of one shard are exactly the keys whose fixed hash
routes to it, so filtering a store-wide delta by :func:`persia.store.shard_of` gives that shard's
rows with no extra files, and the full-checkpoint argument of :mod:`persia.store.delta` (whole
rows, applied in order, newer than the checkpoint's copy) holds per shard. A flush that meets the
dead shard skips it (its unflushed changes died with it) and still writes the other shards' rows.

**What is lost**: the updates the dead shard applied after its last successful
``take_changes`` (the window ``lost_update_window_s``: from the start of that take to the end of
the last update the shard acknowledged). Flushing every half interval keeps the window under
``delta_interval_s`` unless a flush stalls. Also lost: the shard's admission sketch and its LRU
order beyond "checkpoint rows, then delta rows". Only one NN worker may recover (with several,
each would restore its own copy).

Only modules named ``persia/backends/ray/`` import Ray.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from persia.backends.ray.backend import (
    ClusterConfig,
    RayStore,
    RemoteShard,
    get_with_timeout,
    new_job_id,
    parameter_server_client,
    start_parameter_servers,
)
from persia.backends.ray.config import RecoveryConfig
from persia.checkpoint.follow import OneShardView
from persia.embedding.spec import EmbeddingSpec
from persia.errors import BackendError, CheckpointError, ConfigError
from persia.rpc.base import PARAMETER_SERVER, ParameterServerClient, Transport
from persia.rpc.protocol import ShardProtocol
from persia.rpc.wire import METHODS as _WIRE_METHODS

__all__ = [
    "RecoveryConfig",
    "ShardRecovery",
    "RecoveringTransport",
    "RecoverableShard",
    "RecoverableRayStore",
    "recoverable_parameter_servers",
    "recovery_settings",
    "restore_shard_rows",
]

_DEAD_CHECK_S = 2.0


def _gen_number(path: Path) -> int:
    return int(path.name.split("-")[1])


def restore_shard_rows(
    shard: ShardProtocol,
    rank: int,
    num_shards: int,
    optimizer: Any,
    checkpoint: Any,
    delta_dir: str | os.PathLike[str],
    after_seq: int,
) -> dict[str, Any]:
    """Fill ``shard`` (a local :class:`persia.store.Shard`) with shard ``rank``'s rows.

    Args:
        shard: the empty shard to fill.
        rank: which shard of ``num_shards`` it is.
        num_shards: the store's shard count (the checkpoint's may differ: rows re-shard).
        optimizer: the store's embedding optimizer (state widths are checked against it).
        checkpoint: a verified :class:`persia.checkpoint.JobCheckpoint`, or None (start empty).
        delta_dir: the incremental deltas.
        after_seq: the last delta the base already reflects.

    Returns:
        ``{"checkpoint_rows", "applied" (delta numbers), "last_seq", "last_flushed_unix_s"}``.

    Raises:
        CheckpointError: a checkpoint of another optimizer state width, a gap in the deltas, a
            corrupt delta.
    """
    from persia.store import shard_of
    from persia.store.delta import DeltaReader

    rows = 0
    if checkpoint is not None:
        meta, arrays = checkpoint.meta, checkpoint.arrays
        for dim in meta["dims"]:
            want = optimizer.state_width(dim)
            for i in range(int(meta["num_shards"])):
                keys = arrays.get(f"s{i}.d{dim}.keys")
                if keys is None:
                    continue
                state = arrays[f"s{i}.d{dim}.state"]
                if state.shape[1] != want:
                    raise CheckpointError(
                        f"{checkpoint.path}: dim {dim}: {state.shape[1]} optimizer state columns, "
                        f"this store's {optimizer.name} needs {want}"
                    )
                sel = np.flatnonzero(shard_of(keys, num_shards) == rank)
                if sel.size:
                    values = arrays[f"s{i}.d{dim}.values"]
                    shard.import_rows(dim, keys[sel], values[sel], state[sel])
                    rows += int(sel.size)
    reader = DeltaReader(delta_dir, after_seq=after_seq)
    applied = reader.apply_pending(OneShardView(shard, rank, num_shards, optimizer))
    return {
        "checkpoint_rows": rows,
        "applied": applied,
        "last_seq": reader.last_seq,
        "last_flushed_unix_s": reader.last_flushed_unix_s,
    }


class ShardRecovery:
    """Restores dead parameter-server shards of one job (see the module docstring).

    Args:
        actors: the job's actor list, by rank; updated in place when a shard is replaced.
        store: the :class:`RecoverableRayStore` over those actors.
        shard_kwargs: the arguments each shard was started with.
        cluster: the job's cluster settings.
        config: the recovery settings.
        delta_dir: ``incremental_dir``.
    """

    def __init__(
        self,
        actors: list[Any],
        store: RecoverableRayStore,
        shard_kwargs: dict[str, Any],
        cluster: ClusterConfig,
        config: RecoveryConfig,
        delta_dir: str | os.PathLike[str],
    ) -> None:
        from persia.store.checkpoint import list_generations

        self.actors = actors
        self.store = store
        self.shard_kwargs = dict(shard_kwargs)
        self.cluster = cluster
        self.config = config
        self.delta_dir = Path(delta_dir)
        self.timeout_s = cluster.resolved_timeout_s()
        self.flush_interval_s = float(config.delta_interval_s) / 2
        self.transport: RecoveringTransport | None = None
        self.writer: Any = None
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        n = len(actors)
        self.generation = [0] * n
        now = time.time()
        self.last_take_unix_s = [now] * n  # start of the last successful take_changes
        self.last_update_unix_s: list[float | None] = [None] * n  # end of the last update
        existing = list_generations(self.delta_dir)
        self.base_seq = _gen_number(existing[-1]) if existing else 0
        self._checkpoint_floor = self._current_checkpoint_number()
        self._started_empty = True

    # ------------------------------------------------------------------ bookkeeping
    def attach_writer(self, writer: Any) -> None:
        """The delta writer whose flushes a restore waits for (``TrainCtx`` calls this)."""
        self.writer = writer
        written = getattr(writer, "written", [])
        self.base_seq = written[0].seq - 1 if written else int(writer.last_seq)
        now = time.time()
        self.last_take_unix_s = [now] * len(self.actors)

    def note_update(self, rank: int) -> None:
        """A training call to ``rank`` (lookup that may create rows, gradients) succeeded."""
        self.last_update_unix_s[rank] = time.time()

    def note_take(self, rank: int, started_unix_s: float) -> None:
        """``take_changes`` on ``rank`` succeeded; it was sent at ``started_unix_s``."""
        self.last_take_unix_s[rank] = started_unix_s

    def store_replaced(self) -> None:
        """Every row was replaced outside the deltas (a load or a clear): only a checkpoint
        written after now can be the base of a restore."""
        self._started_empty = False
        self._checkpoint_floor = self._current_checkpoint_number()

    def _current_checkpoint_number(self) -> int:
        from persia.store.checkpoint import list_generations

        if self.config.checkpoint_dir is None:
            return 0
        found = list_generations(self.config.checkpoint_dir)
        return _gen_number(found[-1]) if found else 0

    def report(self) -> dict[str, Any]:
        """``{"recoveries": n, "lost_update_window_s": the largest window (0.0 if none),
        "events": [per restore: rank, seconds, checkpoint, deltas applied, rows, window]}``."""
        windows = [e["lost_update_window_s"] for e in self.events]
        return {
            "recoveries": len(self.events),
            "lost_update_window_s": max(windows) if windows else 0.0,
            "events": [dict(e) for e in self.events],
        }

    # ---------------------------------------------------------------------- restore
    def is_dead(self, rank: int) -> bool:
        """Whether Ray reports the actor of ``rank`` dead (a slow actor is not)."""
        import ray
        import ray.exceptions as rex

        try:
            ray.get(self.actors[rank].ping.remote(), timeout=_DEAD_CHECK_S)
        except rex.ActorUnavailableError:
            return False
        except rex.RayActorError:
            return True
        except rex.GetTimeoutError:
            return False
        return False

    def recover(self, rank: int, seen_generation: int) -> bool:
        """Restore shard ``rank`` if it is dead and was not restored since ``seen_generation``.

        Returns:
            True when the caller should retry (restored now or by another thread), False when
            the actor is not dead (the caller re-raises its error).

        Raises:
            BackendError: too many recoveries, no usable base, or the restore failed.
        """
        with self._lock:
            if self.generation[rank] != seen_generation:
                return True
            if not self.is_dead(rank):
                return False
            if len(self.events) >= self.config.max_recoveries:
                raise BackendError(
                    f"actor is dead and max_recoveries={self.config.max_recoveries} were used",
                    PARAMETER_SERVER,
                    rank,
                )
            lock = getattr(self.writer, "_flush_lock", None)  # a flush in flight completes first
            if lock is not None:
                with lock:
                    self._restore(rank)
            else:
                self._restore(rank)
            return True

    def _base_checkpoint(self) -> tuple[Any, int]:
        """(verified checkpoint or None, the last delta it reflects)."""
        from persia import checkpoint as job_checkpoint
        from persia.store.checkpoint import current_generation

        folder = self.config.checkpoint_dir
        if folder is not None and job_checkpoint.is_job_checkpoint(folder):
            number = _gen_number(current_generation(folder))
            if number > self._checkpoint_floor:
                ckpt = job_checkpoint.read(folder)
                seq = ckpt.meta.get("delta_seq")
                if seq is not None and int(seq) >= self.base_seq:
                    return ckpt, int(seq)
        if self._started_empty:
            return None, self.base_seq
        raise BackendError(
            "actor is dead and cannot be restored: its rows were loaded or cleared during the "
            f"job and no full checkpoint in {folder!r} was written since",
            PARAMETER_SERVER,
        )

    def _restore(self, rank: int) -> None:
        import ray

        from persia.store import Shard

        started = time.time()
        try:
            ckpt, after = self._base_checkpoint()
            optimizer = self.store.optimizer
            kwargs = {**self.shard_kwargs, "optimizer": optimizer}
            shard = Shard(**kwargs)
            done = restore_shard_rows(
                shard, rank, len(self.actors), optimizer, ckpt, self.delta_dir, after
            )
            parts = shard.export_rows()
            (actor,) = start_parameter_servers(
                1, kwargs, self.cluster, f"{new_job_id()}-restored", first_rank=rank
            )
            get_with_timeout(
                actor.replace_rows.remote(parts, optimizer.to_dict()),
                self.timeout_s,
                PARAMETER_SERVER,
                rank,
            )
            if self.store.facades[rank]._tracking:
                get_with_timeout(
                    actor.track_changes.remote(True), self.timeout_s, PARAMETER_SERVER, rank
                )
        except BackendError as exc:
            raise BackendError(
                f"actor is dead and its restore failed: {exc}", PARAMETER_SERVER, rank
            ) from exc
        except CheckpointError as exc:
            raise BackendError(
                f"actor is dead and its restore failed: {exc}", PARAMETER_SERVER, rank
            ) from exc
        old = self.actors[rank]
        try:
            ray.kill(old)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[rank] = actor
        self.store.actors[rank] = actor
        self.store.facades[rank].actor = actor
        if self.transport is not None:
            self.transport.repoint()
        last_update = self.last_update_unix_s[rank]
        lost = 0.0
        if last_update is not None:
            lost = max(0.0, last_update - self.last_take_unix_s[rank])
        now = time.time()
        self.last_take_unix_s[rank] = now  # the new actor's change record starts empty now
        self.last_update_unix_s[rank] = None
        self.generation[rank] += 1
        self.events.append(
            {
                "rank": rank,
                "at_unix_s": now,
                "seconds": now - started,
                "checkpoint": None if ckpt is None else str(ckpt.path),
                "deltas_applied": len(done["applied"]),
                "last_delta": done["last_seq"],
                "rows": int(sum(int(p["keys"].shape[0]) for p in parts.values())),
                "lost_update_window_s": lost,
            }
        )
        from persia import telemetry

        telemetry.current().recovery(1)


class RecoveringTransport(Transport):
    """The data channel with restore-and-retry: a call that finds its parameter server dead
    waits for :meth:`ShardRecovery.recover` and is sent again to the new actor.

    Args:
        recovery: the job's recovery.
        inner: the transport over the current actors.
    """

    def __init__(self, recovery: ShardRecovery, inner: Transport) -> None:
        self.recovery = recovery
        self._inner = inner
        self._old: list[Transport] = []
        self._lock = threading.Lock()

    def replicas(self, role: str) -> int:
        return self._inner.replicas(role)

    def repoint(self) -> None:
        """A new inner transport over the current actors (the old one is closed at the end:
        other threads may still be finishing calls to live shards on it)."""
        rec = self.recovery
        inner = parameter_server_client(list(rec.actors), rec.cluster, rec.timeout_s).transport
        with self._lock:
            self._old.append(self._inner)
            self._inner = inner

    def call(self, role: str, rank: int, method: str, *args: Any) -> Any:
        if role != PARAMETER_SERVER:
            return self._inner.call(role, rank, method, *args)
        plain = _WIRE_METHODS.get(method, method)  # a compressed call updates as the plain one
        updates = plain == "apply_gradients" or (plain == "lookup" and bool(args[2]))
        while True:
            seen = self.recovery.generation[rank]
            try:
                result = self._inner.call(role, rank, method, *args)
            except BackendError:
                if not self.recovery.recover(rank, seen):
                    raise
                continue
            if updates:
                self.recovery.note_update(rank)
            return result

    def close(self) -> None:
        with self._lock:
            every = [*self._old, self._inner]
            self._old = []
        for t in every:
            t.close()


class RecoverableShard(RemoteShard):
    """The store facade of one actor, restoring it when a control call finds it dead (a
    :class:`persia.rpc.protocol.ShardProtocol`).

    ``take_changes`` on a dead actor returns no rows (they died with it; the delta writer goes on
    with the other shards) and ``tracking_changes`` is remembered here, so the delta writer never
    waits for a restore while it holds its flush lock.
    """

    def __init__(self, actor: Any, rank: int, timeout_s: float, recovery: ShardRecovery) -> None:
        super().__init__(actor, rank, timeout_s)
        self.recovery = recovery
        self._tracking = False

    def _call(self, method: str, *args: Any) -> Any:
        while True:
            seen = self.recovery.generation[self.rank]
            try:
                return super()._call(method, *args)
            except BackendError:
                if not self.recovery.recover(self.rank, seen):
                    raise

    def _call_once(self, method: str, *args: Any) -> Any:
        return RemoteShard._call(self, method, *args)

    def track_changes(self, enabled: bool = True) -> None:
        self._tracking = bool(enabled)
        try:
            self._call_once("track_changes", enabled)
        except BackendError:
            if not self.recovery.is_dead(self.rank):
                raise  # a dead one gets tracking when it is restored

    @property
    def tracking_changes(self) -> bool:
        return self._tracking

    @property
    def changed_count(self) -> int:
        try:
            return int(self._call_once("changed_count"))
        except BackendError:
            return 0

    def take_changes(self) -> dict[int, dict[str, np.ndarray]]:
        started = time.time()
        try:
            out = self._call_once("take_changes")
        except BackendError:
            if self.recovery.is_dead(self.rank):
                return {}
            raise
        self.recovery.note_take(self.rank, started)
        return out

    def replace_rows(
        self, parts: dict[int, dict[str, np.ndarray]], optimizer: dict[str, Any]
    ) -> None:
        """Drop every row of the actor, then import ``parts`` (see ``ParameterServer``)."""
        self._call("replace_rows", parts, optimizer)


class RecoverableRayStore(RayStore):
    """A :class:`RayStore` whose shards are :class:`RecoverableShard` facades over one
    :class:`ShardRecovery`; a load or a clear tells the recovery that older checkpoints no
    longer describe the store.

    Args:
        actors, store_kwargs, timeout_s, owned: see :class:`RayStore`.
        shard_kwargs: the arguments each shard was started with (a restored one gets them).
        cluster: the job's cluster settings.
        config: the recovery settings.
        delta_dir: ``incremental_dir``.
    """

    def __init__(
        self,
        actors: list[Any],
        store_kwargs: dict[str, Any],
        timeout_s: float,
        owned: bool,
        *,
        shard_kwargs: dict[str, Any],
        cluster: ClusterConfig,
        config: RecoveryConfig,
        delta_dir: str | os.PathLike[str],
    ) -> None:
        super().__init__(actors, store_kwargs, timeout_s, owned)
        self.recovery = ShardRecovery(self.actors, self, shard_kwargs, cluster, config, delta_dir)
        self.facades = [
            RecoverableShard(a, i, self.timeout_s, self.recovery) for i, a in enumerate(self.actors)
        ]
        self.shards = list(self.facades)

    def shard_stats(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self.shards]

    def stats(self) -> dict[str, Any]:
        out = dict(super().stats())
        report = self.recovery.report()
        out["recoveries"] = report["recoveries"]
        out["lost_update_window_s"] = report["lost_update_window_s"]
        return out

    def _replace_shards(self, shards: list[Any]) -> None:
        self.recovery.store_replaced()
        for i, s in enumerate(shards):
            self.facades[i].replace_rows(s.export_rows(), self.optimizer.to_dict())
            if self.facades[i]._tracking:
                self.facades[i]._call("track_changes", True)


def recovery_settings(cluster: ClusterConfig, spec: EmbeddingSpec) -> RecoveryConfig | None:
    """The recovery settings of ``cluster`` (``ClusterConfig(recover=...)``), checked against
    the job's embedding spec before anything starts; None: recovery is off. (That recovery needs
    one NN worker is a rule of the settings themselves: :class:`ClusterConfig` refuses it.)

    Raises:
        ConfigError: incremental updates are off.
    """
    if not cluster.recover:
        return None
    config = cluster.recover if isinstance(cluster.recover, RecoveryConfig) else RecoveryConfig()
    if not spec.incremental:
        raise ConfigError(
            [
                "recover needs enable_incremental_update: true in global_config.yml "
                "(a shard is restored from the checkpoint plus the deltas)"
            ],
            source="ClusterConfig.recover",
        )
    return config


def recoverable_parameter_servers(
    actors: list[Any],
    store_kwargs: dict[str, Any],
    shard_kwargs: dict[str, Any],
    cluster: ClusterConfig,
    config: RecoveryConfig,
    delta_dir: str | os.PathLike[str],
    timeout_s: float,
    owned: bool,
) -> tuple[RecoverableRayStore, ParameterServerClient]:
    """The store and the data channel of a job whose dead shards are restored (see the module
    docstring), as :func:`persia.backends.ray.runtime.build_ray_runtime` composes them: a
    :class:`RecoverableRayStore` over ``actors`` and a client whose transport is a
    :class:`RecoveringTransport` around the configured one.

    Args:
        actors: the parameter-server actors, by rank.
        store_kwargs: :class:`RayStore`'s arguments (``adopt_optimizer`` included).
        shard_kwargs: the arguments each shard was started with.
        cluster: the job's cluster settings.
        config: the checked recovery settings (:func:`recovery_settings`).
        delta_dir: ``incremental_dir``.
        timeout_s: the longest one call may take.
        owned: the store stops the actors when closed.
    """
    from persia.store import shard_of

    store = RecoverableRayStore(
        actors,
        store_kwargs,
        timeout_s,
        owned,
        shard_kwargs=shard_kwargs,
        cluster=cluster,
        config=config,
        delta_dir=delta_dir,
    )
    try:
        inner = parameter_server_client(list(store.actors), cluster, timeout_s).transport
    except BaseException:
        store.close()
        raise
    transport = RecoveringTransport(store.recovery, inner)
    store.recovery.transport = transport
    return store, ParameterServerClient(transport, shard_of, wire=cluster.wire_compression)
