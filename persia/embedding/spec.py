"""The one description of an embedding layer: :class:`EmbeddingSpec`, with one :class:`SlotSpec`
per slot.

Both front ends parse into it: PERSIA's two YAML files plus the hyperparameters a PERSIA script
passes in Python (:func:`persia.embedding.config.embedding_spec` / ``load_spec``), and the
``embedding`` section of a job file (:func:`persia.job.config.parse_job`, whose
``JobConfig.embedding`` is an :class:`EmbeddingSpec`). The builders of the store
(:mod:`persia.store.build`), the embedding worker (``EmbeddingWorker.from_spec``) and the runtimes
(``persia.runtime.local.runtime_from_spec``, ``persia.backends.ray.runtime.ray_runtime_from_spec``)
take nothing else.

This module also holds the single definition of what the layers share: the pooling names
(:data:`POOLINGS`), the embedding optimizers' names and options (:data:`EMBEDDING_OPTIMIZERS`),
PERSIA's key-prefix rule (:func:`assign_prefixes`) and how a capacity is split among parameter
servers (:func:`per_shard_capacity`).

**Key prefixes** (PERSIA's rule): the feature groups in order, then every slot that is in no group,
in order, each as a group of its own, are numbered ``g = 0, 1, ...``; a slot's prefix is ``g + 1``,
and the key of ID ``x`` is ``(prefix << (64 - bits)) | (x & key_mask)``.

It imports neither numpy nor torch nor numba (``persia validate`` stays fast).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from persia.embedding._problems import is_int, is_number
from persia.errors import ConfigError
from persia.logger import get_logger, warn_once

__all__ = [
    "POOLINGS",
    "ROW_DTYPES",
    "ROW_ROUNDINGS",
    "DEFAULT_FEATURE_INDEX_PREFIX_BIT",
    "EMBEDDING_OPTIMIZERS",
    "SlotSpec",
    "EmbeddingSpec",
    "prefix_order",
    "assign_prefixes",
    "prefix_bits_expected",
    "per_shard_capacity",
    "spec_to_dict",
    "spec_from_dict",
]

_log = get_logger("persia.embedding.spec")

#: Pooling of a slot's IDs per sample: sum; mean; sum * 1/sqrt(n); raw (padded sequence + mask).
POOLINGS = ("sum", "mean", "sqrt", "raw")
#: How the parameter servers store a slot's rows (optimizer state stays float32), the default
#: first: ``float16`` / ``bfloat16`` halve the values' memory (persia.store.table).
ROW_DTYPES = ("float32", "float16", "bfloat16")
#: How an update rounds a half-precision row back: to nearest (ties to even), the default, which
#: measured the better AUC; or stochastically (unbiased). See benchmarks/README.md.
ROW_ROUNDINGS = ("nearest", "stochastic")
#: Default of ``feature_index_prefix_bit``: 12, as PERSIA's examples and persia's worker use
#: (2**12 - 1 groups, 52 ID bits); PERSIA's code defaulted to 8.
DEFAULT_FEATURE_INDEX_PREFIX_BIT = 12
#: The embedding optimizers by name (:func:`persia.embedding.optim.build_optimizer`), with the
#: options each takes.
EMBEDDING_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "weight_decay"),
    "adagrad": ("lr", "initial_accumulator_value", "weight_decay", "g_square_momentum", "eps"),
    "rowwise_adagrad": (
        "lr",
        "initial_accumulator_value",
        "weight_decay",
        "g_square_momentum",
        "eps",
    ),
    "adam": ("lr", "betas", "weight_decay", "eps"),
}


def per_shard_capacity(capacity: int, num_shards: int) -> int:
    """The rows each of ``num_shards`` parameter servers holds so that they hold ``capacity``
    in all: ``ceil(capacity / num_shards)``."""
    return -(-capacity // num_shards)


@dataclass(frozen=True)
class SlotSpec:
    """How one slot (ID-type feature) is embedded; what the embedding worker takes.

    Attributes:
        name: the feature name in the batch.
        dim: embedding dim.
        pooling: "sum", "mean", "sqrt" (sum times 1/sqrt(n)) or "raw" (:data:`POOLINGS`).
        prefix: the slot's (or its feature group's) key prefix, not shifted (``g + 1``).
        sample_fixed_size: for "raw", how many IDs per sample are kept.
        hash_stack_rounds: PERSIA's hash stacking: each ID becomes this many keys in a table
            of ``hash_stack_size`` rows whose embeddings are summed (0 = off).
        hash_stack_size: see above.
        group: the feature group the slot is in (its own name when it is in no group).
        row_dtype: how the parameter servers store its rows (:data:`ROW_DTYPES`). The store
            holds one table per dim, so slots of one dim must agree.
    """

    name: str
    dim: int
    pooling: str = "sum"
    prefix: int = 0
    sample_fixed_size: int = 10
    hash_stack_rounds: int = 0
    hash_stack_size: int = 0
    group: str = ""
    row_dtype: str = "float32"


def prefix_order(
    slot_names: Iterable[str], feature_groups: Iterable[tuple[str, Sequence[str]]] = ()
) -> tuple[str, ...]:
    """The prefix groups in number order (PERSIA's rule, module doc): the feature groups, then
    every slot in no group. Group ``order[g]`` has prefix ``g + 1``."""
    groups = [(g, tuple(members)) for g, members in feature_groups]
    grouped = {m for _, members in groups for m in members}
    return tuple(g for g, _ in groups) + tuple(n for n in slot_names if n not in grouped)


def assign_prefixes(
    slots: Sequence[SlotSpec], feature_groups: Iterable[tuple[str, Sequence[str]]] = ()
) -> tuple[SlotSpec, ...]:
    """``slots`` with their ``group`` and ``prefix`` set by PERSIA's rule (module doc).

    Args:
        slots: the slots, in order.
        feature_groups: ``(group, (slot, ...))`` in order; a slot is in one group at most.
    """
    groups = [(g, tuple(members)) for g, members in feature_groups]
    group_of = {m: g for g, members in groups for m in members}
    order = prefix_order((s.name for s in slots), groups)
    number = {g: i + 1 for i, g in enumerate(order)}
    out = []
    for s in slots:
        group = group_of.get(s.name, s.name)
        out.append(replace(s, group=group, prefix=number[group]))
    return tuple(out)


def prefix_bits_expected(count: int, bits: int) -> str | None:
    """None when ``bits`` prefix bits give ``count`` prefixes, else what is expected instead."""
    if count <= (1 << bits) - 1:
        return None
    return (
        f"enough bits for {count} prefixes (feature groups + ungrouped slots); "
        f"{bits} bits give {(1 << bits) - 1}"
    )


@dataclass(frozen=True)
class EmbeddingSpec:
    """The embedding layer: its slots, its parameter servers and how new rows are made.

    Attributes:
        slots: the slots, in order, each with its group and key prefix.
        optimizer: the embedding optimizer's name (:data:`EMBEDDING_OPTIMIZERS`); None: none
            (an evaluation or serving store, which adopts a checkpoint's optimizer).
        optimizer_args: the optimizer's options (those not given take its defaults).
        capacity: rows over all parameter servers before LRU eviction.
        shards: the number of parameter-server shards (PERSIA's
            ``num_hashmap_internal_shards``).
        admit_probability: probability in ``[0, 1]`` that a new key gets a row on a training
            lookup that misses it (PERSIA's range; 0: no row is ever made, with a warning).
        admit_min_count: a new key gets a row only once training lookups have missed it this
            many times (0 or 1: at once; the store's ``Admission.min_count``, counted in a
            count-min sketch).
        init: ``(low, high)`` of the uniform initialisation of a new row.
        weight_bound: values are clipped to ``[-weight_bound, weight_bound]`` after each update
            when ``> 0``; ``<= 0`` (PERSIA's "off", e.g. 0) or ``inf``: no clipping.
        feature_index_prefix_bit: top bits of a key that hold the slot/group prefix.
        feature_groups: ``(group, (slot, ...))`` as written (slots of a group share a prefix).
        seed: seed of new rows' initialisation and admission draws; None: the one of
            :func:`persia.utils.embedding_seed` when the store is built.
        incremental: write deltas of the changed rows (PERSIA's ``enable_incremental_update``).
        incremental_dir: where the deltas go.
        incremental_buffer_size: rows per delta.
        disk_tier_dir: keep rows evicted from RAM on disk in this directory (None: they are
            dropped); set with ``disk_tier_capacity``, the most rows on disk over all parameter
            servers (``persia.store.disk``).
        row_rounding: how updates round half-precision rows (:data:`ROW_ROUNDINGS`).

    Raises:
        ConfigError: listing every invalid field (``slot 'age': dim must be > 0, got 0``).
    """

    slots: tuple[SlotSpec, ...]
    optimizer: str | None = None
    optimizer_args: Mapping[str, Any] = field(default_factory=dict)
    capacity: int = 1_000_000_000
    shards: int = 1
    admit_probability: float = 1.0
    admit_min_count: int = 0
    init: tuple[float, float] = (-0.01, 0.01)
    weight_bound: float = 10.0
    feature_index_prefix_bit: int = DEFAULT_FEATURE_INDEX_PREFIX_BIT
    feature_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    seed: int | None = None
    incremental: bool = False
    incremental_dir: str = "/workspace/incremental_dir/"
    incremental_buffer_size: int = 1_000_000
    disk_tier_dir: str | None = None
    disk_tier_capacity: int | None = None
    row_rounding: str = "nearest"

    def __post_init__(self) -> None:
        problems = self._slot_problems()
        bits = self.feature_index_prefix_bit
        if not is_int(bits) or not 1 <= bits <= 63:
            problems.append(f"feature_index_prefix_bit must be an int in [1, 63], got {bits!r}")
        elif any(s.prefix >= 1 << bits for s in self.slots):
            problems.append(f"feature_index_prefix_bit: {bits} bits cannot hold every prefix")
        for name in ("capacity", "shards", "incremental_buffer_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name} must be an int > 0, got {value!r}")
        if self.optimizer is not None and self.optimizer not in EMBEDDING_OPTIMIZERS:
            problems.append(
                f"optimizer must be one of {', '.join(EMBEDDING_OPTIMIZERS)} or None, "
                f"got {self.optimizer!r}"
            )
        elif self.optimizer is not None:
            unknown = sorted(set(self.optimizer_args) - set(EMBEDDING_OPTIMIZERS[self.optimizer]))
            if unknown:
                problems.append(f"optimizer_args: unknown option(s) of {self.optimizer}: {unknown}")
        p = self.admit_probability
        if not is_number(p) or not 0 <= p <= 1:
            problems.append(f"admit_probability must be a number in [0, 1], got {p!r}")
        if not is_int(self.admit_min_count) or self.admit_min_count < 0:
            problems.append(f"admit_min_count must be an int >= 0, got {self.admit_min_count!r}")
        init = self.init
        if (
            not isinstance(init, tuple)
            or len(init) != 2
            or not all(is_number(x) and math.isfinite(x) for x in init)
            or not init[0] < init[1]
        ):
            problems.append(f"init must be (low, high) with finite low < high, got {init!r}")
        bound = self.weight_bound
        if not is_number(bound) or math.isnan(bound):
            problems.append(
                f"weight_bound must be a number (> 0: clip; <= 0 or inf: no clipping), got {bound!r}"
            )
        tier_dir, tier_cap = self.disk_tier_dir, self.disk_tier_capacity
        if tier_dir is not None and (not isinstance(tier_dir, str) or not tier_dir.strip()):
            problems.append(f"disk_tier_dir must be a non-empty path or None, got {tier_dir!r}")
        if tier_cap is not None and (not is_int(tier_cap) or tier_cap < 1):
            problems.append(f"disk_tier_capacity must be an int > 0 or None, got {tier_cap!r}")
        if (tier_dir is None) != (tier_cap is None):
            problems.append(
                "disk_tier_dir and disk_tier_capacity must be set together, got "
                f"{tier_dir!r} and {tier_cap!r}"
            )
        elif tier_cap is not None and is_int(self.shards) and self.shards > 0:
            if -(-tier_cap // self.shards) >= 2**31:
                problems.append(
                    f"disk_tier_capacity must be < 2**31 rows per shard, got {tier_cap} "
                    f"over {self.shards} shard(s)"
                )
        if self.row_rounding not in ROW_ROUNDINGS:
            problems.append(
                f"row_rounding must be one of {', '.join(ROW_ROUNDINGS)}, got {self.row_rounding!r}"
            )
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            problems.append(f"seed must be an int >= 0 or None, got {self.seed!r}")
        if problems:
            raise ConfigError(problems, source="EmbeddingSpec")
        if p == 0 and self.optimizer is not None:
            warn_once(
                _log,
                "admit_probability=0",
                "admit_probability is 0: no key will ever get a row, so every embedding reads "
                "zeros and none is trained (PERSIA accepts 0 with this meaning)",
            )

    def _slot_problems(self) -> list[str]:
        problems: list[str] = []
        if not self.slots:
            problems.append("slots: expected at least one slot")
        seen: set[str] = set()
        dtype_of_dim: dict[int, SlotSpec] = {}
        for s in self.slots:
            where = f"slot {s.name!r}"
            if s.name in seen:
                problems.append(f"{where}: given twice")
            seen.add(s.name)
            if not is_int(s.dim) or s.dim < 1:
                problems.append(f"{where}: dim must be > 0, got {s.dim!r}")
            if s.pooling not in POOLINGS:
                problems.append(
                    f"{where}: pooling must be one of {', '.join(POOLINGS)}, got {s.pooling!r}"
                )
            if not is_int(s.sample_fixed_size) or s.sample_fixed_size < 1:
                problems.append(
                    f"{where}: sample_fixed_size must be > 0, got {s.sample_fixed_size!r}"
                )
            if (s.hash_stack_rounds > 0) != (s.hash_stack_size > 0):
                problems.append(
                    f"{where}: hash_stack_rounds and hash_stack_size must both be > 0 or both 0, "
                    f"got {s.hash_stack_rounds!r} and {s.hash_stack_size!r}"
                )
            if s.row_dtype not in ROW_DTYPES:
                problems.append(
                    f"{where}: row_dtype must be one of {', '.join(ROW_DTYPES)}, "
                    f"got {s.row_dtype!r}"
                )
            else:
                other = dtype_of_dim.setdefault(s.dim, s)
                if other.row_dtype != s.row_dtype:
                    problems.append(
                        f"{where}: row_dtype {s.row_dtype} differs from slot {other.name!r}'s "
                        f"{other.row_dtype}: slots of one dim ({s.dim}) share one table, so "
                        "they must have the same row_dtype"
                    )
            if not is_int(s.prefix) or s.prefix < 1:
                problems.append(
                    f"{where}: prefix must be > 0 (see assign_prefixes), got {s.prefix!r}"
                )
        return problems

    # ------------------------------------------------------------------ queries
    @property
    def slot_names(self) -> tuple[str, ...]:
        """The slot names, in order."""
        return tuple(s.name for s in self.slots)

    @property
    def dims(self) -> tuple[int, ...]:
        """The distinct embedding dims, ascending."""
        return tuple(sorted({s.dim for s in self.slots}))

    @property
    def row_dtypes(self) -> dict[int, str]:
        """``{dim: row dtype}`` of every dim (the store's ``row_dtype``)."""
        return {s.dim: s.row_dtype for s in self.slots}

    @property
    def key_mask(self) -> int:
        """``2**(64 - feature_index_prefix_bit) - 1``: the bits of an ID kept in its key."""
        return (1 << (64 - self.feature_index_prefix_bit)) - 1

    def slot(self, name: str) -> SlotSpec:
        """The slot ``name``; ConfigError naming the known slots if there is none."""
        for s in self.slots:
            if s.name == name:
                return s
        raise ConfigError(f"unknown slot {name!r} (slots: {', '.join(self.slot_names)})")

    def prefix_of(self, name: str) -> int:
        """The key prefix of slot ``name`` (not shifted)."""
        return self.slot(name).prefix

    def shard_capacity(self, num_shards: int) -> int:
        """Rows per parameter server when ``num_shards`` of them hold :attr:`capacity`."""
        return per_shard_capacity(self.capacity, num_shards)


_SLOT_FIELDS = (
    "name",
    "dim",
    "pooling",
    "prefix",
    "sample_fixed_size",
    "hash_stack_rounds",
    "hash_stack_size",
    "group",
)
_SPEC_FIELDS = (
    "optimizer",
    "optimizer_args",
    "capacity",
    "shards",
    "admit_probability",
    "init",
    "weight_bound",
    "feature_index_prefix_bit",
    "feature_groups",
    "seed",
    "incremental",
    "incremental_dir",
    "incremental_buffer_size",
)
#: fields a spec written before they existed lacks (their defaults then)
_SLOT_OPTIONAL = ("row_dtype",)
_SPEC_OPTIONAL = ("row_rounding",)


def spec_to_dict(spec: EmbeddingSpec) -> dict[str, Any]:
    """``spec`` as plain JSON values (what checkpoints record for serving);
    :func:`spec_from_dict` reads it back to an equal spec."""
    names = _SLOT_FIELDS + _SLOT_OPTIONAL
    out: dict[str, Any] = {"slots": [{f: getattr(s, f) for f in names} for s in spec.slots]}
    for f in _SPEC_FIELDS + _SPEC_OPTIONAL:
        out[f] = getattr(spec, f)
    out["optimizer_args"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in spec.optimizer_args.items()
    }
    out["init"] = list(spec.init)
    out["feature_groups"] = [[g, list(members)] for g, members in spec.feature_groups]
    if math.isinf(spec.weight_bound):
        out["weight_bound"] = "inf"  # JSON has no infinity
    return out


def spec_from_dict(data: Any, source: str | None = None) -> EmbeddingSpec:
    """The :class:`EmbeddingSpec` that :func:`spec_to_dict` wrote.

    Raises:
        ConfigError: ``data`` is not such a dict, or the spec it gives is invalid.
    """
    where = source or "embedding spec"
    if not isinstance(data, Mapping) or not isinstance(data.get("slots"), list):
        raise ConfigError(f"{where}: expected a dict with a list of slots, got {data!r:.200}")
    slots = []
    for raw in data["slots"]:
        if (
            not isinstance(raw, Mapping)
            or not set(_SLOT_FIELDS) <= set(raw)
            or not set(raw) <= set(_SLOT_FIELDS + _SLOT_OPTIONAL)
        ):
            raise ConfigError(
                f"{where}: a slot must have exactly the fields {list(_SLOT_FIELDS)} "
                f"(and optionally {list(_SLOT_OPTIONAL)}), got {raw!r:.200}"
            )
        slots.append(SlotSpec(**{f: raw[f] for f in _SLOT_FIELDS + _SLOT_OPTIONAL if f in raw}))
    missing = [f for f in _SPEC_FIELDS if f not in data]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    fields = {f: data[f] for f in _SPEC_FIELDS}
    fields.update({f: data[f] for f in _SPEC_OPTIONAL if f in data})
    try:
        fields["optimizer_args"] = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in dict(fields["optimizer_args"]).items()
        }
        fields["init"] = tuple(fields["init"])
        fields["feature_groups"] = tuple(
            (str(g), tuple(members)) for g, members in fields["feature_groups"]
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: malformed field: {exc}") from None
    if fields["weight_bound"] == "inf":
        fields["weight_bound"] = math.inf
    return EmbeddingSpec(slots=tuple(slots), **fields)
