"""Load a serving export and turn raw request rows into probabilities.

A request is a batch of raw rows, as they appear in the training files: a list of dicts, a
``pyarrow.Table`` or a dict of columns. Per row, exactly as ``persia train``'s reader did:

1. text values are trimmed (if the job trimmed them) and the missing-value markers become
   missing;
2. each slot's column is hashed to IDs with :mod:`persia.hashing` (strings, or ints for
   ``type: int``; multi-valued columns split on the separator or given as lists); a missing value
   is the ID of ``"<missing>"`` or an empty sample, as in training;
3. the IDs get the slot's prefix in the top ``prefix_bits`` bits (the keys), the keys' rows are
   read from the snapshot (**an unknown key reads as zeros**) and pooled per sample with the
   slot's pooling (the same kernels as training);
4. dense columns are parsed as numbers, ``log1p(max(x, 0))`` where configured, standardised with
   the training files' mean and std, missing values filled as in training;
5. the TorchScript model runs in eval mode; logits go through a sigmoid.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from persia.errors import BatchError, CheckpointError
from persia.hashing import hash_strings, ids_from_column
from persia.serving.export import KIND, SERVING_FORMAT, hash_check, recipe_array
from persia.store.checkpoint import read_current
from persia.store.table import decode_rows
from persia.worker import pooling

__all__ = ["Predictor", "load"]

#: A request: a list of dicts, a ``pyarrow.Table`` or a dict of columns.
Rows = Any


def _as_table(rows: Rows) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    try:
        if isinstance(rows, Mapping):
            return pa.table({str(k): v for k, v in rows.items()})
        return pa.Table.from_pylist(list(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise BatchError(f"predict: the request cannot be read as columns: {exc}") from None


def _is_empty(rows: Rows) -> bool:
    """True for a request without rows: ``[]``, an empty table or batch, or empty columns."""
    if isinstance(rows, pa.Table | pa.RecordBatch):
        return rows.num_rows == 0
    if isinstance(rows, Mapping):
        return all(hasattr(v, "__len__") and len(v) == 0 for v in rows.values())
    return isinstance(rows, list | tuple) and len(rows) == 0


def _array(col: pa.ChunkedArray) -> pa.Array:
    """A table column as one array (without a copy when it is one chunk already)."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _pool_groups(slots: list[dict[str, Any]]) -> list[tuple[list[int], np.uint64, np.ndarray]]:
    """The slots whose keys are looked up and pooled in one pass (same dim, pooling and prefix
    bits; a ``raw`` slot alone): per group the slot indices, the keys' low-bits mask and each
    slot's high bits (its prefix as :func:`persia.worker.pooling.add_prefix` places it)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j, s in enumerate(slots):
        how = (s["pooling"], int(s["dim"]), int(s["prefix_bits"]))
        groups.setdefault(how if s["pooling"] != "raw" else (j,), []).append(j)
    out = []
    zero = np.zeros(1, dtype=np.uint64)
    for js in groups.values():
        bits = int(slots[js[0]]["prefix_bits"])
        high = [pooling.add_prefix(zero, int(slots[j]["prefix"]), bits)[0] for j in js]
        out.append((js, np.uint64((1 << (64 - bits)) - 1), np.array(high, dtype=np.uint64)))
    return out


class Predictor:
    """A loaded serving export (see :func:`load`).

    Attributes:
        path: the export's generation folder.
        meta: its verified manifest meta (the request recipe).
        model: the TorchScript dense model, in eval mode.
    """

    def __init__(self, path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path, self.meta = path, meta
        where = str(path)
        try:
            with warnings.catch_warnings():  # TorchScript is marked deprecated by torch
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(io.BytesIO(arrays["dense_model"].tobytes()))
        except Exception as exc:
            raise CheckpointError(
                f"{where}: the TorchScript model cannot be loaded: {exc}"
            ) from exc
        self.model.eval()
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for s in meta["slots"]:
            dim = int(s["dim"])
            keys, values = arrays.get(f"d{dim}.keys"), arrays.get(f"d{dim}.values")
            if (
                keys is None
                or values is None
                or values.shape != (keys.shape[0], dim)
                or values.dtype not in (np.float32, np.float16, np.uint16)
            ):
                raise CheckpointError(f"{where}: the embeddings of dim {dim} are missing or bad")
            self.tables[dim] = (keys, values)
        self.logits = meta["model"]["output"] == "logits"
        inp = meta["input"]
        self._markers = pa.array(list(inp["missing_values"]), type=pa.string())
        self._token_id = hash_strings([inp["missing_token"]])[0]
        self._marker_lookup = pc.SetLookupOptions(self._markers)
        self._trim = bool(inp["trim_whitespace"])
        self._columns = self.columns
        self._pool_groups = _pool_groups(meta["slots"])
        # The dense recipe as one constant per column (an identity where a step is off).
        dense = meta["dense"]
        fill_mean = inp["missing_dense"] == "mean"
        self._log1p = np.array([bool(c["log1p"]) for c in dense])
        self._mean = np.array([c["mean"] if c["standardize"] else 0.0 for c in dense], np.float64)
        self._std = np.array([c["std"] if c["standardize"] else 1.0 for c in dense], np.float64)
        self._fill = np.array(
            [
                (0.0 if fill_mean else -c["mean"] / c["std"])
                if c["standardize"]
                else (c["mean"] if fill_mean else 0.0)
                for c in dense
            ],
            np.float64,
        )

    @property
    def label_meaning(self) -> str:
        """What the predicted probability is the probability of."""
        return str(self.meta["label"]["meaning"])

    @property
    def columns(self) -> list[str]:
        """The request columns the model reads (ID columns, then dense columns)."""
        return [s["column"] for s in self.meta["slots"]] + [d["name"] for d in self.meta["dense"]]

    # ------------------------------------------------------------------ features
    def _clean(self, arr: pa.Array) -> pa.Array:
        if _is_text(arr.type):
            if self._trim:
                arr = pc.utf8_trim_whitespace(arr)
            if len(self._markers):
                marked = pc.is_in(arr, options=self._marker_lookup)
                if marked.true_count:
                    arr = pc.if_else(marked, pa.scalar(None, arr.type), arr)
        return arr

    def _ids(self, slot: Mapping[str, Any], arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(IDs, lengths) of one slot's column, exactly as the training reader made them."""
        return ids_from_column(
            arr,
            kind=slot["type"],
            separator=slot["separator"],
            clean=self._clean,
            token_id=self._token_id if self.meta["input"]["missing_ids"] == "token" else None,
            what=f"column {slot['column']!r}",
        )

    def _all_ids(self, table: pa.Table) -> list[tuple[np.ndarray, np.ndarray]]:
        """(IDs, lengths) of every slot. The columns of the slots with the same recipe (type,
        separator) and the same Arrow type are read end to end in one pass; should that fail,
        slot by slot: the error (if any) is then the one of the first bad column, as before."""
        slots = self.meta["slots"]
        cols = [_array(table.column(s["column"])) for s in slots]
        n = table.num_rows
        groups: dict[tuple[Any, ...], list[int]] = {}
        for j, (s, col) in enumerate(zip(slots, cols, strict=True)):
            groups.setdefault((s["type"], s["separator"], col.type), []).append(j)
        out: list[tuple[np.ndarray, np.ndarray]] = [None] * len(slots)  # type: ignore[list-item]
        try:
            for js in groups.values():
                both = cols[js[0]] if len(js) == 1 else pa.concat_arrays([cols[j] for j in js])
                ids, lengths = self._ids(slots[js[0]], both)
                ends = np.cumsum(lengths.reshape(len(js), n).sum(axis=1))
                for i, j in enumerate(js):
                    start = int(ends[i - 1]) if i else 0
                    out[j] = (ids[start : int(ends[i])], lengths[i * n : (i + 1) * n])
        except (BatchError, pa.ArrowException):  # e.g. dictionaries that do not concatenate
            return [self._ids(s, col) for s, col in zip(slots, cols, strict=True)]
        return out

    def _embeddings(self, ids: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[torch.Tensor]:
        """Each slot's pooled rows; the slots of one pooling group with one key lookup and one
        pooling pass (each sample of each slot pooled on its own, as slot by slot)."""
        slots = self.meta["slots"]
        out: list[torch.Tensor] = [None] * len(slots)  # type: ignore[list-item]
        for js, low, high in self._pool_groups:
            s = slots[js[0]]
            counts = [ids[j][0].shape[0] for j in js]
            keys = (np.concatenate([ids[j][0] for j in js]) & low) | np.repeat(high, counts)
            uniques, inverse = pooling.unique_inverse(keys)
            emb = self._lookup(int(s["dim"]), uniques)
            lengths = np.concatenate([ids[j][1] for j in js])
            if s["pooling"] == "raw":
                pooled, _ = pooling.pool_raw_forward(
                    lengths, inverse, emb, int(s["sample_fixed_size"])
                )
            else:
                pooled = pooling.pool_forward(lengths, inverse, emb, s["pooling"])
            for i, j in enumerate(js):
                out[j] = torch.from_numpy(pooled[i * n : (i + 1) * n])
        return out

    def _numbers(self, name: str, arr: pa.Array) -> np.ndarray:
        """A dense column (cleaned) as float64, NaN where missing."""
        try:
            x = pc.cast(self._clean(arr), pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise BatchError(f"dense column {name!r}: expected numbers ({exc})") from None
        return np.asarray(x, dtype=np.float64)

    def _dense(self, table: pa.Table, n: int) -> np.ndarray:
        """f32[n, columns]: the dense columns parsed, transformed, standardised and filled. The
        columns of one Arrow type are parsed end to end in one pass; should that fail, column by
        column, so that the error names the first bad one."""
        names = [c["name"] for c in self.meta["dense"]]
        cols = [_array(table.column(name)) for name in names]
        x = np.empty((len(cols), n), dtype=np.float64)
        groups: dict[pa.DataType, list[int]] = {}
        for j, col in enumerate(cols):
            groups.setdefault(col.type, []).append(j)
        try:
            for js in groups.values():
                both = cols[js[0]] if len(js) == 1 else pa.concat_arrays([cols[j] for j in js])
                x[js] = self._numbers(names[js[0]], both).reshape(len(js), n)
        except (BatchError, pa.ArrowException):
            for j, (name, col) in enumerate(zip(names, cols, strict=True)):
                x[j] = self._numbers(name, col)
        x = np.where(self._log1p[:, None], np.log1p(np.maximum(x, 0.0)), x)
        missing = np.isnan(x)
        x = (x - self._mean[:, None]) / self._std[:, None]
        x = np.where(missing, self._fill[:, None], x)
        return np.ascontiguousarray(x.T, dtype=np.float32)

    def _lookup(self, dim: int, uniques: np.ndarray) -> np.ndarray:
        keys, values = self.tables[dim]
        rows = np.zeros((uniques.shape[0], dim), dtype=np.float32)
        if keys.shape[0]:
            at = np.minimum(np.searchsorted(keys, uniques), keys.shape[0] - 1)
            hit = keys[at] == uniques
            rows[hit] = decode_rows(values[at[hit]])  # half rows are kept half in memory
        return rows

    def features(self, rows: Rows) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's inputs ``(non_id, embeddings)`` for raw request rows.

        Raises:
            BatchError: a column the model reads is absent, or a value does not parse.
        """
        table = _as_table(rows)
        have = set(table.column_names)
        lacking = [c for c in self._columns if c not in have]
        if lacking:
            raise BatchError(
                f"predict: missing column(s) {', '.join(map(repr, lacking))} "
                f"(the model reads {', '.join(self.columns)})"
            )
        n = table.num_rows
        embeddings = self._embeddings(self._all_ids(table), n)
        non_id = [torch.from_numpy(self._dense(table, n))] if self.meta["dense"] else []
        return non_id, embeddings

    def predict(self, rows: Rows) -> np.ndarray:
        """Probabilities (float32, one per row) for raw request rows.

        Args:
            rows: a list of dicts, a ``pyarrow.Table`` or a dict of columns; the label column
                is not needed (and is ignored). No rows (``[]``) give an empty array.

        Raises:
            BatchError: a column the model reads is absent, or a value does not parse.
        """
        if _is_empty(rows):  # no rows, hence no columns to check either
            return np.zeros(0, dtype=np.float32)
        non_id, embeddings = self.features(rows)
        if embeddings and embeddings[0].shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            out = self.model(non_id, embeddings)
            if self.logits:
                out = torch.sigmoid(out)
        return out.detach().cpu().numpy().reshape(-1).astype(np.float32, copy=False)


def load(directory: str | os.PathLike[str]) -> Predictor:
    """Load and verify a serving export written by :func:`persia.serving.export`.

    Every file is checked (sizes, CRC-32, kind, format) before use, and this installation's
    ID hash is checked against the vectors recorded at export time.

    Raises:
        CheckpointError: missing, truncated or tampered export, another format version, or a
            hash that differs from the one the model was trained with.
    """
    from persia.store.checkpoint import current_generation

    arrays, meta = read_current(directory, kind=KIND)
    path = current_generation(directory)
    if meta.get("serving_format") != SERVING_FORMAT:
        raise CheckpointError(
            f"{path}: serving_format must be {SERVING_FORMAT}, got {meta.get('serving_format')!r}"
        )
    recipe = arrays.get("recipe")
    if recipe is None or not np.array_equal(recipe, recipe_array(meta)):
        raise CheckpointError(
            f"{path}: the manifest's meta differs from the checksummed recipe (tampered with?)"
        )
    for key in ("hash", "input", "slots", "dense", "label", "model"):
        if key not in meta:
            raise CheckpointError(f"{path}: manifest meta lacks {key!r}")
    if meta["hash"].get("check") != hash_check():
        raise CheckpointError(
            f"{path}: this installation's ID hash differs from the one the export was made with "
            f"({meta['hash'].get('name')!r}); predictions would read the wrong rows"
        )
    return Predictor(path, meta, arrays)
