"""One serving path for both kinds of model: :func:`open_model` recognises a directory and returns
one object that predicts.

* A **serving export** (``persia train --export`` / ``persia export``, kind ``"persia-serving"``):
  a snapshot of the embeddings, the TorchScript model and the request recipe.
  :meth:`ServedModel.predict` takes raw rows; :meth:`ServedModel.predict_batch` takes a
  :class:`~persia.embedding.data.PersiaBatch` of IDs (as the job reader makes them). Both give
  probabilities.
* A **job checkpoint** written by the PERSIA API (``TrainCtx.dump_checkpoint(dir,
  with_jit_model=True)``, kind ``"persia-job"``): the embeddings, the TorchScript model and the
  embedding layer (slots, key prefixes) inside one generation, so no YAML file is needed.
  :meth:`ServedModel.predict_batch` takes a ``PersiaBatch`` and gives the model's outputs;
  :meth:`ServedModel.predict` is refused (a checkpoint carries no recipe from raw rows to IDs).
  With ``follow=INCREMENTAL_DIR`` it follows the training job: its deltas (evictions included)
  and the new generations of the checkpoint directory, which bring a new dense model too
  (:class:`persia.checkpoint.follow.ServingRuntime`).

Every method may be called from several threads at once, also while deltas or a new generation
are applied: the embedding lookup of one request and the dense model it runs through come from
one state (whole deltas, one generation).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persia.embedding.data import PersiaBatch
from persia.embedding.spec import SlotSpec
from persia.errors import BatchError, CheckpointError, PersiaError
from persia.rpc.base import PARAMETER_SERVER, ParameterServerClient
from persia.rpc.local import LocalTransport
from persia.store.checkpoint import current_kind
from persia.store.table import decode_rows
from persia.worker.embedding_worker import EmbeddingWorker
from persia.worker.protocol import LookupResult

__all__ = ["ServedModel", "ExportModel", "CheckpointModel", "RowsNotSupported", "open_model"]

#: the manifest kinds :func:`open_model` recognises
EXPORT_KIND = "persia-serving"
CHECKPOINT_KIND = "persia-job"


class RowsNotSupported(PersiaError):
    """Raw rows were given to a model without a raw-row recipe (a PERSIA-API checkpoint, which
    predicts on :class:`~persia.embedding.data.PersiaBatch` requests only)."""


def _check_batch(batch: Any) -> PersiaBatch:
    if not isinstance(batch, PersiaBatch):
        raise BatchError(f"predict_batch expects a PersiaBatch, got {type(batch).__name__}")
    return batch


def embedding_tensors(lookup: LookupResult) -> list[torch.Tensor]:
    """The model's embedding inputs of a lookup, in the batch's ID-feature order (summed slots
    ``(batch, dim)``, raw ones ``(batch, sample_fixed_size, dim + 1)``), on the CPU: what
    ``prepare_features`` gives an evaluation context."""
    summed = torch.from_numpy(lookup.summed)
    out = []
    for kind, where, dim in lookup.layout:
        out.append(
            summed[:, where : where + dim] if kind == "sum" else torch.from_numpy(lookup.raw[where])
        )
    return out


def _as_numpy(out: Any, probability: bool) -> np.ndarray:
    if not isinstance(out, torch.Tensor):
        raise PersiaError(
            f"the dense model returned {type(out).__name__}, expected one tensor of outputs"
        )
    if probability:
        out = torch.sigmoid(out)
    arr = out.detach().to("cpu").numpy().astype(np.float32, copy=False)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.reshape(-1)
    return arr


class ServedModel:
    """What :func:`open_model` returns (an :class:`ExportModel` or a :class:`CheckpointModel`).

    Attributes:
        kind: ``"export"`` or ``"checkpoint"``.
        path: the directory opened.
    """

    kind: str
    path: Path

    def predict_batch(self, batch: PersiaBatch) -> np.ndarray:
        """The model's outputs for a batch of IDs (float32; ``(n,)`` when the model gives one
        output per sample). Unknown IDs read as zeros.

        Raises:
            BatchError: not a batch, or one whose features do not fit the model.
        """
        raise NotImplementedError

    def predict(self, rows: Any) -> np.ndarray:
        """Probabilities (float32, one per row) for raw request rows (exports only).

        Raises:
            RowsNotSupported: a checkpoint (no raw-row recipe); BatchError: bad rows.
        """
        raise NotImplementedError

    def freshness(self) -> dict[str, Any] | None:
        """How far behind training the served state is (None: a static snapshot that follows
        nothing); see :meth:`persia.checkpoint.follow.ServingRuntime.freshness`."""
        return None

    def info(self) -> dict[str, Any]:
        """A JSON description: kind, path, the ID slots the model reads (name, dim, pooling,
        prefix) in its input order, and what the outputs are."""
        raise NotImplementedError

    def close(self) -> None:
        """Stops following (if it does) and refuses further predictions (idempotent)."""
        self._closed = True

    _closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise PersiaError(f"{self.path}: this model was closed")

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _SortedRows:
    """A read-only parameter-server shard over an export's sorted keys (unknown: zeros)."""

    def __init__(self, tables: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        self.tables = tables

    def lookup(self, keys: np.ndarray, dim: int, training: bool) -> np.ndarray:
        stored, values = self.tables[dim]
        rows = np.zeros((keys.shape[0], dim), dtype=np.float32)
        if stored.shape[0]:
            at = np.minimum(np.searchsorted(stored, keys), stored.shape[0] - 1)
            hit = stored[at] == keys
            rows[hit] = decode_rows(values[at[hit]])
        return rows


class ExportModel(ServedModel):
    """A serving export (see :func:`persia.serving.load`), opened by :func:`open_model`.

    Attributes:
        predictor: the :class:`persia.serving.Predictor` (raw rows).
    """

    kind = "export"

    def __init__(self, path: Path, predictor: Any) -> None:
        self.path = path
        self.predictor = predictor
        meta = predictor.meta
        self._slots = list(meta["slots"])
        bits = {int(s["prefix_bits"]) for s in self._slots}
        if len(bits) != 1:
            raise CheckpointError(f"{predictor.path}: the slots disagree on prefix_bits: {bits}")
        specs = [
            SlotSpec(
                name=s["name"],
                dim=int(s["dim"]),
                pooling=s["pooling"],
                prefix=int(s["prefix"]),
                sample_fixed_size=int(s["sample_fixed_size"]),
            )
            for s in self._slots
        ]
        client = ParameterServerClient(
            LocalTransport({PARAMETER_SERVER: [_SortedRows(predictor.tables)]}),
            lambda keys, n: np.zeros(keys.shape[0], dtype=np.int32),
        )
        self._worker = EmbeddingWorker(specs, bits.pop(), client)
        self._worker_lock = threading.Lock()  # the worker reuses its de-duplication buffers
        self._dense = len(meta["dense"])

    def predict(self, rows: Any) -> np.ndarray:
        self._check_open()
        return self.predictor.predict(rows)  # type: ignore[no-any-return]

    def predict_batch(self, batch: PersiaBatch) -> np.ndarray:
        """Probabilities (float32, one per sample) for a batch of IDs as the job reader makes
        them: one ID feature per slot, in the export's slot order, and (if the model reads dense
        columns) one non-ID feature ``float32 (n, columns)`` already cleaned and standardised.

        Raises:
            BatchError: other features, another order, or another dense shape.
        """
        self._check_open()
        batch = _check_batch(batch)
        names = [f.name for f in batch.id_type_features]
        want = [s["name"] for s in self._slots]
        if names != want:
            raise BatchError(
                f"predict_batch: the export reads the ID features {want} in this order, got {names}"
            )
        dense = batch.non_id_type_features
        n = batch.batch_size
        if self._dense:
            if len(dense) != 1 or dense[0].data.shape != (n, self._dense):
                raise BatchError(
                    f"predict_batch: the export reads one non-ID feature float32 ({n}, "
                    f"{self._dense}) (the dense columns {self.predictor.columns[len(want) :]}), "
                    f"got {[f.data.shape for f in dense]}"
                )
            non_id = [torch.from_numpy(np.asarray(dense[0].data, dtype=np.float32))]
        else:
            if dense:
                raise BatchError(
                    f"predict_batch: the export reads no non-ID feature, got {len(dense)}"
                )
            non_id = []
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        with self._worker_lock:
            lookup = self._worker.forward(batch, False)
        with torch.no_grad():
            out = self.predictor.model(non_id, embedding_tensors(lookup))
        return _as_numpy(out, self.predictor.logits).reshape(-1)

    def info(self) -> dict[str, Any]:
        meta = self.predictor.meta
        return {
            "kind": self.kind,
            "path": str(self.path),
            "generation": str(self.predictor.path),
            "slots": [
                {k: s[k] for k in ("name", "column", "dim", "pooling", "prefix", "prefix_bits")}
                for s in self._slots
            ],
            "dense_columns": [d["name"] for d in meta["dense"]],
            "columns": self.predictor.columns,
            "output": "probability",
            "label_meaning": self.predictor.label_meaning,
        }


class CheckpointModel(ServedModel):
    """A PERSIA-API job checkpoint with its TorchScript model, opened by :func:`open_model`.

    Attributes:
        runtime: the :class:`persia.checkpoint.follow.ServingRuntime` serving it.
    """

    kind = "checkpoint"

    def __init__(self, path: Path, runtime: Any) -> None:
        self.path = path
        self.runtime = runtime

    def predict_batch(self, batch: PersiaBatch) -> np.ndarray:
        """The model's outputs (float32; ``(n,)`` for one output per sample) for a batch of IDs
        formed as in training (the slot names of the checkpoint's embedding config, the same
        uint64 IDs; persia adds the prefixes), with the non-ID features the model reads.

        Raises:
            BatchError: not a batch, an ID feature that is not a slot of the checkpoint, or
                features the dense model cannot take.
        """
        self._check_open()
        batch = _check_batch(batch)
        item, model = self.runtime.lookup_with_model(batch)
        non_id = [torch.from_numpy(f.data) for f in batch.non_id_type_features]
        embeddings = embedding_tensors(item.lookup)
        try:
            with torch.no_grad():
                out = model(non_id, embeddings)
        except Exception as exc:  # TorchScript raises its own errors for inputs it cannot take
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise BatchError(
                "predict_batch: the dense model cannot run on this batch (non-ID features "
                f"{[tuple(t.shape) for t in non_id]}, embeddings "
                f"{[tuple(t.shape) for t in embeddings]}): {first}"
            ) from exc
        return _as_numpy(out, False)

    def predict(self, rows: Any) -> np.ndarray:
        raise RowsNotSupported(
            f"{self.path} is a PERSIA-API checkpoint: it carries no recipe from raw rows to "
            "IDs (the training script formed them), so it predicts on PersiaBatch requests "
            "only (predict_batch; a server's PersiaBatch.to_bytes() endpoint). Serve a job-file "
            "export (persia export) to predict on raw rows"
        )

    def freshness(self) -> dict[str, Any] | None:
        return self.runtime.freshness()  # type: ignore[no-any-return]

    def info(self) -> dict[str, Any]:
        spec = self.runtime.spec
        return {
            "kind": self.kind,
            "path": str(self.path),
            "generation": self.runtime.freshness()["checkpoint"],
            "slots": [
                {
                    "name": s.name,
                    "dim": s.dim,
                    "pooling": s.pooling,
                    "prefix": s.prefix,
                    "prefix_bits": spec.feature_index_prefix_bit,
                }
                for s in spec.slots
            ],
            "output": "the dense model's outputs",
        }

    def close(self) -> None:
        super().close()
        self.runtime.close()


def open_model(
    path: str | os.PathLike[str],
    *,
    follow: str | os.PathLike[str] | None = None,
    poll_interval_s: float = 1.0,
    embedding_config: Any = None,
) -> ServedModel:
    """Open a model for serving: a job-file export or a PERSIA-API job checkpoint (module doc).

    Args:
        path: the export directory, or the checkpoint directory ``dump_checkpoint(path,
            with_jit_model=True)`` wrote.
        follow: a checkpoint only: the training job's ``incremental_dir``; its deltas are
            applied as they complete and new generations of ``path`` are picked up (with their
            dense model). None: serve the checkpoint as it is now.
        poll_interval_s: how often ``follow`` is polled.
        embedding_config: a checkpoint only, and only one that records no embedding layer
            (written by an older persia): PERSIA's ``embedding_config.yml`` (path or parsed).

    Returns:
        A :class:`ServedModel` (``.kind`` ``"export"`` or ``"checkpoint"``).

    Raises:
        CheckpointError: ``path`` is no directory, is neither, is corrupt or incomplete, or is a checkpoint
            without a TorchScript model.
        ConfigError: a checkpoint without a recorded embedding layer and no
            ``embedding_config``, or one that differs from it.
        PersiaError: ``follow`` for an export (a snapshot: it follows nothing).
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such directory (an export or a job checkpoint)")
    try:
        kind = current_kind(root)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{root} is neither a serving export nor a job checkpoint (one that "
            f"TrainCtx.dump_checkpoint(dir, with_jit_model=True) writes, with jit_dense.pt "
            f"beside its generations): {exc}"
        ) from None
    if kind == EXPORT_KIND:
        if follow is not None:
            raise PersiaError(
                f"{root} is a serving export, a snapshot that does not follow deltas; serve the "
                "job's checkpoint (dump_checkpoint(dir, with_jit_model=True)) to follow training"
            )
        if embedding_config is not None:
            raise PersiaError(f"{root} is a serving export: it carries its own embedding config")
        from persia.serving.predictor import load

        return ExportModel(root, load(root))
    if kind == CHECKPOINT_KIND:
        from persia.checkpoint.follow import ServingRuntime

        spec = None
        if embedding_config is not None:
            from persia.embedding.config import load_spec

            spec = load_spec(embedding_config, None)
        runtime = ServingRuntime(
            root,
            spec,
            incremental_dir=follow,
            follow_checkpoint=follow is not None,
            poll_interval_s=poll_interval_s,
            with_model=True,
        )
        return CheckpointModel(root, runtime)
    raise CheckpointError(
        f"{root}: a checkpoint of kind {kind!r}; open_model serves {EXPORT_KIND!r} (an export) "
        f"and {CHECKPOINT_KIND!r} (a job checkpoint)"
    )
