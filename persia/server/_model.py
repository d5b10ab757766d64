"""The model a server serves: what :func:`persia.serving.open_model` opens, plus what ``persia
serve`` adds on top of it.

* :class:`ServedModel`: the interface the front ends use (``persia.serving.ServedModel`` has it;
  so may a test's stand-in). A checkpoint's :meth:`~ServedModel.predict` raises
  :class:`persia.serving.RowsNotSupported`, which the HTTP front end answers with 409.
* :func:`open_model`: :func:`persia.serving.open_model` with the command line's defaults for a
  checkpoint: PERSIA's ``embedding_config.yml`` from ``$PERSIA_EMBEDDING_CONFIG`` when none is
  given (only needed by a checkpoint that records no embedding layer), and the delta directory
  to follow from ``global_config.yml`` (``incremental_dir`` when ``enable_incremental_update``
  is on) when ``follow`` is not given.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from persia import _settings
from persia.embedding.data import PersiaBatch
from persia.errors import CheckpointError, ConfigError
from persia.serving.model import CHECKPOINT_KIND, EXPORT_KIND, RowsNotSupported

__all__ = ["ServedModel", "RowsNotSupported", "open_model"]


@runtime_checkable
class ServedModel(Protocol):
    """What a server needs of a model. Every method is safe to call from several threads."""

    @property
    def kind(self) -> str:
        """``"export"`` (serves raw rows and batches) or ``"checkpoint"`` (batches only)."""
        ...

    def predict_batch(self, batch: PersiaBatch) -> np.ndarray:
        """The model's output for a :class:`PersiaBatch` (first axis: the samples)."""
        ...

    def predict(self, rows: Any) -> np.ndarray:
        """Probabilities for raw request rows (exports only: :class:`RowsNotSupported`)."""
        ...

    def freshness(self) -> dict[str, Any] | None:
        """How far behind the training job the served rows are (None: a static model)."""
        ...

    def close(self) -> None:
        """Releases the model (idempotent)."""
        ...


def open_model(
    path: str | os.PathLike[str],
    *,
    follow: str | os.PathLike[str] | None = None,
    embedding_config: Any = None,
    global_config: str | os.PathLike[str] | None = None,
    poll_interval_s: float = 0.25,
) -> ServedModel:
    """Opens a job-file export or a PERSIA-API checkpoint for serving
    (:func:`persia.serving.open_model`, with the defaults of the module docstring).

    Args:
        path: an export directory, or a checkpoint directory written by
            ``TrainCtx.dump_checkpoint(dir, with_jit_model=True)``.
        follow: a checkpoint follows the training job's deltas in this directory (None: the
            ``incremental_dir`` of ``global_config`` when ``enable_incremental_update`` is on).
        embedding_config: a checkpoint's PERSIA ``embedding_config.yml`` (path or parsed; default
            ``$PERSIA_EMBEDDING_CONFIG``), checked against the layer the checkpoint records.
        global_config: a checkpoint's ``global_config.yml`` (default ``$PERSIA_GLOBAL_CONFIG``).
        poll_interval_s: how often the delta directory is polled.

    Raises:
        ConfigError: ``global_config`` given for an export, or a bad YAML file.
        CheckpointError: no such directory, neither kind, or a corrupt one.
        PersiaError: ``follow`` or ``embedding_config`` given for an export.
    """
    from persia.serving import open_model as open_served
    from persia.store.checkpoint import current_kind

    try:
        kind: str | None = current_kind(path)
    except CheckpointError:
        kind = None  # persia.serving.open_model says why
    if kind == EXPORT_KIND and global_config is not None:
        raise ConfigError(
            f"{path} is a job-file export: it reads no global_config.yml (--global-config is "
            "for a PERSIA-API checkpoint)"
        )
    if kind == CHECKPOINT_KIND:
        if embedding_config is None:
            embedding_config = _settings.env_path(_settings.PERSIA_EMBEDDING_CONFIG)
        if follow is None:
            from persia.embedding.config import load_global_config

            ps = load_global_config(global_config).embedding_parameter_server_config
            if ps.enable_incremental_update:
                follow = ps.incremental_dir
    model: ServedModel = open_served(
        path, follow=follow, poll_interval_s=poll_interval_s, embedding_config=embedding_config
    )
    return model
