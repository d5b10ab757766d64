"""The job file of ``persia train``: its schema, strict parsing and command-line overrides.

One YAML file names the data, the model, the embedding layer and the training settings; the
reference with every key and its default is ``docs/job-file.md``. Parsing is strict: unknown keys,
wrong types and bad values are all collected and raised together as one
:class:`~persia.errors.ConfigError`, each problem naming the field, what was expected and what was
given. Overrides (``--set training.staleness=1``) are applied to the parsed YAML before that
validation, so they are checked exactly like the file.

This module imports neither torch nor numba: ``persia validate`` and ``persia --help`` stay fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persia.embedding._problems import MISSING, Problems, is_number
from persia.embedding.config import MetricsConfig, parse_metrics_config
from persia.embedding.spec import (
    EMBEDDING_OPTIMIZERS,
    POOLINGS,
    ROW_DTYPES,
    ROW_ROUNDINGS,
    EmbeddingSpec,
    SlotSpec,
    assign_prefixes,
    prefix_bits_expected,
)
from persia.errors import ConfigError

__all__ = [
    "Source",
    "IdColumn",
    "DenseColumn",
    "LabelSpec",
    "DataSpec",
    "SlotSpec",
    "EmbeddingSpec",
    "ModelSpec",
    "TrainingSpec",
    "JobConfig",
    "BUILTIN_MODELS",
    "apply_overrides",
    "parse_job",
    "load_job",
]

FORMATS = ("auto", "csv", "tsv", "parquet")
BUILTIN_MODELS = ("dnn", "dlrm", "dcn_v2")
#: torch.optim classes a job may name, with the keyword arguments it may pass them.
DENSE_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
}


# --------------------------------------------------------------------------------------------
# The parsed job
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Files of one split: resolved glob patterns, and rows to skip at the top of each file."""

    patterns: tuple[str, ...]
    skip_rows: int = 0

    def files(self) -> list[Path]:
        """The files the patterns match, sorted per pattern; ConfigError if one matches none."""
        import glob

        out: list[Path] = []
        problems = []
        for pattern in self.patterns:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                problems.append(f"no file matches {pattern!r}")
            out.extend(Path(m) for m in matches if Path(m).is_file())
        if problems:
            raise ConfigError(problems)
        return out


@dataclass(frozen=True)
class IdColumn:
    """A column whose values become the IDs of one slot (hashed with :mod:`persia.hashing`)."""

    name: str
    type: str = "string"  # string | int
    separator: str | None = None  # multi-valued: IDs separated by this string


@dataclass(frozen=True)
class DenseColumn:
    """A numeric column fed to the dense part of the model."""

    name: str
    log1p: bool = False
    standardize: bool = True


@dataclass(frozen=True)
class LabelSpec:
    """The label column and which values count as positive (1)."""

    column: str
    positive: tuple[str, ...] = ()
    threshold: float | None = None


@dataclass(frozen=True)
class DataSpec:
    """Where the data is and how to read it."""

    train: Source
    test: Source | None
    format: str
    header: bool
    columns: tuple[str, ...] | None
    delimiter: str | None
    trim_whitespace: bool
    missing_values: tuple[str, ...]
    block_bytes: int
    shuffle_buffer: int
    ids: tuple[IdColumn, ...]
    dense: tuple[DenseColumn, ...]
    label: LabelSpec
    missing_ids: str  # empty | token
    missing_dense: str  # mean | zero
    missing_label: str  # drop | error

    @property
    def used_columns(self) -> tuple[str, ...]:
        """Every column the job reads, label last."""
        return (
            tuple(c.name for c in self.ids)
            + tuple(c.name for c in self.dense)
            + (self.label.column,)
        )


@dataclass(frozen=True)
class ModelSpec:
    """The dense model: a built-in name or ``package.module:Class``, with its keyword args."""

    type: str
    args: Mapping[str, Any]
    output: str  # logits | probability

    @property
    def builtin(self) -> bool:
        return self.type in BUILTIN_MODELS


@dataclass(frozen=True)
class TrainingSpec:
    """How to train."""

    backend: str
    batch_size: int
    epochs: int
    max_samples: int | None
    staleness: int
    seed: int
    reproducible: bool
    dense_optimizer: str
    dense_optimizer_args: Mapping[str, Any]
    eval_every_batches: int
    eval_batch_size: int
    eval_max_samples: int | None
    checkpoint_dir: str | None
    checkpoint_every_batches: int
    log_every_batches: int
    progress: str  # auto | bar | log | none
    forward_buffer_size: int


@dataclass(frozen=True)
class JobConfig:
    """A whole job file, validated; ``embedding`` is the layer's one description
    (:class:`persia.embedding.spec.EmbeddingSpec`, slots with their key prefixes)."""

    data: DataSpec
    embedding: EmbeddingSpec
    model: ModelSpec
    training: TrainingSpec
    source: str | None = field(default=None, compare=False)
    #: PERSIA's ``metrics_config`` (the ``metrics`` section): Prometheus metrics, docs/metrics.md
    metrics: MetricsConfig = MetricsConfig()


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

_DATA_KEYS = (
    "train",
    "test",
    "format",
    "header",
    "columns",
    "delimiter",
    "skip_rows",
    "trim_whitespace",
    "missing_values",
    "block_bytes",
    "shuffle_buffer",
    "ids",
    "dense",
    "label",
    "missing",
)


def _resolve(pattern: str, base: Path) -> str:
    p = Path(os.path.expanduser(pattern))
    return str(p if p.is_absolute() else base / p)


def _source(c: Problems, raw: object, path: str, base: Path, skip_default: int) -> Source | None:
    if raw is MISSING or raw is None:
        return None
    skip = skip_default
    if isinstance(raw, Mapping):
        d = c.section(raw, path, ("paths", "skip_rows"))
        if "paths" not in d:
            c.bad(f"{path}.paths", "a path or glob, or a list of them (required)", MISSING)
            return None
        paths = c.strings(d["paths"], f"{path}.paths")
        skip = c.int_(d, "skip_rows", path, skip_default, minimum=0)
    else:
        paths = c.strings(raw, path)
    if not paths:
        return None
    return Source(tuple(_resolve(p, base) for p in paths), skip)


def _columns_map(
    c: Problems, raw: object, path: str, known: tuple[str, ...]
) -> list[tuple[str, dict]]:
    """A list of names or a mapping name -> options (None for defaults)."""
    if raw is MISSING or raw is None:
        return []
    if isinstance(raw, list):
        out: list[tuple[str, dict]] = []
        for i, name in enumerate(raw):
            if not isinstance(name, str) or not name:
                c.bad(f"{path}[{i}]", "a column name", name)
            else:
                out.append((name, {}))
        return out
    if not isinstance(raw, Mapping):
        c.bad(path, "a list of column names or a mapping column -> options", raw)
        return []
    return [(str(name), c.section(opts, f"{path}.{name}", known)) for name, opts in raw.items()]


def _data(c: Problems, raw: object, base: Path) -> DataSpec | None:
    d = c.section(raw, "data", _DATA_KEYS)
    if raw is MISSING:
        c.bad("data", "a mapping (required)", raw)
    skip = c.int_(d, "skip_rows", "data", 0, minimum=0)
    train = _source(c, d.get("train", MISSING), "data.train", base, skip)
    if "train" not in d and raw is not MISSING:
        c.bad("data.train", "a path or glob, or a list of them (required)", MISSING)
    test = _source(c, d.get("test", MISSING), "data.test", base, skip)
    fmt = c.choice(d, "format", "data", "auto", FORMATS)
    header = c.bool_(d, "header", "data", False)
    columns = None
    if d.get("columns") is not None:
        columns = c.strings(d["columns"], "data.columns")
        dupes = sorted({x for x in columns if columns.count(x) > 1})
        if dupes:
            c.bad("data.columns", "distinct names", f"{', '.join(dupes)} more than once")
    delimiter = d.get("delimiter")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        c.bad("data.delimiter", "one character", delimiter)
        delimiter = None
    trim = c.bool_(d, "trim_whitespace", "data", False)
    missing_values = c.strings(d.get("missing_values", [""]), "data.missing_values", True)
    block_bytes = c.int_(d, "block_bytes", "data", 1 << 20, minimum=4096)
    shuffle_buffer = c.int_(d, "shuffle_buffer", "data", 100_000, minimum=0)

    ids = []
    for name, o in _columns_map(c, d.get("ids"), "data.ids", ("type", "separator")):
        sep = o.get("separator")
        if sep is not None and (not isinstance(sep, str) or not sep):
            c.bad(f"data.ids.{name}.separator", "a non-empty string or null", sep)
            sep = None
        kind = c.choice(o, "type", f"data.ids.{name}", "string", ("string", "int"))
        ids.append(IdColumn(name, kind, sep))
    if not ids and raw is not MISSING:
        c.bad("data.ids", "at least one ID column (a list of names or a mapping)", d.get("ids"))
    dense = [
        DenseColumn(
            name,
            c.bool_(o, "log1p", f"data.dense.{name}", False),
            c.bool_(o, "standardize", f"data.dense.{name}", True),
        )
        for name, o in _columns_map(c, d.get("dense"), "data.dense", ("log1p", "standardize"))
    ]
    label = None
    lraw = d.get("label", MISSING)
    if isinstance(lraw, str):
        lraw = {"column": lraw}
    ld = c.section(lraw, "data.label", ("column", "positive", "threshold"))
    if lraw is MISSING and raw is not MISSING:
        c.bad("data.label", "a column name or {column, positive | threshold} (required)", lraw)
    elif lraw is not MISSING:
        column = c.str_(ld, "column", "data.label", MISSING)
        positive: tuple = ()
        if ld.get("positive") is not None:
            pos = ld["positive"]
            if isinstance(pos, int | float) and not isinstance(pos, bool):
                pos = str(pos)
            positive = c.strings(pos, "data.label.positive")
        threshold = c.number(ld, "threshold", "data.label", None)
        if positive and threshold is not None:
            c.add("data.label: give positive or threshold, not both")
        if column:
            label = LabelSpec(column, positive, threshold)

    m = c.section(d.get("missing"), "data.missing", ("ids", "dense", "label"))
    missing_ids = c.choice(m, "ids", "data.missing", "empty", ("empty", "token"))
    missing_dense = c.choice(m, "dense", "data.missing", "mean", ("mean", "zero"))
    missing_label = c.choice(m, "label", "data.missing", "drop", ("drop", "error"))

    names = [x.name for x in ids] + [x.name for x in dense]
    if label is not None:
        names.append(label.column)
    seen: set[str] = set()
    for n in names:
        if n in seen:
            c.add(f"data: column {n!r} is used twice (as ID, dense or label)")
        seen.add(n)
    if columns is not None and header:
        c.add("data: give header: true or columns, not both")
    if columns is not None:
        for n in names:
            if n not in columns:
                c.add(f"data: column {n!r} is not in data.columns")
    if train is None or label is None:
        return None
    return DataSpec(
        train=train,
        test=test,
        format=fmt,
        header=header,
        columns=columns,
        delimiter=delimiter,
        trim_whitespace=trim,
        missing_values=missing_values,
        block_bytes=block_bytes,
        shuffle_buffer=shuffle_buffer,
        ids=tuple(ids),
        dense=tuple(dense),
        label=label,
        missing_ids=missing_ids,
        missing_dense=missing_dense,
        missing_label=missing_label,
    )


_EMBEDDING_KEYS = (
    "dim",
    "pooling",
    "sample_fixed_size",
    "slots",
    "optimizer",
    "capacity",
    "shards",
    "admit_probability",
    "admit_min_count",
    "init",
    "weight_bound",
    "feature_index_prefix_bit",
    "disk_tier_dir",
    "disk_tier_capacity",
    "row_dtype",
    "row_rounding",
)


def _optimizer(
    c: Problems,
    raw: object,
    path: str,
    default: dict,
    table: Mapping[str, tuple[str, ...]],
) -> tuple[str, dict]:
    if raw is None or raw is MISSING:
        raw = default
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        c.bad(path, "a mapping {type: ..., lr: ...}", raw)
        return default["type"], {k: v for k, v in default.items() if k != "type"}
    kind = raw.get("type", default["type"])
    if not isinstance(kind, str) or kind.lower() not in table:
        c.bad(f"{path}.type", f"one of {', '.join(table)}", kind)
        return default["type"], {}
    kind = kind.lower()
    args: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "type":
            continue
        if key not in table[kind]:
            c.add(
                f"{path}.{key}: unknown option of {kind}; expected one of {', '.join(table[kind])}"
            )
        elif key == "betas":
            if (
                not isinstance(value, list | tuple)
                or len(value) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in value)
            ):
                c.bad(f"{path}.betas", "a pair of numbers in [0, 1)", value)
            else:
                args[key] = (float(value[0]), float(value[1]))
        elif key in ("amsgrad", "nesterov"):
            if not isinstance(value, bool):
                c.bad(f"{path}.{key}", "true or false", value)
            else:
                args[key] = value
        elif not is_number(value) or not math.isfinite(value) or value < 0:
            c.bad(f"{path}.{key}", "a number >= 0", value)
        elif key == "lr" and value <= 0:
            c.bad(f"{path}.lr", "a number > 0", value)
        else:
            args[key] = float(value)
    if "lr" not in args:
        args["lr"] = default["lr"]
    return kind, args


def _embedding(c: Problems, raw: object, data: DataSpec | None) -> EmbeddingSpec | None:
    d = c.section(raw, "embedding", _EMBEDDING_KEYS)
    dim = c.int_(d, "dim", "embedding", 8)
    pooling = c.choice(d, "pooling", "embedding", "sum", POOLINGS)
    fixed = c.int_(d, "sample_fixed_size", "embedding", 10)
    row_dtype = c.choice(d, "row_dtype", "embedding", "float32", ROW_DTYPES)
    rounding = c.choice(d, "row_rounding", "embedding", "nearest", ROW_ROUNDINGS)
    overrides = d.get("slots") or {}
    if not isinstance(overrides, Mapping):
        c.bad(
            "embedding.slots",
            "a mapping slot -> {dim, pooling, sample_fixed_size, row_dtype}",
            overrides,
        )
        overrides = {}
    id_names = [x.name for x in data.ids] if data is not None else []
    for name in overrides:
        if data is not None and name not in id_names:
            c.add(
                f"embedding.slots.{name}: not an ID column of data.ids "
                f"(ID columns: {', '.join(id_names)})"
            )
    slots = []
    first_of_dim: dict[Any, SlotSpec] = {}
    for name in id_names:
        o = c.section(
            overrides.get(name),
            f"embedding.slots.{name}",
            ("dim", "pooling", "sample_fixed_size", "row_dtype"),
        )
        p = f"embedding.slots.{name}"
        slot = SlotSpec(
            name=name,
            dim=c.int_(o, "dim", p, dim),
            pooling=c.choice(o, "pooling", p, pooling, POOLINGS),
            sample_fixed_size=c.int_(o, "sample_fixed_size", p, fixed),
            row_dtype=c.choice(o, "row_dtype", p, row_dtype, ROW_DTYPES),
        )
        first = first_of_dim.setdefault(slot.dim, slot)
        if first.row_dtype != slot.row_dtype:  # one table per dim: its slots share the dtype
            c.bad(
                f"{p}.row_dtype",
                f"{first.row_dtype}, as slot {first.name!r} of the same dim {slot.dim} "
                "(one table per dim)",
                slot.row_dtype,
            )
        slots.append(slot)
    opt, opt_args = _optimizer(
        c,
        d.get("optimizer"),
        "embedding.optimizer",
        {"type": "adagrad", "lr": 0.05},
        EMBEDDING_OPTIMIZERS,
    )
    init = d.get("init", [-0.01, 0.01])
    if (
        not isinstance(init, list | tuple)
        or len(init) != 2
        or not all(is_number(x) and math.isfinite(x) for x in init)
        or not init[0] < init[1]
    ):
        c.bad("embedding.init", "[low, high] with low < high", init)
        init = [-0.01, 0.01]
    bits = c.int_(d, "feature_index_prefix_bit", "embedding", 12)
    if bits is not None and not 1 <= bits <= 32:
        c.bad("embedding.feature_index_prefix_bit", "an int in [1, 32]", bits)
    elif bits is not None:
        expected = prefix_bits_expected(len(slots), bits)
        if expected is not None:
            c.bad("embedding.feature_index_prefix_bit", expected, bits)
    capacity = c.int_(d, "capacity", "embedding", 1_000_000)
    shards = c.int_(d, "shards", "embedding", 1)
    admit = c.number(
        d, "admit_probability", "embedding", 1.0, lambda v: 0 <= v <= 1, "a number in [0, 1]"
    )
    min_count = c.int_(d, "admit_min_count", "embedding", 0, minimum=0)
    bound = c.number(
        d,
        "weight_bound",
        "embedding",
        10.0,
        None,
        "a number (> 0: clip to [-bound, bound]; <= 0: no clipping)",
    )
    tier_dir = c.str_(d, "disk_tier_dir", "embedding", None)
    tier_cap = c.int_(d, "disk_tier_capacity", "embedding", None)
    if (tier_dir is None) != (tier_cap is None):
        c.add("embedding.disk_tier_dir and embedding.disk_tier_capacity must be set together")
    if c.problems or not slots:
        return None
    return EmbeddingSpec(
        slots=assign_prefixes(slots),
        optimizer=opt,
        optimizer_args=opt_args,
        capacity=capacity,
        shards=shards,
        admit_probability=admit,
        admit_min_count=min_count,
        init=(float(init[0]), float(init[1])),
        weight_bound=bound,
        feature_index_prefix_bit=bits,
        disk_tier_dir=tier_dir,
        disk_tier_capacity=tier_cap,
        row_rounding=rounding,
    )


def _model(c: Problems, raw: object) -> ModelSpec:
    d = c.section(raw, "model", ("type", "args", "output"))
    kind = c.str_(d, "type", "model", "dnn")
    if kind and kind not in BUILTIN_MODELS:
        module, _, cls = kind.partition(":")
        if not module or not cls or not all(p.isidentifier() for p in module.split(".")):
            c.bad(
                "model.type",
                f"one of {', '.join(BUILTIN_MODELS)} or 'package.module:Class'",
                kind,
            )
    args = d.get("args") or {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        c.bad("model.args", "a mapping of keyword arguments", args)
        args = {}
    output = c.choice(d, "output", "model", "logits", ("logits", "probability"))
    return ModelSpec(kind or "dnn", dict(args), output)


_TRAINING_KEYS = (
    "backend",
    "batch_size",
    "epochs",
    "max_samples",
    "staleness",
    "seed",
    "reproducible",
    "dense_optimizer",
    "eval_every_batches",
    "eval_batch_size",
    "eval_max_samples",
    "checkpoint_dir",
    "checkpoint_every_batches",
    "log_every_batches",
    "progress",
    "forward_buffer_size",
)


def _training(c: Problems, raw: object) -> TrainingSpec:
    d = c.section(raw, "training", _TRAINING_KEYS)
    backend = c.choice(d, "backend", "training", "local", ("local", "ray"))
    seed = c.int_(d, "seed", "training", 0, minimum=0)
    if seed is not None and seed >= 2**32:
        c.bad("training.seed", "an int in [0, 2**32)", seed)
    opt, opt_args = _optimizer(
        c,
        d.get("dense_optimizer"),
        "training.dense_optimizer",
        {"type": "adam", "lr": 0.005},
        DENSE_OPTIMIZERS,
    )
    ckpt = d.get("checkpoint_dir")
    if ckpt is not None and (not isinstance(ckpt, str) or not ckpt):
        c.bad("training.checkpoint_dir", "a directory path or null", ckpt)
        ckpt = None
    return TrainingSpec(
        backend=backend,
        batch_size=c.int_(d, "batch_size", "training", 128),
        epochs=c.int_(d, "epochs", "training", 1),
        max_samples=c.int_(d, "max_samples", "training", None),
        staleness=c.int_(d, "staleness", "training", 8),
        seed=seed,
        reproducible=c.bool_(d, "reproducible", "training", True),
        dense_optimizer=opt,
        dense_optimizer_args=opt_args,
        eval_every_batches=c.int_(d, "eval_every_batches", "training", 0, minimum=0),
        eval_batch_size=c.int_(d, "eval_batch_size", "training", 4096),
        eval_max_samples=c.int_(d, "eval_max_samples", "training", None),
        checkpoint_dir=ckpt,
        checkpoint_every_batches=c.int_(d, "checkpoint_every_batches", "training", 0, minimum=0),
        log_every_batches=c.int_(d, "log_every_batches", "training", 100),
        progress=c.choice(d, "progress", "training", "auto", ("auto", "bar", "log", "none")),
        forward_buffer_size=c.int_(d, "forward_buffer_size", "training", 10),
    )


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_job(
    raw: object, base_dir: str | os.PathLike = ".", source: str | None = None
) -> JobConfig:
    """Validates a parsed job file; relative data paths are taken from ``base_dir``.

    Raises:
        ConfigError: listing every problem of the file.
    """
    c = Problems(positive_int="an int >= 1", null_is_absent=True)
    top = c.section(raw, "<top level>", ("data", "embedding", "model", "training", "metrics"))
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(c.problems, source=source)
    data = _data(c, top.get("data", MISSING), Path(base_dir))
    embedding = _embedding(c, top.get("embedding"), data)
    model = _model(c, top.get("model"))
    training = _training(c, top.get("training"))
    metrics = MetricsConfig()
    if top.get("metrics") is not None:
        metrics = parse_metrics_config(c, top.get("metrics"), "metrics")
    if c.problems or data is None or embedding is None:
        raise ConfigError(c.problems or ["data: missing"], source=source)
    return JobConfig(data, embedding, model, training, source, metrics)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: object, overrides: list[str]) -> dict:
    """Applies ``section.key=value`` overrides (values read as YAML) to a parsed job file.

    Raises:
        ConfigError: an override that is not ``dotted.path=value`` or that goes through a value
            that is not a mapping.
    """
    out = dict(raw) if isinstance(raw, Mapping) else {}
    problems = []
    for item in overrides:
        path, eq, text = item.partition("=")
        keys = path.strip().split(".")
        if not eq or not all(keys):
            problems.append(f"--set {item!r}: expected dotted.key=value")
            continue
        node = out
        ok = True
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                where = ".".join(keys[: i + 1])
                problems.append(f"--set {item!r}: {where} is {child!r}, not a mapping")
                ok = False
                break
            child = dict(child)
            node[key] = child
            node = child
        if ok:
            node[keys[-1]] = _parse_value(text)
    if problems:
        raise ConfigError(problems, source="command line")
    return out


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Reads, overrides and validates a job file.

    Raises:
        ConfigError: the file is missing or not YAML, or lists every problem found.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(p)) from None
    if not overrides:
        return parse_job(raw, p.resolve().parent, source=str(p))
    raw = apply_overrides(raw, overrides)
    try:
        return parse_job(raw, p.resolve().parent, source=str(p))
    except ConfigError as exc:
        raise _blame_overrides(exc, overrides, str(p)) from None


def _blame_overrides(exc: ConfigError, overrides: list[str], source: str) -> ConfigError:
    """``exc`` with each problem of a key given by ``--set`` marked as such (the last one of a
    key wins, as when applied); blamed on the command line when every problem is one."""
    given = {item.partition("=")[0].strip(): item for item in overrides}
    problems, from_set = [], 0
    for problem in exc.problems:
        field = problem.split(":", 1)[0]
        item = next(
            (v for k, v in given.items() if field == k or field.startswith((k + ".", k + "["))),
            None,
        )
        if item is None:
            problems.append(problem)
        else:
            problems.append(f"{problem} (from --set {item})")
            from_set += 1
    where = "--set" if from_set == len(problems) else f"{source} with --set"
    return ConfigError(problems, source=where if from_set else source)
