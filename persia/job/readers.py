"""Streaming readers of CSV / TSV / Parquet files into :class:`~persia.embedding.data.PersiaBatch`.

Files are read block by block with pyarrow (``.gz`` and other compressed text files too) and turned
into batches column by column, never row by row:

* text columns are read as strings, optionally trimmed (``trim_whitespace``), and the configured
  missing-value markers become nulls;
* an ID column becomes one ragged feature per block: single-valued (one ID per row), or
  multi-valued from a list column or a string split on ``separator`` (empty tokens dropped). Values
  are hashed whole columns at a time with :func:`persia.hashing.hash_strings` /
  :func:`persia.hashing.hash_ints`. A missing value gives an empty sample (``missing.ids: empty``)
  or the ID of the token ``"<missing>"`` (``missing.ids: token``);
* dense columns are parsed as float64, optionally ``log1p(max(x, 0))``, standardised with the mean
  and standard deviation of the training files (:meth:`JobReader.fit_stats`), missing values
  filled with the mean (0 after standardisation) or 0, and stored as one float32 matrix;
* the label is 1 where the value is one of ``positive``, or above ``threshold``, or else the value
  itself, which must be 0 or 1. Rows with a missing label are dropped or an error.

Training batches are shuffled within a buffer of ``shuffle_buffer`` rows (a new order each
epoch, from the job's seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from persia.embedding.data import IDTypeFeature, Label, NonIDTypeFeature, PersiaBatch
from persia.errors import BatchError, ConfigError
from persia.hashing import MISSING_TOKEN, hash_strings, ids_from_column
from persia.job.config import DataSpec, IdColumn, Source

__all__ = ["MISSING_TOKEN", "Chunk", "DenseStats", "JobReader", "file_format"]

_PARQUET_ROWS = 65536
_SAMPLE_ROWS = 2000


def file_format(path: Path, configured: str) -> str:
    """``csv``, ``tsv`` or ``parquet``: the configured format, else from the file name."""
    if configured != "auto":
        return configured
    name = path.name.lower()
    for ext in (".gz", ".bz2", ".zst", ".lz4"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".tsv"):
        return "tsv"
    return "csv"


@dataclass
class DenseStats:
    """Mean and standard deviation of each dense column after ``log1p`` (training files)."""

    mean: np.ndarray
    std: np.ndarray
    rows: int


@dataclass
class Chunk:
    """Rows already turned into arrays: per ID column (values, lengths), dense, labels."""

    ids: list[tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray  # f32[n, d]
    labels: np.ndarray  # f32[n]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        ids = [
            (
                np.concatenate([c.ids[j][0] for c in chunks]),
                np.concatenate([c.ids[j][1] for c in chunks]),
            )
            for j in range(len(chunks[0].ids))
        ]
        return Chunk(
            ids,
            np.concatenate([c.dense for c in chunks]),
            np.concatenate([c.labels for c in chunks]),
        )

    def take(self, index: np.ndarray) -> Chunk:
        """The rows at ``index`` (a permutation or selection), ragged IDs included."""
        ids = []
        for values, lengths in self.ids:
            offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            new_lengths = lengths[index]
            new_offsets = np.zeros(new_lengths.shape[0] + 1, dtype=np.int64)
            np.cumsum(new_lengths, out=new_offsets[1:])
            # position k of the output reads values[start of its row + k - new start of its row]
            shift = np.repeat(offsets[:-1][index] - new_offsets[:-1], new_lengths)
            ids.append((values[np.arange(new_offsets[-1], dtype=np.int64) + shift], new_lengths))
        return Chunk(ids, self.dense[index], self.labels[index])

    def slice(self, start: int, stop: int) -> Chunk:
        ids = []
        for values, lengths in self.ids:
            before = int(lengths[:start].sum())
            inside = int(lengths[start:stop].sum())
            ids.append((values[before : before + inside], lengths[start:stop]))
        return Chunk(ids, self.dense[start:stop], self.labels[start:stop])


class JobReader:
    """Reads a job's train and test files into batches.

    Args:
        spec: the job's ``data`` section.
        stats: dense-column statistics; None computes them from the training files on first use.
    """

    def __init__(self, spec: DataSpec, stats: DenseStats | None = None) -> None:
        self.spec = spec
        self._stats = stats
        self._markers = pa.array(list(spec.missing_values), type=pa.string())
        self._token_id = hash_strings([MISSING_TOKEN])[0]

    # ------------------------------------------------------------------ raw blocks
    def _text_options(self, path: Path, skip_rows: int, columns: list[str] | None):
        fmt = file_format(path, self.spec.format)
        delimiter = self.spec.delimiter or ("\t" if fmt == "tsv" else ",")
        read = pacsv.ReadOptions(
            column_names=list(self.spec.columns) if self.spec.columns else None,
            autogenerate_column_names=False,
            skip_rows=skip_rows,
            block_size=self.spec.block_bytes,
        )
        parse = pacsv.ParseOptions(delimiter=delimiter)
        convert = pacsv.ConvertOptions(
            include_columns=columns,
            column_types={c: pa.string() for c in columns} if columns else None,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            null_values=[],
        )
        return read, parse, convert

    def file_columns(self, path: Path, skip_rows: int = 0) -> list[str]:
        """The column names of one file (from the schema, the header row or ``data.columns``)."""
        if file_format(path, self.spec.format) == "parquet":
            return list(pq.read_schema(path).names)
        if self.spec.columns:
            return list(self.spec.columns)
        read, parse, convert = self._text_options(path, skip_rows, None)
        with pacsv.open_csv(path, read_options=read, parse_options=parse) as stream:
            return list(stream.schema.names)

    def blocks(
        self, path: Path, skip_rows: int, columns: list[str]
    ) -> Iterator[dict[str, pa.Array]]:
        """The named columns of one file, block by block, cleaned (trimmed, markers nulled)."""
        try:
            if file_format(path, self.spec.format) == "parquet":
                for rb in pq.ParquetFile(path).iter_batches(_PARQUET_ROWS, columns=columns):
                    yield {c: self._clean(rb.column(c)) for c in columns}
                return
            read, parse, convert = self._text_options(path, skip_rows, columns)
            with pacsv.open_csv(
                path, read_options=read, parse_options=parse, convert_options=convert
            ) as stream:
                for rb in stream:
                    if rb.num_rows:
                        yield {c: self._clean(rb.column(c)) for c in columns}
        except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as exc:
            raise BatchError(f"{path}: {exc}") from None

    def _clean(self, arr: pa.Array) -> pa.Array:
        t = arr.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if self.spec.trim_whitespace:
                arr = pc.utf8_trim_whitespace(arr)
            if len(self._markers):
                arr = pc.if_else(pc.is_in(arr, value_set=self._markers), None, arr)
        return arr

    # ------------------------------------------------------------------ conversions
    def _numbers(self, arr: pa.Array, what: str) -> np.ndarray:
        try:
            as_float = pc.cast(arr, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise BatchError(f"{what}: expected numbers ({exc})") from None
        return as_float.to_numpy(zero_copy_only=False)

    def _ids(self, col: IdColumn, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        return ids_from_column(
            arr,
            kind=col.type,
            separator=col.separator,
            clean=self._clean,
            token_id=self._token_id if self.spec.missing_ids == "token" else None,
            what=f"ID column {col.name!r}",
        )

    def labels(self, arr: pa.Array) -> np.ndarray:
        """The label column as float32 0/1, NaN where missing.

        Raises:
            BatchError: without ``positive`` / ``threshold``, a value other than 0 or 1.
        """
        spec = self.spec.label
        what = f"label column {spec.column!r}"
        if spec.positive:
            if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                arr = pc.cast(arr, pa.string())
            pos = pc.is_in(arr, value_set=pa.array(list(spec.positive), type=pa.string()))
            y = pos.to_numpy(zero_copy_only=False).astype(np.float32)
            y[~arr.is_valid().to_numpy(zero_copy_only=False)] = np.nan
            return y
        x = self._numbers(arr, what)
        if spec.threshold is not None:
            y = (x > spec.threshold).astype(np.float32)
            y[np.isnan(x)] = np.nan
            return y
        ok = np.isnan(x) | (x == 0) | (x == 1)
        if not ok.all():
            bad = np.unique(x[~ok])[:5]
            raise BatchError(
                f"{what} is not binary: values must be 0 or 1 (or set data.label.positive or "
                f"data.label.threshold), got {', '.join(repr(float(v)) for v in bad)}"
            )
        return x.astype(np.float32)

    def _dense_raw(self, block: dict[str, pa.Array]) -> np.ndarray:
        n = len(next(iter(block.values())))
        out = np.empty((n, len(self.spec.dense)), dtype=np.float64)
        for j, col in enumerate(self.spec.dense):
            x = self._numbers(block[col.name], f"dense column {col.name!r}")
            out[:, j] = np.log1p(np.maximum(x, 0.0)) if col.log1p else x
        return out

    # ------------------------------------------------------------------ statistics
    def fit_stats(self) -> DenseStats:
        """Mean and std of every dense column (after log1p) over the training files."""
        d = len(self.spec.dense)
        count = np.zeros(d)
        total = np.zeros(d)
        squares = np.zeros(d)
        names = [c.name for c in self.spec.dense]
        if d:
            for path in self.spec.train.files():
                for block in self.blocks(path, self.spec.train.skip_rows, names):
                    x = self._dense_raw(block)
                    ok = ~np.isnan(x)
                    count += ok.sum(axis=0)
                    z = np.where(ok, x, 0.0)
                    total += z.sum(axis=0)
                    squares += (z * z).sum(axis=0)
        mean = np.divide(total, count, out=np.zeros(d), where=count > 0)
        var = np.divide(squares, count, out=np.zeros(d), where=count > 0) - mean * mean
        std = np.sqrt(np.maximum(var, 0.0))
        std[std < 1e-12] = 1.0
        return DenseStats(mean, std, int(count.max()) if d else 0)

    @property
    def stats(self) -> DenseStats:
        if self._stats is None:
            self._stats = self.fit_stats()
        return self._stats

    # ------------------------------------------------------------------ chunks and batches
    def chunk(self, block: dict[str, pa.Array]) -> Chunk:
        """One cleaned block as arrays; rows with a missing label dropped (or an error)."""
        spec = self.spec
        y = self.labels(block[spec.label.column])
        missing = np.isnan(y)
        if missing.any():
            if spec.missing_label == "error":
                row = int(np.flatnonzero(missing)[0])
                raise BatchError(
                    f"label column {spec.label.column!r} is missing in a row (row {row} of a "
                    "block); set data.missing.label: drop to skip such rows"
                )
            keep = pa.array(~missing)
            block = {k: v.filter(keep) for k, v in block.items()}
            y = y[~missing]
        ids = [self._ids(col, block[col.name]) for col in spec.ids]
        dense = np.zeros((y.shape[0], len(spec.dense)), dtype=np.float32)
        if spec.dense:
            x = self._dense_raw(block)
            st = self.stats
            for j, col in enumerate(spec.dense):
                v = x[:, j]
                nan = np.isnan(v)
                if col.standardize:
                    v = (v - st.mean[j]) / st.std[j]
                    fill = 0.0 if spec.missing_dense == "mean" else -st.mean[j] / st.std[j]
                else:
                    fill = st.mean[j] if spec.missing_dense == "mean" else 0.0
                v[nan] = fill
                dense[:, j] = v
        return Chunk(ids, dense, y)

    def chunks(self, source: Source) -> Iterator[Chunk]:
        """Every file of ``source``, block by block, as chunks."""
        columns = list(self.spec.used_columns)
        for path in source.files():
            for block in self.blocks(path, source.skip_rows, columns):
                yield self.chunk(block)

    def to_batch(self, chunk: Chunk, requires_grad: bool) -> PersiaBatch:
        """A :class:`PersiaBatch` of the rows of ``chunk`` (the columnar fast path)."""
        features = [
            IDTypeFeature.from_columnar(col.name, values, lengths)
            for col, (values, lengths) in zip(self.spec.ids, chunk.ids, strict=True)
        ]
        dense = [NonIDTypeFeature(np.ascontiguousarray(chunk.dense))] if self.spec.dense else None
        labels = [Label(np.ascontiguousarray(chunk.labels.reshape(-1, 1)))]
        return PersiaBatch(
            features, non_id_type_features=dense, labels=labels, requires_grad=requires_grad
        )

    def batches(
        self,
        source: Source,
        batch_size: int,
        *,
        training: bool,
        seed: int = 0,
        max_samples: int | None = None,
    ) -> Iterator[PersiaBatch]:
        """Batches of ``batch_size`` rows (the last one may be smaller), at most ``max_samples``.

        Training batches are shuffled within ``shuffle_buffer`` rows using ``seed``.
        """
        rng = np.random.default_rng(seed)
        buffer_rows = max(self.spec.shuffle_buffer, batch_size) if training else batch_size
        shuffle = training and self.spec.shuffle_buffer > 0
        pending: list[Chunk] = []
        held = 0
        produced = 0

        def drain(final: bool) -> Iterator[PersiaBatch]:
            nonlocal pending, held, produced
            if not pending:
                return
            rows = Chunk.concat(pending)
            if shuffle:
                rows = rows.take(rng.permutation(len(rows)))
            start = 0
            while len(rows) - start >= batch_size or (final and start < len(rows)):
                stop = min(start + batch_size, len(rows))
                if max_samples is not None:
                    stop = min(stop, start + max_samples - produced)
                produced += stop - start
                yield self.to_batch(rows.slice(start, stop), training)
                start = stop
                if max_samples is not None and produced >= max_samples:
                    pending, held = [], 0
                    return
            rest = rows.slice(start, len(rows))
            pending, held = ([rest], len(rest)) if len(rest) else ([], 0)

        for chunk in self.chunks(source):
            if len(chunk) == 0:
                continue
            pending.append(chunk)
            held += len(chunk)
            if held >= buffer_rows:
                yield from drain(False)
                if max_samples is not None and produced >= max_samples:
                    return
        yield from drain(True)

    # ------------------------------------------------------------------ checks
    def check(self, sample_rows: int = _SAMPLE_ROWS) -> list[str]:
        """Problems found in the sources: missing files or columns, values that do not parse,
        a label that is not binary (a sample of ``sample_rows`` rows of each first file)."""
        problems: list[str] = []
        spec = self.spec
        sources = [("data.train", spec.train)]
        if spec.test is not None:
            sources.append(("data.test", spec.test))
        for where, source in sources:
            try:
                files = source.files()
            except ConfigError as exc:
                problems.extend(f"{where}: {p}" for p in exc.problems)
                continue
            if not files:
                problems.append(f"{where}: no files")
                continue
            first: list[str] | None = None
            for path in files:
                try:
                    names = self.file_columns(path, source.skip_rows)
                except (pa.ArrowInvalid, OSError) as exc:
                    problems.append(f"{where}: {path}: cannot read: {exc}")
                    continue
                if first is None:
                    first = names
                lacking = [c for c in spec.used_columns if c not in names]
                if lacking:
                    problems.append(
                        f"{where}: {path}: missing column(s) {', '.join(map(repr, lacking))} "
                        f"(columns: {', '.join(names)})"
                    )
            if first is not None:
                present = [c for c in spec.used_columns if c in first]
                problems.extend(
                    self._check_sample(where, files[0], source.skip_rows, sample_rows, present)
                )
        return problems

    def _check_sample(
        self, where: str, path: Path, skip: int, rows: int, present: list[str]
    ) -> list[str]:
        problems: list[str] = []
        spec = self.spec
        if not present:
            return problems
        taken: list[dict[str, pa.Array]] = []
        got = 0
        try:
            for block in self.blocks(path, skip, present):
                taken.append(block)
                got += len(next(iter(block.values())))
                if got >= rows:
                    break
        except BatchError as exc:
            return [f"{where}: {exc}"]
        if not taken:
            return [f"{where}: {path}: no rows"]
        block = {c: pa.concat_arrays([b[c] for b in taken]).slice(0, rows) for c in present}
        if spec.label.column in block:
            try:
                y = self.labels(block[spec.label.column])
                seen = set(np.unique(y[~np.isnan(y)]).tolist())
                if seen == {0.0} and where == "data.train":
                    problems.append(
                        f"{where}: label column {spec.label.column!r}: no positive value in the "
                        f"first {got} rows (values seen: {_distinct(block[spec.label.column])})"
                    )
            except BatchError as exc:
                problems.append(f"{where}: {exc} (first {got} rows of {path})")
        for col in spec.dense:
            if col.name not in block:
                continue
            try:
                self._numbers(block[col.name], f"dense column {col.name!r}")
            except BatchError as exc:
                problems.append(f"{where}: {exc}")
        for idc in spec.ids:
            if idc.name not in block:
                continue
            try:
                self._ids(idc, block[idc.name])
            except BatchError as exc:
                problems.append(f"{where}: {exc}")
        return problems


def _distinct(arr: pa.Array, limit: int = 5) -> str:
    values = pc.unique(arr.drop_null()).to_pylist()[:limit]
    return ", ".join(repr(v) for v in values)
