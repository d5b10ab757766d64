"""PERSIA's :class:`InferCtx`: embeddings for a serving handler, from a read-only store.

A handler written for PERSIA (``initialize`` / ``preprocess`` / ``inference`` / ``postprocess``
over ``InferCtx``, requests as :meth:`persia.embedding.data.PersiaBatch.to_bytes`) runs with
``InferCtx([])``: an empty address list serves in this process. The context loads the embedding
checkpoint (``infer_config.embedding_checkpoint`` of ``global_config.yml``, or the
``embedding_checkpoint`` argument) into its own store (a
:class:`persia.checkpoint.follow.ServingRuntime`); lookups behave as in evaluation: an unknown ID
reads as zeros and no row is ever created. The embedding layer (slots, prefixes) is the one the
checkpoint records, or the YAML files given, which must then form keys as training did.

**Following the training job.** With incremental updates (``enable_incremental_update`` and
``incremental_dir`` of ``global_config.yml``, or the ``incremental_dir`` argument) the context
applies the training job's deltas (:mod:`persia.store.delta`, evictions included) on a
background thread (``persia-infer-delta``), polling every ``poll_interval_s``: every complete
delta after the checkpoint's ``delta_seq``, strictly in order, whole (a request sees whole deltas
only). A corrupt delta, or a gap, is refused with one warning and retried at every poll, never
skipped: serving goes on with the last complete state. It also picks up a new generation of the
checkpoint directory (``follow_checkpoint``, on by default while following deltas).
:meth:`InferCtx.freshness` says how far behind the served rows are.

``eval_ctx`` under ``job_type: Infer`` serves from the same runtime
(:func:`persia.ctx._serving.serving_runtime`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from persia.ctx._contexts import EmbeddingCtx, PreprocessMode
from persia.ctx._serving import serving_runtime
from persia.embedding.config import GlobalConfig
from persia.embedding.data import PersiaBatch
from persia.errors import BackendError, PersiaError
from persia.logger import get_default_logger, warn_once
from persia.runtime.pipeline import TrainingBatch

_logger = get_default_logger()

__all__ = ["InferCtx"]


class InferCtx(EmbeddingCtx):
    """Embedding lookups for inference (PERSIA's API), from a read-only embedding store.

    Example (the shape of PERSIA's TorchServe handler)::

        ctx = InferCtx([], global_config_file="global_config.yml")  # infer_config names the ckpt
        ctx.wait_for_serving()
        batch = ctx.get_embedding_from_bytes(request_bytes)
        non_id, embeddings, _ = ctx.prepare_features(batch)
        with torch.no_grad():
            output = jit_model(non_id, embeddings)

    The embedding checkpoint is loaded in the constructor, so the context serves without being
    entered (as a handler keeps it); ``with InferCtx(...) as ctx:`` works too and closes it on
    exit. The dense model is the caller's (e.g. ``torch.jit.load`` of the ``jit_dense.pt`` that
    ``TrainCtx.dump_checkpoint(dir, with_jit_model=True)`` wrote beside the embeddings); pass it
    as ``model`` to use :meth:`forward`. The context never reloads it: a new checkpoint
    generation refreshes the embeddings only (``persia.serving.open_model`` serves both).

    Args:
        embedding_worker_address_list: PERSIA's embedding-worker services. Empty: serve in
            this process (``backend="local"``, the default), or through inference-mode
            parameter-server actors this context starts (``backend="ray"``). Not empty: persia
            has no embedding-worker network service (the embedding worker runs in this
            process), so the addresses themselves are not used (a warning says so): the context
            looks up through the inference-mode parameter servers already running for the job
            ``PERSIA_JOB_NAME`` names on the Ray cluster (``RAY_ADDRESS``, or the head
            ``persia-launcher ray-head`` started), which ``persia-launcher
            embedding-parameter-server`` starts under ``job_type: Infer``. With
            ``backend="local"`` a non-empty list raises :class:`~persia.errors.BackendError`.
        model, embedding_config: see :class:`EmbeddingCtx` (``embedding_config`` is unused
            here: no row is created).
        embedding_checkpoint: the checkpoint directory (what ``dump_checkpoint`` or
            ``dump_embedding`` wrote); default: ``infer_config.embedding_checkpoint`` of
            ``global_config.yml``.
        embedding_config_file, global_config_file: PERSIA's two YAML files, as paths or parsed
            (default: ``$PERSIA_EMBEDDING_CONFIG`` / ``$PERSIA_GLOBAL_CONFIG``). With no
            embedding config at all, the one the checkpoint records is used; one given must
            form keys as the training job's did (slots, dims, groups, prefix bits), else
            :class:`~persia.errors.ConfigError`.
        incremental_dir: follow the deltas in this directory (a persia extension; default: the
            ``incremental_dir`` of ``global_config.yml`` when ``enable_incremental_update`` is
            on, else none are followed).
        follow_checkpoint: pick up new generations of the checkpoint directory (a persia
            extension; default: while following deltas).
        poll_interval_s: how often the delta directory is polled (a persia extension).
        device_id, threadpool_worker_size: see :class:`BaseCtx`.

    Raises:
        BackendError: a non-empty address list with ``backend="local"``; on Ray, the job's
            servers not found or not in inference mode.
        ConfigError: no checkpoint named, a bad YAML file, an embedding config that differs
            from training's, or none known.
        CheckpointError: a missing, corrupt or mismatching checkpoint.
    """

    def __init__(
        self,
        embedding_worker_address_list: Sequence[str] = (),
        *args: Any,
        embedding_checkpoint: str | os.PathLike | None = None,
        incremental_dir: str | os.PathLike | None = None,
        follow_checkpoint: bool | None = None,
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
        addresses = list(embedding_worker_address_list)
        if addresses:
            if kwargs.setdefault("backend", "ray") != "ray":
                raise BackendError(
                    "InferCtx: persia has no embedding-worker services; a non-empty list "
                    f"({addresses}) looks up through the job's inference-mode parameter servers "
                    "on the Ray backend. Pass an empty list to serve in this process, or "
                    f"backend='ray' (or none), got backend={kwargs['backend']!r}",
                    role="embedding-worker",
                )
        elif kwargs.setdefault("backend", "local") not in ("local", "ray"):
            raise PersiaError(
                f"InferCtx: backend must be 'local' or 'ray', got {kwargs['backend']!r}"
            )
        super().__init__(PreprocessMode.INFERENCE, *args, **kwargs)
        from persia.embedding.config import load_global_config

        source = self.global_config_file
        glob = source if isinstance(source, GlobalConfig) else load_global_config(source)
        self.global_config = glob
        runtime: Any
        if self.backend == "ray":
            from persia.runtime import registry

            if addresses:
                warn_once(
                    _logger,
                    "InferCtx.embedding_worker_address_list",
                    f"InferCtx({addresses}): persia has no embedding-worker services (the "
                    "embedding worker runs in this process); it looks up through the "
                    "inference-mode parameter servers of the job PERSIA_JOB_NAME names on the "
                    "Ray cluster (started by persia-launcher embedding-parameter-server under "
                    "job_type: Infer)",
                )
            runtime = registry.inference_backend("ray").build_inference_runtime(
                self.embedding_config_file,
                glob,
                self.embedding_config,
                self.cluster,
                attach=True if addresses else None,
                embedding_checkpoint=embedding_checkpoint,
                incremental_dir=incremental_dir,
                follow_checkpoint=follow_checkpoint,
                poll_interval_s=poll_interval_s,
            )
        else:
            runtime = serving_runtime(
                self.embedding_config_file,
                glob,
                self.embedding_config,
                embedding_checkpoint=embedding_checkpoint,
                incremental_dir=incremental_dir,
                follow_checkpoint=follow_checkpoint,
                poll_interval_s=poll_interval_s,
            )
        self._runtime = runtime
        self.serving = runtime
        self.poll_interval_s = float(poll_interval_s)
        self._saved_training_allowed = False
        self._index = itertools.count()

    @property
    def checkpoint_delta_seq(self) -> int:
        """The delta the served checkpoint generation already held."""
        return int(self.serving.freshness().get("checkpoint_delta_seq") or 0)

    def freshness(self) -> dict[str, Any]:
        """How far behind the training job the served rows are (a persia extension):
        :meth:`persia.checkpoint.follow.ServingRuntime.freshness` (the generation served, the
        last delta applied, its flush time and age, why the next one was refused)."""
        return self.serving.freshness()

    # ------------------------------------------------------------ context protocol
    def _enter(self) -> None:
        if self._runtime is None or self._runtime.closed:
            raise PersiaError("InferCtx: this context was closed")

    def _exit(self) -> None:
        self.close()

    def close(self) -> None:
        """Stops serving: stops following deltas and releases the store (a persia extension;
        idempotent)."""
        self.serving.close()

    def wait_for_serving(self) -> None:
        """Returns once the context can serve (PERSIA's API). In process the checkpoint is
        loaded by the constructor, so this only checks the context is open.

        Raises:
            PersiaError: the context was closed.
        """
        self._enter()

    def _read_only(self, what: str) -> PersiaError:
        return PersiaError(
            f"InferCtx.{what}: an InferCtx serves a read-only store; it picks up a new "
            "generation of its checkpoint directory itself (follow_checkpoint), or create a new "
            "InferCtx on another checkpoint"
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
        index = next(self._index)
        return self.serving.lookup(persia_batch, False, index, None)

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
