"""The model a server serves: one interface over a job-file export and a PERSIA-API checkpoint.

**Interim adapter.** The inference issue adds ``persia.serving.open_model(path, *, follow=None)``
with this same interface (``kind``, ``predict_batch``, ``predict``, ``freshness``, ``close``;
thread-safe). Until it lands, :func:`open_model` here builds the two kinds from what exists:

* an export (``persia export`` / ``persia train --export``): :func:`persia.serving.load`; raw rows
  through the export's recipe (:meth:`~persia.serving.Predictor.predict`), and PersiaBatch
  requests through the same lookup, pooling and model. An export does not follow deltas.
* a checkpoint written by ``TrainCtx.dump_checkpoint(dir, with_jit_model=True)``: an in-process
  :class:`persia.ctx.InferCtx` (read-only store; following ``follow`` when given) and the
  TorchScript dense model ``jit_dense.pt`` beside it. A checkpoint carries no raw-row recipe, so
  :meth:`predict` refuses rows; its slots come from PERSIA's ``embedding_config.yml``.
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from persia.embedding.data import PersiaBatch
from persia.errors import BatchError, CheckpointError, ConfigError, PersiaError

__all__ = ["ServedModel", "RowsNotSupported", "open_model", "JIT_FILENAME"]

#: The TorchScript dense model ``dump_checkpoint(with_jit_model=True)`` writes by default.
JIT_FILENAME = "jit_dense.pt"


class RowsNotSupported(PersiaError):
    """Raw JSON rows were sent to a model without a raw-row recipe (a checkpoint)."""


@runtime_checkable
class ServedModel(Protocol):
    """What a server needs of a model. Every method is safe to call from several threads."""

    @property
    def kind(self) -> Literal["export", "checkpoint"]:
        """``"export"`` (serves raw rows and batches) or ``"checkpoint"`` (batches only)."""
        ...

    def predict_batch(self, batch: PersiaBatch) -> np.ndarray:
        """The model's output for a :class:`PersiaBatch` (first axis: the samples)."""
        ...

    def predict(self, rows: Any) -> np.ndarray:
        """Probabilities for raw request rows (exports only: :class:`RowsNotSupported`)."""
        ...

    def freshness(self) -> dict[str, Any]:
        """How far behind the training job the served rows are (InferCtx's keys)."""
        ...

    def close(self) -> None:
        """Releases the model (idempotent)."""
        ...


def _no_deltas() -> dict[str, Any]:
    return {
        "incremental_dir": None,
        "checkpoint_delta_seq": None,
        "last_delta_seq": None,
        "last_delta_flushed_unix_s": None,
        "age_s": None,
        "last_error": None,
    }


class _ExportModel:
    """A job-file export (:class:`persia.serving.Predictor`)."""

    kind: Literal["export"] = "export"

    def __init__(self, directory: Path) -> None:
        from persia.serving import load

        self.path = directory
        self.predictor = load(directory)
        self._slots = {str(s["name"]): s for s in self.predictor.meta["slots"]}

    def predict(self, rows: Any) -> np.ndarray:
        return self.predictor.predict(rows)

    def predict_batch(self, batch: PersiaBatch) -> np.ndarray:
        from persia.worker import pooling

        p = self.predictor
        given = {f.name: f for f in batch.id_type_features}
        unknown = sorted(set(given) - set(self._slots))
        if unknown:
            raise BatchError(
                f"ID feature(s) {', '.join(map(repr, unknown))} are not slots of this model "
                f"(slots: {', '.join(self._slots)})"
            )
        embeddings = []
        for name, slot in self._slots.items():
            feature = given.get(name)
            if feature is None:
                raise BatchError(f"id_type_features: slot {name!r} is missing from the batch")
            keys = pooling.add_prefix(feature.values, int(slot["prefix"]), int(slot["prefix_bits"]))
            uniques, inverse = pooling.unique_inverse(keys)
            emb = p._lookup(int(slot["dim"]), uniques)
            if slot["pooling"] == "raw":
                out, _ = pooling.pool_raw_forward(
                    feature.lengths, inverse, emb, int(slot["sample_fixed_size"])
                )
            else:
                out = pooling.pool_forward(feature.lengths, inverse, emb, slot["pooling"])
            embeddings.append(torch.from_numpy(out))
        non_id = [torch.from_numpy(f.data) for f in batch.non_id_type_features]
        width = len(p.meta["dense"])
        if width and (len(non_id) != 1 or tuple(non_id[0].shape[1:]) != (width,)):
            shapes = [tuple(t.shape) for t in non_id]
            raise BatchError(
                f"non_id_type_features: this model reads one float32 array of shape "
                f"(batch, {width}), got shapes {shapes}"
            )
        with torch.no_grad():
            result: torch.Tensor = p.model(non_id, embeddings)
            if p.logits:
                result = torch.sigmoid(result)
        return result.detach().cpu().numpy().astype(np.float32, copy=False)

    def freshness(self) -> dict[str, Any]:
        return _no_deltas()

    def close(self) -> None:
        pass


class _CheckpointModel:
    """A PERSIA-API checkpoint with its TorchScript dense model, served by an InferCtx."""

    kind: Literal["checkpoint"] = "checkpoint"

    def __init__(
        self,
        directory: Path,
        *,
        follow: str | os.PathLike[str] | None,
        embedding_config: Any,
        global_config: Any,
        poll_interval_s: float,
        jit_filename: str,
    ) -> None:
        from persia.ctx import InferCtx

        self.path = directory
        jit = directory / jit_filename
        if not jit.is_file():
            raise CheckpointError(
                f"{directory}: no {jit_filename} (write the checkpoint with "
                "TrainCtx.dump_checkpoint(dir, with_jit_model=True))"
            )
        try:
            with warnings.catch_warnings():  # TorchScript is marked deprecated by torch
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(io.BytesIO(jit.read_bytes()))
        except Exception as exc:
            raise CheckpointError(f"{jit}: the TorchScript model cannot be loaded: {exc}") from exc
        self.model.eval()
        kwargs: dict[str, Any] = {}
        if embedding_config is not None:
            kwargs["embedding_config_file"] = embedding_config
        if global_config is not None:
            kwargs["global_config_file"] = global_config
        self.ctx = InferCtx(
            [],
            embedding_checkpoint=directory,
            incremental_dir=follow,
            poll_interval_s=poll_interval_s,
            **kwargs,
        )
        self.ctx.wait_for_serving()
        # prepare_features records the context's current batch: one request at a time there
        self._features_lock = threading.Lock()

    def predict(self, rows: Any) -> np.ndarray:
        raise RowsNotSupported(
            f"{self.path} is a PERSIA-API checkpoint: it has no raw-row recipe, so it serves "
            "PersiaBatch.to_bytes() requests only (a job-file export serves raw rows)"
        )

    def predict_batch(self, batch: PersiaBatch) -> np.ndarray:
        item = self.ctx.get_embedding_from_data(batch)
        with self._features_lock:
            non_id, embeddings, _ = self.ctx.prepare_features(item)
            self.ctx.current_batch = None
        with torch.no_grad():
            out = self.model(non_id, embeddings)
        if not isinstance(out, torch.Tensor):
            raise PersiaError(
                f"the dense model returned {type(out).__name__}; a served model must return "
                "one tensor"
            )
        return out.detach().cpu().numpy()

    def freshness(self) -> dict[str, Any]:
        return self.ctx.freshness()

    def close(self) -> None:
        self.ctx.close()


def _is_export(directory: Path) -> bool:
    from persia.serving import KIND
    from persia.store.checkpoint import current_generation

    try:
        gen = current_generation(directory)
        manifest = json.loads((gen / "manifest.json").read_text())
    except (OSError, ValueError, CheckpointError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == KIND


def open_model(
    path: str | os.PathLike[str],
    *,
    follow: str | os.PathLike[str] | None = None,
    embedding_config: Any = None,
    global_config: Any = None,
    poll_interval_s: float = 0.25,
    jit_filename: str = JIT_FILENAME,
) -> ServedModel:
    """Opens a job-file export or a PERSIA-API checkpoint for serving.

    Args:
        path: an export directory, or a checkpoint directory holding ``jit_dense.pt``.
        follow: a checkpoint follows the training job's deltas in this directory (None: the
            ``incremental_dir`` of ``global_config`` when ``enable_incremental_update`` is on).
        embedding_config, global_config: a checkpoint's PERSIA YAML files (paths or parsed;
            default ``$PERSIA_EMBEDDING_CONFIG`` / ``$PERSIA_GLOBAL_CONFIG``).
        poll_interval_s: how often the delta directory is polled.
        jit_filename: the TorchScript file inside a checkpoint directory.

    Raises:
        ConfigError: ``follow`` given for an export, or no such directory.
        CheckpointError: a missing, corrupt or mismatching export or checkpoint.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory (an export or a checkpoint)")
    if _is_export(directory):
        if follow is not None:
            raise ConfigError(
                f"{directory} is a job-file export, which does not follow deltas; serve a "
                "checkpoint written by dump_checkpoint(with_jit_model=True) to follow them"
            )
        return _ExportModel(directory)
    return _CheckpointModel(
        directory,
        follow=follow,
        embedding_config=embedding_config,
        global_config=global_config,
        poll_interval_s=poll_interval_s,
        jit_filename=jit_filename,
    )
