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

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from persia.embedding.data import IDTypeFeature, Label, NonIDTypeFeature, PersiaBatch
from persia.errors import BatchError, ConfigError, PersiaError
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
        self._train_rows: int | None = None  # counted by fit_stats' pass over the files

    # ------------------------------------------------------------------ raw blocks
    def field_of(self, source: Source) -> str:
        """``data.train`` or ``data.test``: the job-file field ``source`` comes from."""
        return "data.test" if source is self.spec.test else "data.train"

    def files(self, source: Source) -> list[Path]:
        """The files of ``source``.

        Raises:
            ConfigError: a pattern matches no file, named by its field (``data.train: ...``).
        """
        try:
            return source.files()
        except ConfigError as exc:
            raise ConfigError([f"{self.field_of(source)}: {p}" for p in exc.problems]) from None

    def located_blocks(
        self, source: Source, columns: list[str]
    ) -> Iterator[tuple[str, dict[str, pa.Array]]]:
        """Every block of ``source``'s files with its place (``FILE, data rows A-B``)."""
        for path in self.files(source):
            start = 0
            for block in self.blocks(path, source.skip_rows, columns):
                n = len(next(iter(block.values()))) if block else 0
                yield f"{path}, data rows {start + 1}-{start + n}", block
                start += n

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
        """The named columns of one file, block by block, cleaned (trimmed, markers nulled).

        Raises:
            BatchError: the file cannot be read, lacks a column, or a block does not parse
                (naming the file and the data rows read before the failure).
        """
        got = 0
        try:
            if file_format(path, self.spec.format) == "parquet":
                pf = pq.ParquetFile(path)
                lacking = [c for c in columns if c not in pf.schema_arrow.names]
                if lacking:
                    raise BatchError(
                        f"{path}: missing column(s) {', '.join(map(repr, lacking))} "
                        f"(columns: {', '.join(pf.schema_arrow.names)})"
                    )
                for rb in pf.iter_batches(_PARQUET_ROWS, columns=columns):
                    yield {c: self._clean(rb.column(c)) for c in columns}
                    got += rb.num_rows
                return
            read, parse, convert = self._text_options(path, skip_rows, columns)
            with pacsv.open_csv(
                path, read_options=read, parse_options=parse, convert_options=convert
            ) as stream:
                for rb in stream:
                    if rb.num_rows:
                        yield {c: self._clean(rb.column(c)) for c in columns}
                        got += rb.num_rows
        except PersiaError:
            raise
        except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
            after = f" (after data row {got})" if got else ""
            raise BatchError(f"{path}: cannot read{after}: {exc}") from None

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
            with _column(col.name):
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
            rows = 0
            for place, block in self.located_blocks(self.spec.train, names):
                with _blame(place):
                    x = self._dense_raw(block)
                rows += x.shape[0]
                ok = ~np.isnan(x)
                count += ok.sum(axis=0)
                z = np.where(ok, x, 0.0)
                total += z.sum(axis=0)
                squares += (z * z).sum(axis=0)
            self._train_rows = rows
        mean = np.divide(total, count, out=np.zeros(d), where=count > 0)
        var = np.divide(squares, count, out=np.zeros(d), where=count > 0) - mean * mean
        std = np.sqrt(np.maximum(var, 0.0))
        std[std < 1e-12] = 1.0
        return DenseStats(mean, std, int(count.max()) if d else 0)

    def known_rows(self, source: Source) -> int | None:
        """The rows of ``source``'s files when known without reading them: from the Parquet
        footers, or counted by :meth:`fit_stats` (training files); else None."""
        files = self.files(source)
        if files and all(file_format(p, self.spec.format) == "parquet" for p in files):
            try:
                return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
            except (pa.ArrowException, OSError):
                return None
        return self._train_rows if source is self.spec.train else None

    @property
    def stats(self) -> DenseStats:
        if self._stats is None:
            self._stats = self.fit_stats()
        return self._stats

    # ------------------------------------------------------------------ chunks and batches
    def chunk(self, block: dict[str, pa.Array]) -> Chunk:
        """One cleaned block as arrays; rows with a missing label dropped (or an error)."""
        spec = self.spec
        with _column(spec.label.column):
            y = self.labels(block[spec.label.column])
        missing = np.isnan(y)
        if missing.any():
            if spec.missing_label == "error":
                row = int(np.flatnonzero(missing)[0])
                raise BatchError(
                    f"label column {spec.label.column!r} is missing in a row (the {row + 1}th "
                    "of these rows); set data.missing.label: drop to skip such rows"
                )
            keep = pa.array(~missing)
            block = {k: v.filter(keep) for k, v in block.items()}
            y = y[~missing]
        ids = []
        for idc in spec.ids:
            with _column(idc.name):
                ids.append(self._ids(idc, block[idc.name]))
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
        for place, block in self.located_blocks(source, columns):
            with _blame(place):
                chunk = self.chunk(block)
            yield chunk

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
        """Every problem found in the data, each naming its field, file or column.

        * a file pattern that matches nothing (named by its field), a file that cannot be read,
          a column the job uses that a file lacks (any format);
        * the training files, whole: no rows at all, a label column with one class only or
          values that are not a label as configured, dense columns that do not parse;
        * a sample of ``sample_rows`` rows of the first file of each split: IDs (and, for the
          test files, the label and dense columns) parse.
        """
        problems: list[str] = []
        spec = self.spec
        sources = [spec.train] + ([spec.test] if spec.test is not None else [])
        for source in sources:
            where = self.field_of(source)
            try:
                files = self.files(source)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            if not files:
                problems.append(f"{where}: no files (the patterns match only directories)")
                continue
            readable: dict[Path, list[str]] = {}  # file -> the used columns it has
            for path in files:
                try:
                    names = self.file_columns(path, source.skip_rows)
                except (pa.ArrowException, OSError, ValueError) as exc:
                    problems.append(f"{where}: {path}: cannot read: {exc}")
                    continue
                lacking = [c for c in spec.used_columns if c not in names]
                if lacking:
                    problems.append(
                        f"{where}: {path}: missing column(s) {', '.join(map(repr, lacking))} "
                        f"(columns: {', '.join(names)})"
                    )
                readable[path] = [c for c in spec.used_columns if c in names]
            if not readable:
                continue
            whole = source is spec.train
            if whole:
                problems.extend(self._check_whole(where, source, readable))
            first, present = next(iter(readable.items()))
            problems.extend(
                self._check_sample(where, first, source.skip_rows, sample_rows, whole, present)
            )
        return problems

    def _check_whole(self, where: str, source: Source, files: dict[Path, list[str]]) -> list[str]:
        """Rows, label classes and dense parsing over every row of ``files`` (each with the
        used columns it has)."""
        spec = self.spec
        label = spec.label.column
        problems: list[str] = []
        scan = _Scan()
        broken: set[str] = set()
        for path, present in files.items():
            columns = [c for c in [label] + [d.name for d in spec.dense] if c in present]
            columns = columns or present[:1]  # (only to count the rows)
            if not columns:
                continue
            start = 0
            try:
                for block in self.blocks(path, source.skip_rows, columns):
                    n = len(block[columns[0]])
                    place = f"{path}, data rows {start + 1}-{start + n}"
                    start += n
                    scan.rows += n
                    if label in block and label not in broken:
                        try:
                            y = self.labels(block[label])
                        except BatchError as exc:
                            broken.add(label)
                            problems.append(f"{where}: {exc} ({place})")
                        else:
                            scan.add_labels(y, block[label])
                    for col in spec.dense:
                        if col.name in broken or col.name not in block:
                            continue
                        try:
                            self._numbers(block[col.name], f"dense column {col.name!r}")
                        except BatchError as exc:
                            broken.add(col.name)
                            problems.append(f"{where}: {exc} ({place})")
            except BatchError as exc:
                problems.append(f"{where}: {exc}")
                scan.unreadable += 1
        if scan.rows == 0 and not scan.unreadable and any(files.values()):
            names = ", ".join(map(str, list(files)[:3])) + (", ..." if len(files) > 3 else "")
            problems.append(f"{where}: no rows to train on in {len(files)} file(s) ({names})")
        elif label not in broken and scan.labelled_files:
            if scan.positives + scan.negatives == 0:
                problems.append(
                    f"{where}: label column {label!r}: every one of the {scan.rows} rows is missing"
                )
            elif scan.positives == 0 or scan.negatives == 0:
                only = 1 if scan.negatives == 0 else 0
                hint = (
                    f"data.label.positive is {list(spec.label.positive)!r}; "
                    if spec.label.positive
                    else ""
                )
                problems.append(
                    f"{where}: label column {label!r} has one class only: all "
                    f"{scan.positives + scan.negatives} labelled rows are {only} ({hint}values "
                    f"seen: {', '.join(repr(v) for v in scan.seen)})"
                )
        return problems

    def _check_sample(
        self, where: str, path: Path, skip: int, rows: int, scanned: bool, present: list[str]
    ) -> list[str]:
        """IDs (and unless ``scanned``, the label and dense columns) of the first ``rows`` rows."""
        problems: list[str] = []
        spec = self.spec
        taken: list[dict[str, pa.Array]] = []
        got = 0
        if not present:
            return problems
        try:
            for block in self.blocks(path, skip, present):
                taken.append(block)
                got += len(next(iter(block.values())))
                if got >= rows:
                    break
        except BatchError as exc:  # (already reported by the whole-file check when scanned)
            return [] if scanned else [f"{where}: {exc}"]
        if not taken:
            return [] if scanned else [f"{where}: {path}: no rows"]
        block = {c: pa.concat_arrays([b[c] for b in taken]).slice(0, rows) for c in present}
        if not scanned:
            try:
                if spec.label.column in block:
                    self.labels(block[spec.label.column])
            except BatchError as exc:
                problems.append(f"{where}: {exc} (first {got} rows of {path})")
            for col in spec.dense:
                if col.name not in block:
                    continue
                try:
                    self._numbers(block[col.name], f"dense column {col.name!r}")
                except BatchError as exc:
                    problems.append(f"{where}: {exc} (first {got} rows of {path})")
        for idc in spec.ids:
            if idc.name not in block:
                continue
            try:
                self._ids(idc, block[idc.name])
            except BatchError as exc:
                problems.append(f"{where}: {exc} (first {got} rows of {path})")
        return problems


@dataclass
class _Scan:
    """What the whole-file check counts: rows, positive and negative labels, values seen."""

    rows: int = 0
    positives: int = 0
    negatives: int = 0
    seen: list[object] = field(default_factory=list)
    labelled_files: int = 0
    unreadable: int = 0

    def add_labels(self, y: np.ndarray, raw: pa.Array) -> None:
        self.labelled_files = 1
        known = ~np.isnan(y)
        self.positives += int((y[known] == 1).sum())
        self.negatives += int((y[known] == 0).sum())
        if len(self.seen) < 5:
            for v in pc.unique(raw.drop_null()).to_pylist():
                if v not in self.seen and len(self.seen) < 5:
                    self.seen.append(v)


@contextlib.contextmanager
def _column(name: str) -> Iterator[None]:
    """Turns an unexpected error while converting column ``name`` into a BatchError naming it."""
    try:
        yield
    except PersiaError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the column, file and rows
        raise BatchError(f"column {name!r}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _blame(place: str) -> Iterator[None]:
    """Prefixes an error raised while converting one block with its file and data rows."""
    try:
        yield
    except BatchError as exc:
        raise BatchError(f"{place}: {exc}") from None
    except PersiaError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the file and rows
        raise BatchError(f"{place}: {type(exc).__name__}: {exc}") from exc
