"""Export a trained job for serving: TorchScript dense model, embedding rows, request recipe.

The export is one generation of :mod:`persia.store.checkpoint` (``CURRENT`` pointer, ``gen-NNNNNN``
folder, ``manifest.json`` with a CRC-32 and size per file) of kind ``"persia-serving"``::

    out/CURRENT, out/gen-000001/
      dense_model.npy          uint8: the dense model as TorchScript (torch.jit.save bytes)
      d{dim}.keys.npy          u64[n]: every embedding key of that dim, ascending
      d{dim}.values.npy        f32[n, dim]: their embeddings (no optimizer state), in the row
                               dtype they were trained in: f2 for float16 rows, u2 (bit
                               patterns) for bfloat16 (meta ``row_dtypes``: dim -> dtype)
      recipe.npy               uint8: the meta below as canonical JSON (so it is CRC-checked too)
      manifest.json            meta: see :func:`serving_meta`

The meta holds everything that turns a raw request row into the model's inputs, so the export is
loaded (:func:`persia.serving.load`) with persia alone, without the job file or training script:
how text is cleaned (whitespace, missing-value markers), the ID hash (with check vectors), each
slot's column, type, separator, prefix, prefix bits, dim and pooling, each dense column's
``log1p`` / standardisation statistics (from the training files) and missing-value fill, the
model's output kind and what the predicted probability means (the label's positive values).
"""

from __future__ import annotations

import functools
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persia.errors import CheckpointError, ConfigError
from persia.hashing import MISSING_TOKEN, hash_ints, hash_strings
from persia.store.checkpoint import write_generation
from persia.store.table import decode_rows, row_dtype_of

__all__ = [
    "KIND",
    "SERVING_FORMAT",
    "HASH_NAME",
    "MISSING_TOKEN",
    "hash_check",
    "serving_meta",
    "recipe_array",
    "export",
    "export_from_ctx",
    "export_from_checkpoint",
]

KIND = "persia-serving"
#: Version of the meta layout; :func:`persia.serving.load` refuses other versions.
SERVING_FORMAT = 1
HASH_NAME = "persia.hashing: FNV-1a-64 of the UTF-8 text (ints: 8 little-endian bytes), splitmix64"
_CHECK_STRINGS = ("persia", "", MISSING_TOKEN, ">50K")
_CHECK_INTS = (0, 1, 7, 2**40 + 3)


def hash_check() -> dict[str, Any]:
    """Known inputs and their IDs under this installation's hash (stored and re-checked)."""
    strings = hash_strings(list(_CHECK_STRINGS))
    ints = hash_ints(np.array(_CHECK_INTS, dtype=np.int64))
    return {
        "strings": [[s, int(v)] for s, v in zip(_CHECK_STRINGS, strings, strict=True)],
        "ints": [[i, int(v)] for i, v in zip(_CHECK_INTS, ints, strict=True)],
    }


def serving_meta(job: Any, mean: np.ndarray, std: np.ndarray) -> dict[str, Any]:
    """The request recipe of ``job`` (a :class:`persia.job.config.JobConfig`) as JSON.

    Args:
        job: the job the model was trained with.
        mean, std: per dense column, the training files' statistics after ``log1p``.
    """
    data, emb = job.data, job.embedding
    bits = int(emb.feature_index_prefix_bit)
    slots = []
    for col, slot in zip(data.ids, emb.slots, strict=True):
        slots.append(
            {
                "name": slot.name,
                "column": col.name,
                "type": col.type,
                "separator": col.separator,
                "dim": int(slot.dim),
                "pooling": slot.pooling,
                "sample_fixed_size": int(slot.sample_fixed_size),
                "prefix": int(slot.prefix),
                "prefix_bits": bits,
            }
        )
    dense = [
        {
            "name": c.name,
            "log1p": bool(c.log1p),
            "standardize": bool(c.standardize),
            "mean": float(mean[j]),
            "std": float(std[j]),
        }
        for j, c in enumerate(data.dense)
    ]
    label = data.label
    if label.positive:
        meaning = f"probability that {label.column!r} is one of {list(label.positive)}"
    elif label.threshold is not None:
        meaning = f"probability that {label.column!r} > {label.threshold}"
    else:
        meaning = f"probability that {label.column!r} is 1"
    logits = job.model.builtin or job.model.output == "logits"
    return {
        "serving_format": SERVING_FORMAT,
        "hash": {"name": HASH_NAME, "salt": 0, "check": hash_check()},
        "input": {
            "trim_whitespace": bool(data.trim_whitespace),
            "missing_values": list(data.missing_values),
            "missing_ids": data.missing_ids,
            "missing_token": MISSING_TOKEN,
            "missing_dense": data.missing_dense,
        },
        "slots": slots,
        "dense": dense,
        "label": {
            "column": label.column,
            "positive": list(label.positive),
            "threshold": label.threshold,
            "meaning": meaning,
        },
        "model": {"type": job.model.type, "output": "logits" if logits else "probability"},
    }


def _example_inputs(meta: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    n = 2
    non_id = [torch.zeros((n, len(meta["dense"])))] if meta["dense"] else []
    emb = []
    for s in meta["slots"]:
        if s["pooling"] == "raw":
            e = torch.zeros((n, s["sample_fixed_size"], s["dim"] + 1))
            e[:, 0, -1] = 1.0
            emb.append(e)
        else:
            emb.append(torch.zeros((n, s["dim"])))
    return non_id, emb


def _torchscript(model: torch.nn.Module, meta: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """The model in eval mode as TorchScript bytes: scripted, else traced on example inputs."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    was_training = model.training
    model.eval()
    # torch marks TorchScript deprecated; it still loads without the model's Python class
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return _compile(model, meta)
        finally:
            model.train(was_training)


def _compile(model: torch.nn.Module, meta: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    method = "script"
    try:
        compiled: Any = torch.jit.script(model)
    except Exception:
        method = "trace"
        try:
            compiled = torch.jit.trace(model, _example_inputs(meta), check_trace=False)
        except Exception as exc:
            raise ConfigError(
                f"export: the dense model {type(model).__name__} can be neither scripted "
                f"nor traced by TorchScript: {exc}"
            ) from exc
    buf = io.BytesIO()
    torch.jit.save(compiled, buf)
    return np.frombuffer(buf.getbuffer(), dtype=np.uint8).copy(), method


def export(
    out: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    rows: Mapping[int, Sequence[tuple[np.ndarray, np.ndarray]]],
    meta: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write a serving export.

    Args:
        out: the export directory (created; a previous export there stays until the new
            generation is complete).
        model: the trained dense model (called as ``model(non_id, embeddings)``).
        rows: per dim, parts ``(keys u64[n], values [n, dim])`` (e.g. one per shard): float32,
            or the stored rows of a half-precision table (float16, uint16 bfloat16 bits), kept
            as they are when every part of the dim has the same row dtype.
        meta: the request recipe (:func:`serving_meta`).
        source: informative JSON about where it came from (checkpoint, position).

    Returns:
        The new generation's folder.

    Raises:
        CheckpointError: two parts hold the same key; ConfigError: a model TorchScript
            cannot compile.
    """
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    row_dtypes: dict[str, str] = {}
    declared = {int(s["dim"]) for s in meta["slots"]}
    for dim in sorted(declared | {int(d) for d in rows}):
        parts = list(rows.get(dim, []))
        keys = np.concatenate(
            [np.asarray(k, dtype=np.uint64) for k, _ in parts] or [np.zeros(0, np.uint64)]
        )
        stored = [np.asarray(v) for _, v in parts]
        kinds = {row_dtype_of(v) if v.dtype != np.float64 else "float32" for v in stored}
        if len(kinds) != 1:  # mixed (or none): float32
            stored = [decode_rows(v) if v.dtype != np.float64 else v for v in stored]
            kinds = {"float32"}
        (kind,) = kinds
        if kind == "float32":
            stored = [v.astype(np.float32, copy=False) for v in stored]
        values = np.concatenate(
            [v.reshape(-1, dim) for v in stored] or [np.zeros((0, dim), np.float32)]
        )
        row_dtypes[str(dim)] = kind
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], np.ascontiguousarray(values[order])
        if keys.size > 1 and bool((keys[1:] == keys[:-1]).any()):
            raise CheckpointError(f"export: dim {dim}: a key is held twice")
        arrays[f"d{dim}.keys"] = keys
        arrays[f"d{dim}.values"] = values
        counts[str(dim)] = int(keys.size)
    arrays["dense_model"], method = _torchscript(model, meta)
    full = dict(meta)
    full["model"] = {**dict(meta["model"]), "format": "torchscript", "method": method}
    full["rows"] = counts
    full["row_dtypes"] = row_dtypes
    full["source"] = dict(source or {})
    from persia import __version__

    full["persia_version"] = __version__
    # The generation's manifest checksums every array but not the meta itself: the recipe
    # also travels as an array (CRC-checked), and the loader requires the two to agree.
    arrays["recipe"] = recipe_array(full)
    Path(out).mkdir(parents=True, exist_ok=True)
    return write_generation(out, arrays, full, kind=KIND, keep=1)


def recipe_array(meta: Mapping[str, Any]) -> np.ndarray:
    """``meta`` as canonical JSON bytes (sorted keys), uint8."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def export_from_ctx(out: str | os.PathLike[str], ctx: Any, job: Any, stats: Any) -> Path:
    """Export the model and embeddings a training context holds now (after a flush).

    Args:
        out: the export directory.
        ctx: the :class:`persia.ctx.TrainCtx` (or eval context) of ``job``.
        job: the :class:`persia.job.config.JobConfig`.
        stats: the reader's :class:`persia.job.readers.DenseStats`.
    """
    ctx.runtime.flush()
    rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for shard in ctx.runtime.store.shards:
        for dim, part in shard.export_rows().items():
            rows.setdefault(int(dim), []).append((part["keys"], part["values"]))
    if ctx.model is None:
        raise ConfigError("export: the context has no model")
    model = ctx.unwrapped_model()  # not DDP's wrapper (several NN workers)
    return export(out, model=model, rows=rows, meta=serving_meta(job, stats.mean, stats.std))


def run_and_export(job: Any, out: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Trains ``job`` (:func:`persia.job.runner.run_job` with ``options``) and exports the trained
    model to ``out`` at the end (``persia train --export``): on rank 0 with several NN workers,
    once every rank's gradients are applied.

    Returns:
        The job's result, with ``export_dir``.
    """
    from persia.job.runner import run_job

    result = run_job(job, on_trained=functools.partial(export_from_ctx, str(out)), **options)
    result["export_dir"] = str(out)
    return result


def export_from_checkpoint(
    out: str | os.PathLike[str], job: Any, checkpoint_dir: str | os.PathLike[str]
) -> Path:
    """Export the job checkpoint in ``checkpoint_dir`` (written by ``persia train``).

    The dense model is rebuilt from ``job`` and loaded with the checkpoint's weights; the
    dense statistics are computed again from the job's training files (as training did).

    Raises:
        CheckpointError: the checkpoint is missing, tampered with or does not fit the job.
    """
    from persia import checkpoint
    from persia.job.models import build_model
    from persia.job.readers import JobReader

    ckpt = checkpoint.read(checkpoint_dir)
    slot_dims = [s.dim for s in job.embedding.slots]
    model = build_model(job.model.type, job.model.args, len(job.data.dense), slot_dims)
    try:
        model.load_state_dict(ckpt.dense_model_state("cpu"))
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{ckpt.path}: the dense model does not fit the job: {exc}") from exc
    rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for dim in ckpt.meta["dims"]:
        for i in range(int(ckpt.meta["num_shards"])):
            keys = ckpt.arrays.get(f"s{i}.d{dim}.keys")
            if keys is not None:
                rows.setdefault(int(dim), []).append((keys, ckpt.arrays[f"s{i}.d{dim}.values"]))
    stats = JobReader(job.data).stats
    source = {"checkpoint": str(Path(checkpoint_dir)), "position": ckpt.position}
    return export(
        out,
        model=model,
        rows=rows,
        meta=serving_meta(job, stats.mean, stats.std),
        source=source,
    )
