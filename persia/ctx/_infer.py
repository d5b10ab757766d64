"""PERSIA's :class:`InferCtx`: embeddings for a serving handler, from a read-only store.

A handler written for PERSIA (``initialize`` / ``preprocess`` / ``inference`` / ``postprocess``
over ``InferCtx``, requests as :meth:`persia.embedding.data.PersiaBatch.to_bytes`) runs with
``InferCtx([])``: an empty address list serves in this process. The context loads the embedding
checkpoint (``infer_config.embedding_checkpoint`` of ``global_config.yml``, or the
``embedding_checkpoint`` argument) into its own store; lookups behave as in evaluation: an unknown
ID reads as zeros and no row is ever created.

**Following the training job.** With incremental updates (``enable_incremental_update`` and
``incremental_dir`` of ``global_config.yml``, or the ``incremental_dir`` argument) the context
applies the training job's deltas (:mod:`persia.store.delta`) on a background thread
(``persia-infer-delta``), polling every ``poll_interval_s``: every complete delta after the
checkpoint's ``delta_seq``, strictly in order, with the same :class:`~persia.store.delta.DeltaReader`
shard recovery uses. A delta is read and verified whole before its rows are written, and written
under the lock lookups take, so a request sees whole deltas only. A corrupt delta, or a gap, is
refused with one warning and retried at every poll, never skipped: serving goes on with the last
complete state, and the later deltas wait behind it. :meth:`InferCtx.freshness` says how far
behind the served rows are.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persia.ctx._contexts import EmbeddingCtx, PreprocessMode
from persia.embedding.data import PersiaBatch
from persia.errors import BackendError, ConfigError, PersiaError
from persia.logger import get_default_logger
from persia.runtime.pipeline import Runtime, TrainingBatch
from persia.store.delta import DeltaReader

_logger = get_default_logger()


class InferCtx(EmbeddingCtx):
    """Embedding lookups for inference (PERSIA's API), from a read-only embedding store.

    Example (the shape of PERSIA's TorchServe handler)::

        ctx = InferCtx([], embedding_config_file="embedding_config.yml",
                       global_config_file="global_config.yml")   # infer_config names the ckpt
        ctx.wait_for_serving()
        batch = ctx.get_embedding_from_bytes(request_bytes)
        non_id, embeddings, _ = ctx.prepare_features(batch)
        with torch.no_grad():
            output = jit_model(non_id, embeddings)

    The embedding checkpoint is loaded in the constructor, so the context serves without being
    entered (as a handler keeps it); ``with InferCtx(...) as ctx:`` works too and closes it on
    exit. The dense model is the caller's (e.g. ``torch.jit.load`` of the ``jit_dense.pt`` that
    ``TrainCtx.dump_checkpoint(dir, with_jit_model=True)`` wrote beside the embeddings); pass it
    as ``model`` to use :meth:`forward`.

    Args:
        embedding_worker_address_list: PERSIA's embedding-worker services. Must be empty:
            serve in this process (persia has no embedding-worker network service; a non-empty
            list raises :class:`~persia.errors.BackendError`).
        model, embedding_config: see :class:`EmbeddingCtx` (``embedding_config`` is unused
            here: no row is created).
        embedding_checkpoint: the checkpoint directory (what ``dump_checkpoint`` or
            ``dump_embedding`` wrote); default: ``infer_config.embedding_checkpoint`` of
            ``global_config.yml``.
        embedding_config_file, global_config_file: PERSIA's two YAML files, as paths or parsed
            (default: ``$PERSIA_EMBEDDING_CONFIG`` / ``$PERSIA_GLOBAL_CONFIG``); the slots and
            prefix bits must be the training job's.
        incremental_dir: follow the deltas in this directory (a persia extension; default: the
            ``incremental_dir`` of ``global_config.yml`` when ``enable_incremental_update`` is
            on, else none are followed).
        poll_interval_s: how often the delta directory is polled (a persia extension).
        device_id, threadpool_worker_size: see :class:`BaseCtx`.

    Raises:
        BackendError: a non-empty address list.
        ConfigError: no checkpoint named, or a bad YAML file.
        CheckpointError: a missing, corrupt or mismatching checkpoint.
    """

    def __init__(
        self,
        embedding_worker_address_list: Sequence[str] = (),
        *args: Any,
        embedding_checkpoint: str | os.PathLike | None = None,
        incremental_dir: str | os.PathLike | None = None,
        poll_interval_s: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if isinstance(poll_interval_s, bool) or not (
            isinstance(poll_interval_s, (int, float)) and poll_interval_s > 0
        ):
            raise PersiaError(f"InferCtx: poll_interval_s must be > 0, got {poll_interval_s!r}")
        if isinstance(embedding_worker_address_list, str) or not isinstance(
            embedding_worker_address_list, Sequence
        ):
            raise PersiaError(
                "InferCtx: embedding_worker_address_list must be a list of 'host:port' strings, "
                f"got {embedding_worker_address_list!r}"
            )
        if len(embedding_worker_address_list):
            raise BackendError(
                "InferCtx over embedding-worker services is not available in persia (its "
                "embedding workers run inside the NN workers, with no network service); pass an "
                f"empty list to serve in this process, got {list(embedding_worker_address_list)}",
                role="embedding-worker",
            )
        if kwargs.setdefault("backend", "local") != "local":
            raise PersiaError(
                f"InferCtx serves in this process: backend must be 'local', got {kwargs['backend']!r}"
            )
        super().__init__(PreprocessMode.INFERENCE, *args, **kwargs)
        from persia import checkpoint
        from persia.embedding.config import GlobalConfig, load_global_config, load_spec
        from persia.rpc.local import local_parameter_servers
        from persia.store.build import build_store
        from persia.worker.embedding_worker import EmbeddingWorker

        source = self.global_config_file
        glob = source if isinstance(source, GlobalConfig) else load_global_config(source)
        self.global_config = glob
        infer = glob.common_config.infer_config
        if embedding_checkpoint is None and infer is not None:
            embedding_checkpoint = infer.embedding_checkpoint
        if embedding_checkpoint is None:
            raise ConfigError(
                "InferCtx needs an embedding checkpoint: pass embedding_checkpoint=... or set "
                "common_config.infer_config.embedding_checkpoint in global_config.yml"
            )
        self.embedding_checkpoint = Path(embedding_checkpoint)
        spec = load_spec(self.embedding_config_file, glob, self.embedding_config, None)
        ckpt = checkpoint.read(self.embedding_checkpoint)
        store = build_store(spec)
        checkpoint.restore_store(store, ckpt)
        self.checkpoint_delta_seq = int(ckpt.meta.get("delta_seq") or 0)
        worker = EmbeddingWorker.from_spec(spec, local_parameter_servers(store))
        runtime = Runtime(worker, store, backward_buffer_size=1)
        runtime.training_allowed = False
        self._runtime = runtime
        self._saved_training_allowed = False
        #: held by a lookup, and by whatever changes rows, so a request sees whole updates only
        self._rows_lock = threading.Lock()
        self._index = 0
        _logger.info(
            "InferCtx: serving %d embedding rows of %s", int(ckpt.meta.get("rows") or 0), ckpt.path
        )
        ps = glob.embedding_parameter_server_config
        if incremental_dir is None and ps.enable_incremental_update:
            incremental_dir = ps.incremental_dir
        self.incremental_dir = None if incremental_dir is None else Path(incremental_dir)
        self.poll_interval_s = float(poll_interval_s)
        self._delta_reader: DeltaReader | None = None
        self._delta_error: str | None = None
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        if self.incremental_dir is not None:
            self._delta_reader = DeltaReader(self.incremental_dir, self.checkpoint_delta_seq)
            self._poll_deltas()  # serve the newest complete state from the first request on
            self._follower = threading.Thread(
                target=self._follow, name="persia-infer-delta", daemon=True
            )
            self._follower.start()

    # ------------------------------------------------------------ deltas
    def _follow(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self._poll_deltas()

    def _poll_deltas(self) -> list[int]:
        """Applies the complete deltas not applied yet; a refused one is logged (once per
        distinct error) and retried at the next poll. Never raises: serving goes on."""
        reader = self._delta_reader
        if reader is None:
            return []
        before = reader.last_seq
        try:
            reader.apply_pending(self.runtime.store, lock=self._rows_lock)
        except Exception as exc:  # a refused delta must not stop serving
            message = f"{type(exc).__name__}: {exc}"
            if message != self._delta_error:
                _logger.warning(
                    "InferCtx: delta %d refused, serving the state after delta %d: %s",
                    reader.last_seq + 1,
                    reader.last_seq,
                    message,
                )
            self._delta_error = message
        else:
            self._delta_error = None
        return list(range(before + 1, reader.last_seq + 1))

    def freshness(self) -> dict[str, Any]:
        """How far behind the training job the served rows are (a persia extension).

        Returns:
            ``{"incremental_dir", "checkpoint_delta_seq", "last_delta_seq",
            "last_delta_flushed_unix_s", "age_s", "last_error"}``: the delta directory followed
            (None: none), the delta the checkpoint already held, the last delta applied, when the
            training job flushed it and how many seconds ago that was (None before any delta),
            and why the next delta was refused at the last poll (None: it was not).
        """
        reader = self._delta_reader
        flushed = None if reader is None else reader.last_flushed_unix_s
        return {
            "incremental_dir": None if self.incremental_dir is None else str(self.incremental_dir),
            "checkpoint_delta_seq": self.checkpoint_delta_seq,
            "last_delta_seq": self.checkpoint_delta_seq if reader is None else reader.last_seq,
            "last_delta_flushed_unix_s": flushed,
            "age_s": None if flushed is None else max(0.0, time.time() - flushed),
            "last_error": self._delta_error,
        }

    # ------------------------------------------------------------ context protocol
    def _enter(self) -> None:
        if self._runtime is None or self._runtime.closed:
            raise PersiaError("InferCtx: this context was closed")

    def _exit(self) -> None:
        self.close()

    def close(self) -> None:
        """Stops serving: stops following deltas and releases the store (a persia extension;
        idempotent)."""
        self._stop.set()
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.join()
        runtime = self._runtime
        if runtime is not None and not runtime.closed:
            runtime.close()

    def wait_for_serving(self) -> None:
        """Returns once the context can serve (PERSIA's API). In process the checkpoint is
        loaded by the constructor, so this only checks the context is open.

        Raises:
            PersiaError: the context was closed.
        """
        self._enter()

    def _read_only(self, what: str) -> PersiaError:
        return PersiaError(
            f"InferCtx.{what}: an InferCtx serves a read-only store; create a new InferCtx on "
            "the new checkpoint instead"
        )

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: the store is read-only (raises :class:`~persia.errors.PersiaError`)."""
        raise self._read_only("load_checkpoint")

    def load_embedding(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the store is read-only (raises :class:`~persia.errors.PersiaError`)."""
        raise self._read_only("load_embedding")

    def clear_embeddings(self) -> None:
        """Refused: the store is read-only (raises :class:`~persia.errors.PersiaError`)."""
        raise self._read_only("clear_embeddings")

    # ------------------------------------------------------------ lookups
    def get_embedding_from_data(
        self, persia_batch: PersiaBatch, device_id: int | None = None
    ) -> TrainingBatch:
        """Looks up the embeddings of ``persia_batch`` (no row is created; unknown IDs read as
        zeros). ``device_id``, if given, must be the context's (tensors go to its device in
        :meth:`prepare_features`)."""
        if not isinstance(persia_batch, PersiaBatch):
            raise PersiaError(
                f"get_embedding_from_data expects a PersiaBatch, got {type(persia_batch).__name__}"
            )
        self._check_device(device_id)
        self._enter()
        runtime = self.runtime
        with self._rows_lock:
            index = self._index
            self._index += 1
            return runtime.lookup(persia_batch, False, index, None)

    def get_embedding_from_bytes(self, data: bytes, device_id: int | None = None) -> TrainingBatch:
        """:meth:`get_embedding_from_data` of :meth:`PersiaBatch.from_bytes` ``(data)``.

        Raises:
            BatchError: ``data`` is not a valid batch (see :meth:`PersiaBatch.from_bytes`).
        """
        return self.get_embedding_from_data(PersiaBatch.from_bytes(data), device_id)

    def _check_device(self, device_id: int | None) -> None:
        if device_id is None or (device_id < 0 and self.device_id is None):
            return
        if device_id != self.device_id:
            here = "the CPU" if self.device_id is None else f"CUDA device {self.device_id}"
            raise PersiaError(
                f"device_id={device_id}: this InferCtx puts tensors on {here} (its device_id); "
                "create one context per device"
            )
