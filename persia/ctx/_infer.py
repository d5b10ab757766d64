"""PERSIA's :class:`InferCtx`: embeddings for a serving handler, from a read-only store.

A handler written for PERSIA (``initialize`` / ``preprocess`` / ``inference`` / ``postprocess``
over ``InferCtx``, requests as :meth:`persia.embedding.data.PersiaBatch.to_bytes`) runs with
``InferCtx([])``: an empty address list serves in this process. The context loads the embedding
checkpoint (``infer_config.embedding_checkpoint`` of ``global_config.yml``, or the
``embedding_checkpoint`` argument) into its own store; lookups behave as in evaluation: an unknown
ID reads as zeros and no row is ever created.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persia.ctx._contexts import EmbeddingCtx, PreprocessMode
from persia.embedding.data import PersiaBatch
from persia.errors import BackendError, ConfigError, PersiaError
from persia.logger import get_default_logger
from persia.runtime.pipeline import Runtime, TrainingBatch

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
        **kwargs: Any,
    ) -> None:
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

    # ------------------------------------------------------------ context protocol
    def _enter(self) -> None:
        if self._runtime is None or self._runtime.closed:
            raise PersiaError("InferCtx: this context was closed")

    def _exit(self) -> None:
        self.close()

    def close(self) -> None:
        """Stops serving: releases the store (a persia extension; idempotent)."""
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
