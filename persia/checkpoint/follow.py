"""A read-only serving runtime: a job checkpoint in an in-process store that follows the training
job, for ``persia.ctx.InferCtx``, ``eval_ctx`` under ``job_type: Infer`` and
``persia.serving.open_model``.

:class:`ServingRuntime` loads the current generation of a job checkpoint (:mod:`persia.checkpoint`)
into its own :class:`~persia.store.ShardedStore` and serves evaluation lookups from it: an unknown
ID reads as zeros and no row is ever created. It implements
:class:`persia.runtime.pipeline.RuntimeProtocol`, so the contexts and the ``DataLoader`` use it as
any runtime; whatever would change a row through it (a training lookup, gradients) is refused.

**Following the training job** (one background thread, ``persia-infer-delta``, polling every
``poll_interval_s``):

* *Deltas* (``incremental_dir``): every complete delta after the one the served state reflects,
  strictly in order, with :class:`persia.store.delta.DeltaReader`. A delta is read and verified
  whole before any of its rows is written, and written under the lock lookups take: a request sees
  whole deltas only. Rows a delta removes (evicted by training) read as zeros from then on. A
  corrupt delta, or a gap, is refused with one warning and retried at every poll, never skipped:
  serving goes on with the last complete state.
* *New generations* (``follow_checkpoint``): when the checkpoint directory's ``CURRENT`` names a
  newer generation (the training job dumped again), it is read and verified, loaded into a new
  store (with its TorchScript model, when the runtime serves one), brought forward with every
  complete delta after its ``delta_seq``, and then swapped in under the lock, whole. It is
  skipped (with a warning, until a newer one appears) when it cannot be read or would serve an
  older state than the current one. A new generation also gets a follower past a corrupt delta
  it already reflects. While one is loaded, memory holds two stores.

:meth:`ServingRuntime.freshness` says how far behind training the served rows are.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from persia.checkpoint.job import JobCheckpoint, read, restore_store
from persia.embedding.data import PersiaBatch
from persia.embedding.spec import EmbeddingSpec
from persia.errors import CheckpointError, ConfigError, PersiaError, StoreError
from persia.logger import get_default_logger
from persia.rpc.local import local_parameter_servers
from persia.runtime.pipeline import TrainingBatch
from persia.runtime.staleness import StalenessGate
from persia.store.build import build_store
from persia.store.checkpoint import current_generation
from persia.store.delta import DeltaReader
from persia.store.shard import shard_of
from persia.store.sharded import ShardedStore
from persia.worker.embedding_worker import EmbeddingWorker

__all__ = [
    "CheckpointFollower",
    "OneShardView",
    "ServingRuntime",
    "ServingShard",
    "layout_differences",
    "serving_spec",
]

_logger = get_default_logger()


def _layout(spec: EmbeddingSpec) -> dict[str, Any]:
    return {
        "feature_index_prefix_bit": spec.feature_index_prefix_bit,
        "slots": {
            s.name: (s.dim, s.pooling, s.prefix, s.sample_fixed_size, s.hash_stack_rounds,
                     s.hash_stack_size)
            for s in spec.slots
        },
    }  # fmt: skip


def layout_differences(given: EmbeddingSpec, recorded: EmbeddingSpec) -> list[str]:
    """How ``given`` forms keys or pools differently from ``recorded`` (empty: the same): what
    would make every lookup read other rows or zeros."""
    a, b = _layout(given), _layout(recorded)
    out = []
    if a["feature_index_prefix_bit"] != b["feature_index_prefix_bit"]:
        out.append(
            f"feature_index_prefix_bit {a['feature_index_prefix_bit']} (the checkpoint's: "
            f"{b['feature_index_prefix_bit']})"
        )
    names = ("dim", "pooling", "prefix", "sample_fixed_size", "hash_stack_rounds",
             "hash_stack_size")  # fmt: skip
    for name in sorted(set(a["slots"]) | set(b["slots"])):
        if name not in b["slots"]:
            out.append(f"slot {name!r} is not in the checkpoint")
        elif name not in a["slots"]:
            out.append(f"slot {name!r} of the checkpoint is missing")
        else:
            for field, x, y in zip(names, a["slots"][name], b["slots"][name], strict=True):
                if x != y:
                    out.append(f"slot {name!r}: {field} {x!r} (the checkpoint's: {y!r})")
    return out


def serving_spec(ckpt: JobCheckpoint, given: EmbeddingSpec | None) -> EmbeddingSpec:
    """The spec to serve ``ckpt`` with: ``given`` (the YAML files passed), checked against the
    layout the checkpoint records, else the recorded one; without an optimizer (the serving store
    adopts the checkpoint's).

    Raises:
        ConfigError: neither is known, or ``given`` forms keys differently from training.
        CheckpointError: the recorded spec is malformed.
    """
    recorded = ckpt.embedding_spec()
    if given is not None and recorded is not None:
        diff = layout_differences(given, recorded)
        if diff:
            raise ConfigError(
                f"{ckpt.path}: the embedding config given differs from the training job's, "
                "recorded in the checkpoint (every lookup would read other rows or zeros): "
                + "; ".join(diff)
                + ". Pass the training job's embedding_config.yml, or none to use the recorded one"
            )
    spec = given if given is not None else recorded
    if spec is None:
        raise ConfigError(
            f"{ckpt.path} records no embedding config (it was dumped by an older persia or by a "
            "runtime that did not know it): pass the training job's embedding_config.yml"
        )
    return replace(spec, optimizer=None, optimizer_args={})


@dataclass
class _State:
    """One served state, from one generation: ``target`` is what deltas are applied to (a store,
    or a one-shard view of one), ``payload`` what the server reads (store, worker, model, ...)."""

    target: Any
    payload: Any
    generation: Path
    checkpoint_delta_seq: int
    rows: int


def _generation_number(path: Path) -> int:
    return int(path.name.split("-")[1])


def _check_interval(poll_interval_s: Any) -> float:
    if isinstance(poll_interval_s, bool) or not (
        isinstance(poll_interval_s, (int, float)) and poll_interval_s > 0
    ):
        raise PersiaError(f"poll_interval_s must be > 0, got {poll_interval_s!r}")
    return float(poll_interval_s)


class CheckpointFollower:
    """The served state of a checkpoint directory, kept up with the training job (module doc):
    its deltas and, with ``follow_checkpoint``, its new generations; one background thread.

    Args:
        checkpoint_dir: the job checkpoint's directory.
        load: builds a new :class:`_State` from a verified checkpoint (nothing shared with the
            served one); raises CheckpointError / ConfigError to refuse it.
        incremental_dir: follow the deltas in this directory (None: none).
        follow_checkpoint: pick up new generations of ``checkpoint_dir``.
        poll_interval_s: how often the thread polls.
        lock: held by readers of the state, and here while rows change or the state is swapped.
        name: what the log lines call the served thing.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        load: Callable[[JobCheckpoint], _State],
        *,
        incremental_dir: str | os.PathLike[str] | None,
        follow_checkpoint: bool,
        poll_interval_s: float,
        lock: threading.Lock,
        first: JobCheckpoint | None = None,
        name: str = "serving",
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.poll_interval_s = _check_interval(poll_interval_s)
        self._load = load
        self.lock = lock
        self.name = name
        self.state = load(first if first is not None else read(self.checkpoint_dir))
        self.incremental_dir = None if incremental_dir is None else Path(incremental_dir)
        self.follow_checkpoint = bool(follow_checkpoint)
        self._reader: DeltaReader | None = None
        self._delta_error: str | None = None
        self._checkpoint_error: str | None = None
        self._skipped_generation: str | None = None
        self._generations_loaded = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _logger.info("%s %d embedding rows of %s", name, self.state.rows, self.state.generation)
        if self.incremental_dir is not None:
            self._reader = DeltaReader(self.incremental_dir, self.state.checkpoint_delta_seq)
            self._poll_deltas()  # serve the newest complete state from the first request on
        if self.incremental_dir is not None or self.follow_checkpoint:
            self._thread = threading.Thread(
                target=self._follow, name="persia-infer-delta", daemon=True
            )
            self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the follower must not die; logged
                _logger.exception("the %s follower's poll failed; it goes on", self.name)

    def poll(self) -> None:
        """One poll (the thread runs them; tests and tools may call it): a new generation, then
        the pending deltas. Never raises for a refused delta or generation."""
        if self.follow_checkpoint:
            self._poll_checkpoint()
        self._poll_deltas()

    def _poll_deltas(self) -> list[int]:
        """Applies the complete deltas not applied yet; a refused one is logged (once per
        distinct error) and retried at the next poll."""
        reader = self._reader
        if reader is None:
            return []
        before = reader.last_seq
        try:
            reader.apply_pending(self.state.target, lock=self.lock)
        except Exception as exc:  # a refused delta must not stop serving
            message = f"{type(exc).__name__}: {exc}"
            if message != self._delta_error:
                _logger.warning(
                    "%s: delta %d refused, serving the state after delta %d: %s",
                    self.name,
                    reader.last_seq + 1,
                    reader.last_seq,
                    message,
                )
            self._delta_error = message
        else:
            self._delta_error = None
        return list(range(before + 1, reader.last_seq + 1))

    def _skip_generation(self, gen: Path, why: str) -> None:
        self._skipped_generation = gen.name
        self._checkpoint_error = f"{gen}: {why}"
        _logger.warning("%s: new checkpoint generation %s not served (%s); serving %s",
                        self.name, gen, why, self.state.generation)  # fmt: skip

    def _poll_checkpoint(self) -> None:
        try:
            gen = current_generation(self.checkpoint_dir)
        except CheckpointError:
            return  # nothing complete to switch to (the served state stays)
        served = self.state.generation
        if gen.name in (served.name, self._skipped_generation):
            return
        if _generation_number(gen) < _generation_number(served):
            return
        try:
            ckpt = read(self.checkpoint_dir)
            state = self._load(ckpt)
        except (CheckpointError, ConfigError) as exc:
            self._skip_generation(gen, f"{type(exc).__name__}: {exc}")
            return
        reader = None
        delta_error = None
        if self.incremental_dir is not None:
            reader = DeltaReader(self.incremental_dir, state.checkpoint_delta_seq)
            try:
                reader.apply_pending(state.target)
            except CheckpointError as exc:  # the new state goes as far as it could
                delta_error = f"{type(exc).__name__}: {exc}"
        current = self._reader.last_seq if self._reader is not None else None
        if reader is not None and current is not None and reader.last_seq < current:
            self._skip_generation(
                ckpt.path,
                f"with its deltas it reaches delta {reader.last_seq}, the served state is at "
                f"delta {current}",
            )
            return
        with self.lock:
            self.state = state
            if reader is not None:
                self._reader = reader
                self._delta_error = delta_error
            self._generations_loaded += 1
        self._checkpoint_error = None
        _logger.info(
            "%s checkpoint generation %s (%d rows%s)",
            self.name,
            ckpt.path,
            state.rows,
            "" if reader is None else f", delta {reader.last_seq}",
        )

    def freshness(self) -> dict[str, Any]:
        """How far behind the training job the served state is.

        Returns:
            ``{"checkpoint", "checkpoint_delta_seq", "incremental_dir", "last_delta_seq",
            "last_delta_flushed_unix_s", "age_s", "last_error", "checkpoint_error",
            "generations_loaded"}``: the generation served and the delta it held, the delta
            directory followed (None: none), the last delta applied, when the training job
            flushed it and how many seconds ago that was (None before any delta), why the next
            delta was refused at the last poll (None: it was not), why the newest generation
            is not served (None: it is, or none is newer), and how many generations were
            loaded (1: only the first).
        """
        state, reader = self.state, self._reader
        flushed = None if reader is None else reader.last_flushed_unix_s
        return {
            "checkpoint": str(state.generation),
            "checkpoint_delta_seq": state.checkpoint_delta_seq,
            "incremental_dir": None if self.incremental_dir is None else str(self.incremental_dir),
            "last_delta_seq": state.checkpoint_delta_seq if reader is None else reader.last_seq,
            "last_delta_flushed_unix_s": flushed,
            "age_s": None if flushed is None else max(0.0, time.time() - flushed),
            "last_error": self._delta_error,
            "checkpoint_error": self._checkpoint_error,
            "generations_loaded": self._generations_loaded,
        }

    def close(self) -> None:
        """Stops the thread (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class ServingRuntime:
    """A read-only runtime over a job checkpoint that follows the training job (module doc).

    Args:
        checkpoint_dir: the job checkpoint's directory (``dump_checkpoint`` / ``dump_embedding``).
        spec: the embedding layer (PERSIA's YAML files); None: the one the checkpoint records.
            A given spec must form keys as the recorded one does.
        incremental_dir: follow the deltas in this directory (None: none).
        follow_checkpoint: pick up new generations of ``checkpoint_dir``.
        poll_interval_s: how often the follower polls.
        with_model: also serve the checkpoint's TorchScript dense model (:attr:`model`); a
            checkpoint without one is refused.
        map_location: where the TorchScript model is loaded (``torch.jit.load``'s argument).

    Raises:
        CheckpointError: a missing, corrupt or mismatching checkpoint; no TorchScript model when
            ``with_model``.
        ConfigError: no spec known, or one that differs from training's.
        PersiaError: a bad ``poll_interval_s``.
    """

    read_only = True

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        spec: EmbeddingSpec | None = None,
        *,
        incremental_dir: str | os.PathLike[str] | None = None,
        follow_checkpoint: bool = False,
        poll_interval_s: float = 1.0,
        with_model: bool = False,
        map_location: Any = None,
    ) -> None:
        _check_interval(poll_interval_s)
        self.checkpoint_dir = Path(checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            raise CheckpointError(
                f"checkpoint directory {str(self.checkpoint_dir)!r} does not exist"
            )
        self.with_model = with_model
        self.map_location = map_location
        ckpt = read(self.checkpoint_dir)
        self.spec: EmbeddingSpec | None = serving_spec(ckpt, spec)
        self._given_spec = spec
        self.counts = np.zeros(3, dtype=np.int64)
        self.batches_applied = 0
        self._closed = False
        #: held by a lookup, and by whatever changes rows or swaps the state: a request sees
        #: whole deltas and whole generations only
        self._lock = threading.Lock()
        self._follower = CheckpointFollower(
            self.checkpoint_dir,
            self._load,
            incremental_dir=incremental_dir,
            follow_checkpoint=follow_checkpoint,
            poll_interval_s=poll_interval_s,
            lock=self._lock,
            first=ckpt,
        )

    @property
    def incremental_dir(self) -> Path | None:
        """The delta directory followed (None: none)."""
        return self._follower.incremental_dir

    @property
    def poll_interval_s(self) -> float:
        """How often the follower polls."""
        return self._follower.poll_interval_s

    def _load(self, ckpt: JobCheckpoint) -> _State:
        """A new state from a verified checkpoint (nothing shared with the served one)."""
        spec = self.spec if self._given_spec is None else self._given_spec
        spec = serving_spec(ckpt, spec)  # a new generation must keep the layout
        model = None
        if self.with_model:
            model = ckpt.jit_model(self.map_location)
            if model is None:
                raise CheckpointError(
                    f"{ckpt.path} holds no TorchScript dense model: dump it with "
                    "dump_checkpoint(dir, with_jit_model=True)"
                )
        store = build_store(spec)
        restore_store(store, ckpt)
        worker = EmbeddingWorker.from_spec(spec, local_parameter_servers(store))
        return _State(
            store,
            (store, worker, model),
            ckpt.path,
            int(ckpt.meta.get("delta_seq") or 0),
            int(ckpt.meta.get("rows") or 0),
        )

    def poll(self) -> None:
        """One poll of the follower (see :meth:`CheckpointFollower.poll`)."""
        self._follower.poll()

    def freshness(self) -> dict[str, Any]:
        """:meth:`CheckpointFollower.freshness`."""
        return self._follower.freshness()

    # ------------------------------------------------------------------ RuntimeProtocol
    @property
    def store(self) -> ShardedStore:
        """The store served now (a new generation replaces it)."""
        return self._follower.state.payload[0]  # type: ignore[no-any-return]

    @store.setter
    def store(self, value: ShardedStore) -> None:
        raise PersiaError(
            "a serving runtime's store is replaced only by a new checkpoint generation"
        )

    @property
    def model(self) -> Any:
        """The TorchScript dense model served now (None unless ``with_model``)."""
        return self._follower.state.payload[2]

    @property
    def training_allowed(self) -> bool:
        """Always False: the store is read-only."""
        return False

    @training_allowed.setter
    def training_allowed(self, value: bool) -> None:
        if value:
            raise PersiaError("a serving runtime is read-only: it cannot train")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    def lookup(
        self, batch: PersiaBatch, training: bool, index: int, gate: StalenessGate | None
    ) -> TrainingBatch:
        """An evaluation lookup of ``batch`` (unknown IDs read as zeros), of whole deltas only.

        Raises:
            PersiaError: ``training`` (the store is read-only), or the runtime is closed.
        """
        return self.lookup_with_model(batch, training, index)[0]

    def lookup_with_model(
        self, batch: PersiaBatch, training: bool = False, index: int = 0
    ) -> tuple[TrainingBatch, Any]:
        """:meth:`lookup`, with the dense model of the same generation (None unless
        ``with_model``)."""
        if training:
            raise PersiaError("a serving runtime is read-only: training lookups are refused")
        if self._closed:
            raise PersiaError("this serving runtime was closed")
        with self._lock:
            _, worker, model = self._follower.state.payload
            result = worker.forward(batch, False)
        return TrainingBatch(batch, result, index, None), model

    def locked(self, fn: Callable[[ShardedStore], Any]) -> Any:
        """``fn(store)`` under the lock lookups take (a consistent read of the served rows)."""
        with self._lock:
            return fn(self.store)

    def submit(
        self, item: TrainingBatch, summed_grad: np.ndarray | None, raw_grads: dict[int, np.ndarray]
    ) -> None:
        """Refused: the store is read-only."""
        raise PersiaError("a serving runtime is read-only: gradients are refused")

    def flush(self, timeout_s: float | None = None) -> None:
        """Nothing is ever pending."""

    @property
    def delta_interval_s(self) -> float | None:
        """None: a serving runtime writes no deltas."""
        return None

    def attach_delta_writer(self, writer: Any) -> None:
        """Refused: a serving runtime writes no deltas."""
        raise PersiaError("a serving runtime is read-only: it writes no deltas")

    def prefetch(self, batch: PersiaBatch) -> None:
        """Nothing: a serving runtime does not train."""

    def recovery_report(self) -> dict[str, Any] | None:
        """None: no shard recovery."""
        return None

    def push_metrics(self) -> None:
        """Nothing to do: the shards are in this process, whose own push reports them."""

    def close(self) -> None:
        """Stops following and refuses further lookups (idempotent)."""
        self._closed = True
        self._follower.close()


class _Skip:
    """A shard of the store that is not the one kept: rows routed to it are dropped."""

    def import_rows(self, dim: int, keys: Any, values: Any, state: Any | None = None) -> None:
        return None

    def remove_rows(self, dim: int, keys: Any) -> int:
        return 0

    def clear(self) -> None:
        return None


class OneShardView:
    """What :class:`persia.store.delta.DeltaReader` needs of a store of ``num_shards`` shards,
    keeping the rows of shard ``rank`` only (an inference-mode server's slice, a recovering
    shard's rows)."""

    def __init__(
        self, shard: Any, rank: int, num_shards: int, optimizer: Any, dims: Any = None
    ) -> None:
        self.optimizer = optimizer
        self.num_shards = num_shards
        self.dims = dims
        self.shards: list[Any] = [_Skip() for _ in range(num_shards)]
        self.shards[rank] = shard

    def shard_of(self, keys: Any) -> np.ndarray:
        return shard_of(keys, self.num_shards)


class ServingShard:
    """Parameter-server shard ``rank`` of ``num_shards`` in inference mode (``job_type: Infer``):
    its rows of a job checkpoint (re-sharded with the fixed :func:`persia.store.shard_of`),
    read-only, following the training job's deltas and new generations (module doc; each shard
    follows on its own, so a request spanning shards sees whole deltas per shard). Serves the
    read side of :class:`persia.rpc.protocol.ShardProtocol`; whatever would change a row is
    refused with :class:`~persia.errors.PersiaError`.

    Args:
        checkpoint_dir, spec, incremental_dir, follow_checkpoint, poll_interval_s: as for
            :class:`ServingRuntime`.
        rank, num_shards: which shard of how many.
    """

    read_only = True

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        rank: int,
        num_shards: int,
        spec: EmbeddingSpec | None = None,
        *,
        incremental_dir: str | os.PathLike[str] | None = None,
        follow_checkpoint: bool = False,
        poll_interval_s: float = 1.0,
    ) -> None:
        if not (0 <= rank < num_shards):
            raise PersiaError(f"rank must be in [0, {num_shards}), got {rank}")
        self.rank, self.num_shards = int(rank), int(num_shards)
        self._given_spec = spec
        self._lock = threading.Lock()
        ckpt = read(checkpoint_dir)
        self.spec = serving_spec(ckpt, spec)
        self._follower = CheckpointFollower(
            checkpoint_dir,
            self._load,
            incremental_dir=incremental_dir,
            follow_checkpoint=follow_checkpoint,
            poll_interval_s=poll_interval_s,
            lock=self._lock,
            first=ckpt,
            name=f"parameter server {rank} of {num_shards} serving",
        )

    def _load(self, ckpt: JobCheckpoint) -> _State:
        from persia.embedding.optim import EmbeddingOptimizer
        from persia.store import Shard
        from persia.store.build import shard_options

        spec = serving_spec(ckpt, self._given_spec if self._given_spec is not None else self.spec)
        try:
            optimizer = EmbeddingOptimizer.from_dict(ckpt.meta["optimizer"])
        except Exception as exc:
            raise CheckpointError(f"{ckpt.path}: bad optimizer in manifest: {exc}") from exc
        shard = Shard(**{**shard_options(spec, self.num_shards), "optimizer": optimizer})
        rows = 0
        meta, arrays = ckpt.meta, ckpt.arrays
        for dim in meta["dims"]:
            for i in range(int(meta["num_shards"])):
                keys = arrays.get(f"s{i}.d{dim}.keys")
                if keys is None:
                    continue
                sel = np.flatnonzero(shard_of(keys, self.num_shards) == self.rank)
                if sel.size:
                    values, state = arrays[f"s{i}.d{dim}.values"], arrays[f"s{i}.d{dim}.state"]
                    try:
                        shard.import_rows(dim, keys[sel], values[sel], state[sel])
                    except StoreError as exc:
                        raise CheckpointError(f"{ckpt.path}: rows cannot be loaded: {exc}") from exc
                    rows += int(sel.size)
        view = OneShardView(shard, self.rank, self.num_shards, optimizer, spec.dims)
        return _State(view, shard, ckpt.path, int(meta.get("delta_seq") or 0), rows)

    @property
    def _shard(self) -> Any:
        return self._follower.state.payload

    def lookup(self, keys: Any, dim: int, training: bool) -> np.ndarray:
        """Evaluation rows (unknown keys: zeros); a training lookup is refused."""
        if training:
            raise PersiaError(
                f"parameter server {self.rank} is in inference mode (job_type: Infer): "
                "training lookups are refused"
            )
        with self._lock:
            return self._shard.lookup(keys, dim, False)  # type: ignore[no-any-return]

    def apply_gradients(self, keys: Any, grads: Any) -> np.ndarray:
        """Refused: the shard is read-only."""
        raise PersiaError(
            f"parameter server {self.rank} is in inference mode (job_type: Infer): gradients "
            "are refused"
        )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._shard.stats()  # type: ignore[no-any-return]

    def export_rows(self, dim: int | None = None) -> dict[int, dict[str, np.ndarray]]:
        with self._lock:
            return self._shard.export_rows(dim)  # type: ignore[no-any-return]

    def import_rows(self, dim: int, keys: Any, values: Any, state: Any | None = None) -> None:
        """Refused: the shard is read-only."""
        raise PersiaError(f"parameter server {self.rank} is in inference mode: read-only")

    def track_changes(self, enabled: bool = True) -> None:
        """Refused (``enabled``): an inference-mode shard writes no deltas."""
        if enabled:
            raise PersiaError(f"parameter server {self.rank} is in inference mode: no deltas")

    @property
    def tracking_changes(self) -> bool:
        return False

    @property
    def changed_count(self) -> int:
        return 0

    def take_changes(self) -> dict[int, dict[str, np.ndarray]]:
        return {}

    def freshness(self) -> dict[str, Any]:
        """:meth:`CheckpointFollower.freshness`, plus this shard's ``rank``."""
        return {**self._follower.freshness(), "rank": self.rank}

    def poll(self) -> None:
        """One poll of the follower."""
        self._follower.poll()

    def close(self) -> None:
        """Stops following (idempotent)."""
        self._follower.close()
