"""PERSIA's two YAML files, loaded strictly into frozen dataclasses.

``embedding_config.yml`` (:func:`load_embedding_config` -> :class:`EmbeddingFileConfig`)::

    feature_index_prefix_bit: 12       # default 12 (PERSIA's code said 8, its examples use 12)
    slots_config:                      # required: one entry per slot (ID-type feature)
      workclass:
        dim: 8                         # required, > 0
        embedding_summation: true      # default true; false = "raw" (padded sequence + mask)
        sqrt_scaling: false            # default false; true = sum * 1/sqrt(n)
        sample_fixed_size: 10          # default 10; sequence length of raw slots
        hash_stack_config:             # default off (both 0)
          hash_stack_rounds: 0
          embedding_size: 0
        pooling: sum                   # persia extension: sum | mean | sqrt | raw
        row_dtype: float16             # persia extension: float32 | float16 | bfloat16
    row_dtype: float32                 # persia extension: every slot's default (float32)
    row_rounding: nearest              # persia extension: nearest | stochastic
    feature_groups:                    # default {}: slots of one group share one key prefix
      group1: [workclass, education]

``pooling`` is derived from PERSIA's keys (``embedding_summation: false`` -> ``raw``;
``sqrt_scaling: true`` -> ``sqrt``; else ``sum``) unless the persia extension key ``pooling`` is
given (``mean`` exists only there); ``pooling`` contradicting the PERSIA keys given beside it is an
error.

``row_dtype`` (persia extension; top level for every slot, per slot to override) is how the
parameter servers store the slot's rows: ``float32`` (PERSIA's only choice), ``float16`` or
``bfloat16`` (half the values' memory; the optimizer state stays float32, lookups and gradients
stay float32). The store keeps one table per dim, so slots of one dim must have the same
``row_dtype``. ``row_rounding`` is how an update rounds a half row back: ``nearest`` (ties to
even, the default) or ``stochastic``.

**Key prefixes** (PERSIA's rule, kept so that keys match): the feature groups in file order, then
every slot that is in no group, in file order, each as a group of its own, are numbered
``g = 0, 1, ...``. A slot's prefix is ``g + 1`` (:meth:`EmbeddingFileConfig.prefix_of`, the value
:func:`persia.worker.pooling.add_prefix` takes); PERSIA's shifted form is
``index_prefix = (g + 1) << (64 - bits)`` (``SlotConfig.index_prefix``), and the key of ID ``x``
is ``(x & key_mask) | index_prefix`` with ``key_mask = 2**(64 - bits) - 1`` (PERSIA wrote
``x % 2**(64 - bits) + index_prefix``: the same value). The number of groups must be at most
``2**bits - 1``. ``index_prefix`` may not be set by hand (PERSIA refused it too).

``global_config.yml`` (:func:`load_global_config` -> :class:`GlobalConfig`)::

    common_config:
      job_type: Train                  # Train | Infer (any case); TrainCtx refuses Infer
      checkpointing_config: {num_workers: 4}
      metrics_config: {enable_metrics: false, push_interval_seconds: 10, job_name: ...}
      infer_config: {servers: [host:port, ...], embedding_checkpoint: /path}  # InferCtx's ckpt
    embedding_worker_config:
      forward_buffer_size: 1000
    embedding_parameter_server_config:
      capacity: 1000000000             # rows per parameter server before LRU eviction
      num_hashmap_internal_shards: 1   # shards of the table (PERSIA's default was 100)
      enable_incremental_update: false # deltas of changed rows (incremental_buffer_size rows each)
      incremental_dir: /workspace/incremental_dir/  # TrainCtx writes them, InferCtx follows
      admit_min_count: 0               # persia extension: a new key gets a row only once training
                                       # lookups missed it this many times (0 or 1: at once)

Every key PERSIA's own configs and docs use is accepted. Keys persia builds on are used; keys of
features persia has not built (PERSIA's I/O tuning knobs) are
accepted with a one-time warning when set to something other than PERSIA's default; PERSIA's
misspellings and old names (``push_interval_sec``, ``slot_config``, ``intent``,
``shard_server_config``, ...) are accepted with a warning naming the right key. Anything else
(an unknown key, a wrong type, a bad value) is an error, and one :class:`~persia.errors.ConfigError`
lists every problem of the file at once, each as ``path: expected ..., got ...``.

Files are found by explicit argument, else the ``PERSIA_EMBEDDING_CONFIG`` /
``PERSIA_GLOBAL_CONFIG`` environment variables (as PERSIA's launcher sets them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from persia import _settings
from persia.embedding import EmbeddingConfig
from persia.embedding._problems import MISSING, Problems, join
from persia.embedding.optim import EmbeddingOptimizer, optimizer_spec
from persia.embedding.spec import (
    DEFAULT_FEATURE_INDEX_PREFIX_BIT,
    POOLINGS,
    ROW_DTYPES,
    ROW_ROUNDINGS,
    EmbeddingSpec,
    SlotSpec,
    prefix_bits_expected,
    prefix_order,
)
from persia.errors import ConfigError
from persia.logger import get_logger
from persia.utils import load_yaml

__all__ = [
    "POOLINGS",
    "DEFAULT_FEATURE_INDEX_PREFIX_BIT",
    "HashStackConfig",
    "SlotConfig",
    "EmbeddingFileConfig",
    "CheckpointingConfig",
    "MetricsConfig",
    "InferConfig",
    "CommonConfig",
    "EmbeddingWorkerConfig",
    "EmbeddingParameterServerConfig",
    "GlobalConfig",
    "parse_embedding_config",
    "parse_global_config",
    "load_embedding_config",
    "load_global_config",
    "embedding_spec",
    "load_spec",
    "persia_configs",
]

_log = get_logger("persia.embedding.config")

JOB_TYPES = ("train", "infer")


# --------------------------------------------------------------------------------------------
# The dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HashStackConfig:
    """PERSIA's hash stacking: each ID maps to ``hash_stack_rounds`` IDs in ``[0, embedding_size)``
    whose embeddings are summed. Both 0: off."""

    hash_stack_rounds: int = 0
    embedding_size: int = 0

    @property
    def enabled(self) -> bool:
        """Whether hash stacking is on."""
        return self.hash_stack_rounds > 0


@dataclass(frozen=True)
class SlotConfig:
    """One slot of ``slots_config``, with its computed group and key prefix.

    ``prefix`` is the group number ``g + 1`` (in ``[1, 2**feature_index_prefix_bit)``), the value
    :func:`persia.worker.pooling.add_prefix` takes; ``index_prefix`` is PERSIA's form of the same,
    already shifted into the top bits: ``prefix << (64 - feature_index_prefix_bit)``.
    """

    name: str
    dim: int
    embedding_summation: bool = True
    sample_fixed_size: int = 10
    sqrt_scaling: bool = False
    hash_stack_config: HashStackConfig = HashStackConfig()
    pooling: str = "sum"
    capacity: int | None = None
    row_dtype: str | None = None
    group: str = ""
    prefix: int = 0
    index_prefix: int = 0


@dataclass(frozen=True)
class EmbeddingFileConfig:
    """The content of ``embedding_config.yml``.

    Attributes:
        feature_index_prefix_bit: top bits of a key that hold the slot/group prefix.
        slots: the slots, in file order.
        feature_groups: the groups as written, ``(group, (slot, ...))`` in file order.
        source: the file it came from, if any.
        warnings: the warnings the file produced (also logged once).
    """

    feature_index_prefix_bit: int
    slots: tuple[SlotConfig, ...]
    feature_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    source: str | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    row_dtype: str = "float32"
    row_rounding: str = "nearest"

    def row_dtype_of(self, name: str) -> str:
        """How the rows of slot ``name`` are stored (its ``row_dtype``, else the file's)."""
        own = self.slot(name).row_dtype
        return own if own is not None else self.row_dtype

    @property
    def slot_names(self) -> tuple[str, ...]:
        """The slot names, in file order."""
        return tuple(s.name for s in self.slots)

    def slot(self, name: str) -> SlotConfig:
        """The slot ``name``; ConfigError naming the known slots if there is none."""
        for s in self.slots:
            if s.name == name:
                return s
        raise ConfigError(
            f"unknown slot {name!r}: not in slots_config (slots: {', '.join(self.slot_names)})",
            source=self.source,
        )

    def prefix_of(self, name: str) -> int:
        """The key prefix of slot ``name``: its group number ``g + 1``, not shifted.

        The key of ID ``x`` is ``(prefix << (64 - feature_index_prefix_bit)) | (x & key_mask)``
        (``SlotConfig.index_prefix`` holds the shifted form).
        """
        return self.slot(name).prefix

    def group_of(self, name: str) -> str:
        """The feature group of slot ``name`` (its own name when it is in no group)."""
        return self.slot(name).group

    @property
    def key_mask(self) -> int:
        """``2**(64 - feature_index_prefix_bit) - 1``: the bits of an ID kept in its key."""
        return (1 << (64 - self.feature_index_prefix_bit)) - 1

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`parse_embedding_config` reads back to an equal config."""
        slots: dict[str, Any] = {}
        for s in self.slots:
            entry: dict[str, Any] = {
                "dim": s.dim,
                "embedding_summation": s.embedding_summation,
                "sample_fixed_size": s.sample_fixed_size,
                "sqrt_scaling": s.sqrt_scaling,
                "pooling": s.pooling,
            }
            if s.hash_stack_config.enabled:
                entry["hash_stack_config"] = {
                    "hash_stack_rounds": s.hash_stack_config.hash_stack_rounds,
                    "embedding_size": s.hash_stack_config.embedding_size,
                }
            if s.capacity is not None:
                entry["capacity"] = s.capacity
            if s.row_dtype is not None:
                entry["row_dtype"] = s.row_dtype
            slots[s.name] = entry
        out: dict[str, Any] = {
            "feature_index_prefix_bit": self.feature_index_prefix_bit,
            "slots_config": slots,
            "feature_groups": {g: list(members) for g, members in self.feature_groups},
        }
        if self.row_dtype != "float32":
            out["row_dtype"] = self.row_dtype
        if self.row_rounding != "nearest":
            out["row_rounding"] = self.row_rounding
        return out


@dataclass(frozen=True)
class CheckpointingConfig:
    """``common_config.checkpointing_config``."""

    num_workers: int = 4


@dataclass(frozen=True)
class MetricsConfig:
    """``common_config.metrics_config``: with ``enable_metrics`` every role collects Prometheus
    metrics and, with ``PERSIA_METRICS_GATEWAY_ADDR`` set, pushes them every
    ``push_interval_seconds`` seconds under ``job_name`` (:mod:`persia.telemetry`,
    docs/metrics.md)."""

    enable_metrics: bool = False
    push_interval_seconds: int = 10
    job_name: str = "persia_default_jobname"


@dataclass(frozen=True)
class InferConfig:
    """``common_config.infer_config``: the servers and checkpoint of an inference job."""

    servers: tuple[str, ...] = ()
    embedding_checkpoint: str | None = None


@dataclass(frozen=True)
class CommonConfig:
    """``common_config``."""

    job_type: str = "train"
    checkpointing_config: CheckpointingConfig = CheckpointingConfig()
    metrics_config: MetricsConfig = MetricsConfig()
    infer_config: InferConfig | None = None


@dataclass(frozen=True)
class EmbeddingWorkerConfig:
    """``embedding_worker_config``."""

    forward_buffer_size: int = 1000


@dataclass(frozen=True)
class EmbeddingParameterServerConfig:
    """``embedding_parameter_server_config``."""

    capacity: int = 1_000_000_000
    num_hashmap_internal_shards: int = 1
    full_amount_manager_buffer_size: int = 1000
    enable_incremental_update: bool = False
    incremental_buffer_size: int = 1_000_000
    incremental_dir: str = "/workspace/incremental_dir/"
    incremental_channel_capacity: int = 1000
    admit_min_count: int = 0
    #: persia extension: keep rows evicted from RAM in this directory (None: dropped)
    disk_tier_dir: str | None = None
    #: persia extension: the most rows on disk over all parameter servers
    disk_tier_capacity: int | None = None


@dataclass(frozen=True)
class GlobalConfig:
    """The content of ``global_config.yml``; ``GlobalConfig()`` holds the defaults."""

    common_config: CommonConfig = CommonConfig()
    embedding_worker_config: EmbeddingWorkerConfig = EmbeddingWorkerConfig()
    embedding_parameter_server_config: EmbeddingParameterServerConfig = (
        EmbeddingParameterServerConfig()
    )
    source: str | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (PERSIA's key names) that :func:`parse_global_config` reads back."""
        common = self.common_config
        out: dict[str, Any] = {
            "common_config": {
                "job_type": common.job_type.capitalize(),
                "checkpointing_config": {"num_workers": common.checkpointing_config.num_workers},
                "metrics_config": dict(vars(common.metrics_config)),
            },
            "embedding_worker_config": dict(vars(self.embedding_worker_config)),
            "embedding_parameter_server_config": dict(vars(self.embedding_parameter_server_config)),
        }
        if common.infer_config is not None:
            out["common_config"]["infer_config"] = {
                "servers": list(common.infer_config.servers),
                "embedding_checkpoint": common.infer_config.embedding_checkpoint,
            }
        return out


# --------------------------------------------------------------------------------------------
# embedding_config.yml
# --------------------------------------------------------------------------------------------

_SLOT_KEYS = (
    "dim",
    "embedding_summation",
    "sample_fixed_size",
    "sqrt_scaling",
    "hash_stack_config",
    "index_prefix",
    "capacity",
    "pooling",
    "row_dtype",
)


def _parse_slot(r: Problems, name: str, raw: object, path: str) -> SlotConfig | None:
    spec = r.mapping(raw, path)
    if spec is None:
        return None
    spec = r.keys(spec, path, _SLOT_KEYS)
    dim = r.int_(spec, "dim", path, MISSING)
    summation = r.bool_(spec, "embedding_summation", path, True)
    sqrt_scaling = r.bool_(spec, "sqrt_scaling", path, False)
    fixed = r.int_(spec, "sample_fixed_size", path, 10)

    hs_path = join(path, "hash_stack_config")
    hs = r.mapping(spec.get("hash_stack_config"), hs_path) or {}
    hs = r.keys(hs, hs_path, ("hash_stack_rounds", "embedding_size"))
    rounds = r.int_(hs, "hash_stack_rounds", hs_path, 0, minimum=0)
    size = r.int_(hs, "embedding_size", hs_path, 0, minimum=0)
    if (rounds > 0) != (size > 0):
        r.bad(
            hs_path,
            "hash_stack_rounds and embedding_size both > 0 (on) or both 0 (off)",
            {"hash_stack_rounds": rounds, "embedding_size": size},
        )

    if "index_prefix" in spec and spec["index_prefix"] != 0:
        r.bad(
            join(path, "index_prefix"),
            "0 or no value (persia computes prefixes from feature_groups, as PERSIA did)",
            spec["index_prefix"],
        )
    capacity = None
    if "capacity" in spec:
        capacity = r.int_(spec, "capacity", path, None)
        r.warn(
            join(path, "capacity"),
            "accepted, but has no effect: persia bounds the whole table with "
            "embedding_parameter_server_config.capacity",
        )

    derived = "raw" if not summation else ("sqrt" if sqrt_scaling else "sum")
    pooling = derived
    if "pooling" in spec:
        given = r.str_(spec, "pooling", path, None, choices=POOLINGS)
        if given is not None:
            pooling = given
            where = join(path, "pooling")
            if "embedding_summation" in spec and summation != (given != "raw"):
                r.bad(where, f"a pooling that agrees with embedding_summation: {summation}", given)
            if "sqrt_scaling" in spec and sqrt_scaling and given != "sqrt":
                r.bad(where, "sqrt (sqrt_scaling is true)", given)
            summation, sqrt_scaling = given != "raw", given == "sqrt"
    elif not summation and sqrt_scaling:
        r.warn(
            join(path, "sqrt_scaling"),
            "accepted, but has no effect: embedding_summation is false (raw slot)",
        )
        sqrt_scaling = False
    row_dtype = r.str_(spec, "row_dtype", path, None, choices=ROW_DTYPES)
    if dim is MISSING:
        return None
    return SlotConfig(
        name=name,
        dim=dim,
        embedding_summation=summation,
        sample_fixed_size=fixed,
        sqrt_scaling=sqrt_scaling,
        hash_stack_config=HashStackConfig(rounds, size),
        pooling=pooling,
        capacity=capacity,
        row_dtype=row_dtype,
    )


def parse_embedding_config(data: object, source: str | None = None) -> EmbeddingFileConfig:
    """Validates an in-memory ``embedding_config.yml`` document.

    Args:
        data: the parsed YAML (a dict).
        source: where it came from, for messages.

    Returns:
        The config, slots with their pooling, group and key prefix computed.

    Raises:
        ConfigError: listing every problem.
    """
    r = Problems()
    top = r.mapping(data, "")
    if top is None:
        raise ConfigError(r.problems, source=source)
    top = r.keys(
        top,
        "",
        ("feature_index_prefix_bit", "slots_config", "feature_groups", "row_dtype", "row_rounding"),
        renamed={"slot_config": "slots_config", "slot_configs": "slots_config"},
    )
    bits = r.int_(
        top, "feature_index_prefix_bit", "", DEFAULT_FEATURE_INDEX_PREFIX_BIT, minimum=1, maximum=63
    )

    row_dtype = r.str_(top, "row_dtype", "", "float32", choices=ROW_DTYPES)
    rounding = r.str_(top, "row_rounding", "", "nearest", choices=ROW_ROUNDINGS)
    slots: list[SlotConfig] = []
    raw_slots = top.get("slots_config", MISSING)
    slot_map: dict = {}
    if raw_slots is MISSING:
        r.bad("slots_config", "a mapping of slot name -> slot config (required)", MISSING)
    else:
        parsed = r.mapping(raw_slots, "slots_config")
        if parsed == {}:
            r.bad("slots_config", "at least one slot", raw_slots)
        slot_map = parsed or {}
    for name, spec in slot_map.items():
        path = join("slots_config", name)
        if not isinstance(name, str) or not name:
            r.bad(path, "a non-empty slot name", name)
            continue
        slot = _parse_slot(r, name, spec, path)
        if slot is not None:
            slots.append(slot)
    known = set(slot_map)

    groups: list[tuple[str, tuple[str, ...]]] = []
    group_of: dict[str, str] = {}
    for gname, members in (r.mapping(top.get("feature_groups"), "feature_groups") or {}).items():
        path = join("feature_groups", gname)
        if not isinstance(gname, str) or not gname:
            r.bad(path, "a non-empty group name", gname)
            continue
        if not isinstance(members, list) or not members:
            r.bad(path, "a non-empty list of slot names", members)
            continue
        kept: list[str] = []
        for member in members:
            if not isinstance(member, str) or member not in known:
                r.add(f"{path}: unknown slot {member!r} (not in slots_config)")
            elif member in group_of:
                where = "this group" if group_of[member] == gname else f"group {group_of[member]!r}"
                r.add(f"{path}: slot {member!r} is already in {where}")
            else:
                group_of[member] = gname
                kept.append(member)
        groups.append((gname, tuple(kept)))
    group_names = {g for g, _ in groups}
    for slot in slots:
        if slot.name not in group_of and slot.name in group_names:
            r.add(
                f"feature_groups.{slot.name}: a group may not share its name with a slot that "
                "is in no group"
            )

    first_of_dim: dict[int, SlotConfig] = {}
    for slot in slots:  # one table per dim: its slots share the row dtype
        first = first_of_dim.setdefault(slot.dim, slot)
        mine, theirs = slot.row_dtype or row_dtype, first.row_dtype or row_dtype
        if mine != theirs:
            r.bad(
                join(join("slots_config", slot.name), "row_dtype"),
                f"{theirs}, as slot {first.name!r} of the same dim {slot.dim} (one table per dim)",
                mine,
            )
    order = prefix_order((s.name for s in slots), groups)
    if isinstance(bits, int):
        expected = prefix_bits_expected(len(order), bits)
        if expected is not None:
            r.bad("feature_index_prefix_bit", expected, bits)
    warnings = r.finish(source, _log)
    number = {g: i + 1 for i, g in enumerate(order)}
    shift = 64 - bits
    final = []
    for slot in slots:
        group = group_of.get(slot.name, slot.name)
        prefix = number[group]
        final.append(replace(slot, group=group, prefix=prefix, index_prefix=prefix << shift))
    return EmbeddingFileConfig(
        bits, tuple(final), tuple(groups), source, warnings, row_dtype, rounding
    )


# --------------------------------------------------------------------------------------------
# global_config.yml
# --------------------------------------------------------------------------------------------

_INCREMENTAL_WHY = "persia writes deltas without a channel between threads"
_TUNING_WHY = "a knob of PERSIA's own server internals; persia has no equivalent"


def parse_metrics_config(r: Problems, raw: object, path: str) -> MetricsConfig:
    """PERSIA's ``metrics_config`` (``global_config.yml``'s, or a job file's ``metrics``):
    ``enable_metrics``, ``push_interval_seconds`` (old name ``push_interval_sec``, accepted with
    a warning) and ``job_name``; problems go to ``r``."""
    m = r.mapping(raw, path) or {}
    m = r.keys(
        m,
        path,
        ("enable_metrics", "push_interval_seconds", "job_name"),
        renamed={"push_interval_sec": "push_interval_seconds"},
    )
    return MetricsConfig(
        enable_metrics=r.bool_(m, "enable_metrics", path, False),
        push_interval_seconds=r.int_(m, "push_interval_seconds", path, 10),
        job_name=r.str_(m, "job_name", path, "persia_default_jobname"),
    )


def _parse_common(r: Problems, raw: object) -> CommonConfig:
    path = "common_config"
    d = r.mapping(raw, path) or {}
    d = r.keys(
        d,
        path,
        (
            "job_type",
            "checkpointing_config",
            "metrics_config",
            "infer_config",
            "num_embedding_io_workers",
        ),
        renamed={"intent": "job_type"},
    )
    job_type = r.str_(d, "job_type", path, "train", choices=JOB_TYPES)
    io_workers = r.int_(d, "num_embedding_io_workers", path, None)
    r.no_effect(d, "num_embedding_io_workers", path, io_workers, None, _TUNING_WHY)

    cpath = join(path, "checkpointing_config")
    c = r.keys(r.mapping(d.get("checkpointing_config"), cpath) or {}, cpath, ("num_workers",))
    workers = r.int_(c, "num_workers", cpath, 4)
    r.no_effect(c, "num_workers", cpath, workers, 4, "checkpoints are written by one thread")

    metrics = parse_metrics_config(r, d.get("metrics_config"), join(path, "metrics_config"))

    infer = None
    if "infer_config" in d:
        ipath = join(path, "infer_config")
        i = r.mapping(d.get("infer_config"), ipath) or {}
        i = r.keys(
            i,
            ipath,
            ("servers", "embedding_checkpoint"),
            renamed={"initial_sparse_checkpoint": "embedding_checkpoint"},
        )
        servers = i.get("servers", [])
        if not isinstance(servers, list) or not all(isinstance(s, str) and s for s in servers):
            r.bad(join(ipath, "servers"), "a list of 'host:port' strings", servers)
            servers = []
        infer = InferConfig(tuple(servers), r.str_(i, "embedding_checkpoint", ipath, None))
    return CommonConfig(job_type, CheckpointingConfig(workers), metrics, infer)


def _parse_worker(r: Problems, raw: object) -> EmbeddingWorkerConfig:
    path = "embedding_worker_config"
    d = r.mapping(raw, path) or {}
    d = r.keys(d, path, ("forward_buffer_size", "buffered_data_expired_sec"))
    expired = r.int_(d, "buffered_data_expired_sec", path, 1000)
    r.no_effect(d, "buffered_data_expired_sec", path, expired, 1000, _TUNING_WHY)
    return EmbeddingWorkerConfig(r.int_(d, "forward_buffer_size", path, 1000))


_PS_TUNING_INTS = {
    "embedding_recycle_pool_capacity": 1_000_000,
    "num_persistence_workers": 4,
    "num_signs_per_file": 1_000_000,
    "num_embedding_io_workers": None,
}


def _parse_disk_tier(r: Problems, d: dict, path: str) -> dict[str, Any]:
    """The disk tier's two keys (persia extensions; null or absent: no tier): set together."""
    tier_dir = d.get("disk_tier_dir")
    tier_cap = d.get("disk_tier_capacity")
    if tier_dir is not None and (not isinstance(tier_dir, str) or not tier_dir.strip()):
        r.bad(f"{path}.disk_tier_dir", "a non-empty directory path", tier_dir)
        tier_dir = None
    if tier_cap is not None and (
        isinstance(tier_cap, bool) or not isinstance(tier_cap, int) or tier_cap < 1
    ):
        r.bad(f"{path}.disk_tier_capacity", "an int > 0 (rows on disk over all servers)", tier_cap)
        tier_cap = None
    elif (tier_dir is None) != (tier_cap is None) and not r.problems:
        missing = "disk_tier_capacity" if tier_cap is None else "disk_tier_dir"
        r.bad(f"{path}.{missing}", "to be set with the other disk tier key", None)
    if tier_dir is None or tier_cap is None:
        return {}
    return {"disk_tier_dir": tier_dir, "disk_tier_capacity": tier_cap}


def _parse_server(r: Problems, raw: object) -> EmbeddingParameterServerConfig:
    path = "embedding_parameter_server_config"
    d = r.mapping(raw, path) or {}
    own = tuple(vars(EmbeddingParameterServerConfig()))
    d = r.keys(d, path, own + tuple(_PS_TUNING_INTS) + ("storage", "local_buffer_dir"))
    if d.get("disk_tier_dir") is None and d.get("disk_tier_capacity") is None:
        d = {k: v for k, v in d.items() if k not in ("disk_tier_dir", "disk_tier_capacity")}
    default = EmbeddingParameterServerConfig()
    cfg = EmbeddingParameterServerConfig(
        capacity=r.int_(d, "capacity", path, default.capacity),
        num_hashmap_internal_shards=r.int_(
            d, "num_hashmap_internal_shards", path, default.num_hashmap_internal_shards
        ),
        full_amount_manager_buffer_size=r.int_(
            d, "full_amount_manager_buffer_size", path, default.full_amount_manager_buffer_size
        ),
        enable_incremental_update=r.bool_(d, "enable_incremental_update", path, False),
        incremental_buffer_size=r.int_(
            d, "incremental_buffer_size", path, default.incremental_buffer_size
        ),
        incremental_dir=r.str_(d, "incremental_dir", path, default.incremental_dir),
        incremental_channel_capacity=r.int_(
            d, "incremental_channel_capacity", path, default.incremental_channel_capacity
        ),
        admit_min_count=r.int_(d, "admit_min_count", path, 0, minimum=0),
        **_parse_disk_tier(r, d, path),
    )
    r.no_effect(
        d,
        "full_amount_manager_buffer_size",
        path,
        cfg.full_amount_manager_buffer_size,
        default.full_amount_manager_buffer_size,
        _TUNING_WHY,
    )
    # enable_incremental_update, incremental_buffer_size (rows per delta) and incremental_dir are
    # honoured by TrainCtx (persia.store.delta); the channel capacity has no equivalent
    r.no_effect(
        d,
        "incremental_channel_capacity",
        path,
        cfg.incremental_channel_capacity,
        default.incremental_channel_capacity,
        _INCREMENTAL_WHY,
    )
    if cfg.incremental_buffer_size < 1:
        r.bad(f"{path}.incremental_buffer_size", "an int >= 1", cfg.incremental_buffer_size)
    for key, key_default in _PS_TUNING_INTS.items():
        r.no_effect(d, key, path, r.int_(d, key, path, key_default), key_default, _TUNING_WHY)
    storage = r.str_(d, "storage", path, "ceph", choices=("ceph", "hdfs"))
    r.no_effect(d, "storage", path, storage, "ceph", _TUNING_WHY)
    buffer_dir = r.str_(d, "local_buffer_dir", path, "/workspace/buffer_dir/")
    r.no_effect(d, "local_buffer_dir", path, buffer_dir, "/workspace/buffer_dir/", _TUNING_WHY)
    return cfg


def parse_global_config(data: object, source: str | None = None) -> GlobalConfig:
    """Validates an in-memory ``global_config.yml`` document (``None`` or ``{}``: defaults).

    Args:
        data: the parsed YAML.
        source: where it came from, for messages.

    Returns:
        The config.

    Raises:
        ConfigError: listing every problem.
    """
    r = Problems()
    top = r.mapping(data, "")
    if top is None:
        raise ConfigError(r.problems, source=source)
    top = r.keys(
        top,
        "",
        ("common_config", "embedding_worker_config", "embedding_parameter_server_config"),
        renamed={
            "middleware_config": "embedding_worker_config",
            "shard_server_config": "embedding_parameter_server_config",
        },
    )
    common = _parse_common(r, top.get("common_config"))
    worker = _parse_worker(r, top.get("embedding_worker_config"))
    server = _parse_server(r, top.get("embedding_parameter_server_config"))
    warnings = r.finish(source, _log)
    return GlobalConfig(common, worker, server, source, warnings)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _path_from(path: str | os.PathLike | None, variable: str) -> Path | None:
    if path is not None:
        return Path(path)
    return _settings.env_path(variable)


def load_embedding_config(path: str | os.PathLike | None = None) -> EmbeddingFileConfig:
    """Loads ``embedding_config.yml`` from ``path``, else from ``$PERSIA_EMBEDDING_CONFIG``.

    Raises:
        ConfigError: no path given and the variable unset; file missing or not YAML; any
            problem in its content (all listed).
    """
    found = _path_from(path, _settings.PERSIA_EMBEDDING_CONFIG)
    if found is None:
        raise ConfigError(
            "no embedding config: pass its path or set the environment variable "
            f"{_settings.PERSIA_EMBEDDING_CONFIG}"
        )
    return parse_embedding_config(load_yaml(found), source=str(found))


def load_global_config(path: str | os.PathLike | None = None) -> GlobalConfig:
    """Loads ``global_config.yml`` from ``path``, else ``$PERSIA_GLOBAL_CONFIG``, else defaults.

    Raises:
        ConfigError: file missing or not YAML; any problem in its content (all listed).
    """
    found = _path_from(path, _settings.PERSIA_GLOBAL_CONFIG)
    if found is None:
        return GlobalConfig()
    return parse_global_config(load_yaml(found), source=str(found))


# --------------------------------------------------------------------------------------------
# To and from the embedding-layer spec
# --------------------------------------------------------------------------------------------


def embedding_spec(
    embedding_file: EmbeddingFileConfig,
    global_file: GlobalConfig | None = None,
    embedding_config: EmbeddingConfig | None = None,
    optimizer: EmbeddingOptimizer | None = None,
) -> EmbeddingSpec:
    """The embedding layer a PERSIA script describes: its two YAML files plus what it passes in
    Python (the rows' hyperparameters, the embedding optimizer).

    Args:
        embedding_file: ``embedding_config.yml``: slots, groups, prefix bits.
        global_file: ``global_config.yml`` (None: defaults): capacity, shards, incremental
            updates.
        embedding_config: initialisation, admission, weight bound (None: defaults).
        optimizer: the embedding optimizer (None: none; the store adopts a checkpoint's).

    Raises:
        ConfigError: an optimizer the spec cannot name.
    """
    glob = global_file if global_file is not None else GlobalConfig()
    hyper = embedding_config if embedding_config is not None else EmbeddingConfig()
    ps = glob.embedding_parameter_server_config
    name, args = optimizer_spec(optimizer) if optimizer is not None else (None, {})
    slots = tuple(
        SlotSpec(
            name=s.name,
            dim=s.dim,
            pooling=s.pooling,
            prefix=s.prefix,
            sample_fixed_size=s.sample_fixed_size,
            hash_stack_rounds=s.hash_stack_config.hash_stack_rounds,
            hash_stack_size=s.hash_stack_config.embedding_size,
            group=s.group,
            row_dtype=embedding_file.row_dtype_of(s.name),
        )
        for s in embedding_file.slots
    )
    low, high = hyper.emb_initialization
    return EmbeddingSpec(
        slots=slots,
        optimizer=name,
        optimizer_args=args,
        capacity=ps.capacity,
        shards=ps.num_hashmap_internal_shards,
        admit_probability=hyper.admit_probability,
        admit_min_count=ps.admit_min_count,
        init=(low, high),
        weight_bound=hyper.weight_bound,
        feature_index_prefix_bit=embedding_file.feature_index_prefix_bit,
        feature_groups=embedding_file.feature_groups,
        incremental=ps.enable_incremental_update,
        incremental_dir=ps.incremental_dir,
        incremental_buffer_size=ps.incremental_buffer_size,
        disk_tier_dir=ps.disk_tier_dir,
        disk_tier_capacity=ps.disk_tier_capacity,
        row_rounding=embedding_file.row_rounding,
    )


def load_spec(
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None = None,
    global_config_file: str | os.PathLike | GlobalConfig | None = None,
    embedding_config: EmbeddingConfig | None = None,
    optimizer: EmbeddingOptimizer | None = None,
) -> EmbeddingSpec:
    """:func:`embedding_spec` of the YAML files given as paths, parsed objects, or None (the
    ``PERSIA_EMBEDDING_CONFIG`` / ``PERSIA_GLOBAL_CONFIG`` variables, as PERSIA's launcher sets
    them; no global file: defaults).

    Raises:
        ConfigError: as :func:`load_embedding_config` / :func:`load_global_config`.
    """
    emb = (
        embedding_config_file
        if isinstance(embedding_config_file, EmbeddingFileConfig)
        else load_embedding_config(embedding_config_file)
    )
    glob = (
        global_config_file
        if isinstance(global_config_file, GlobalConfig)
        else load_global_config(global_config_file)
    )
    return embedding_spec(emb, glob, embedding_config, optimizer)


def persia_configs(
    spec: EmbeddingSpec, source: str | None = None
) -> tuple[EmbeddingFileConfig, GlobalConfig]:
    """The spec's slots and server settings as PERSIA's two files (what PERSIA's context classes
    take); :func:`embedding_spec` of them gives ``spec`` back, less its optimizer and the rows'
    hyperparameters (passed beside the files in Python)."""
    slots: dict[str, Any] = {}
    for s in spec.slots:
        entry: dict[str, Any] = {
            "dim": s.dim,
            "pooling": s.pooling,
            "sample_fixed_size": s.sample_fixed_size,
        }
        if s.hash_stack_rounds > 0:
            entry["hash_stack_config"] = {
                "hash_stack_rounds": s.hash_stack_rounds,
                "embedding_size": s.hash_stack_size,
            }
        if s.row_dtype != "float32":
            entry["row_dtype"] = s.row_dtype
        slots[s.name] = entry
    doc: dict[str, Any] = {
        "feature_index_prefix_bit": spec.feature_index_prefix_bit,
        "slots_config": slots,
        "feature_groups": {g: list(members) for g, members in spec.feature_groups},
    }
    if spec.row_rounding != "nearest":
        doc["row_rounding"] = spec.row_rounding
    embedding_file = parse_embedding_config(
        doc,
        source=source,
    )
    server: dict[str, Any] = {
        "capacity": spec.capacity,
        "num_hashmap_internal_shards": spec.shards,
    }
    if spec.admit_min_count:
        server["admit_min_count"] = spec.admit_min_count
    if spec.disk_tier_dir is not None:
        server.update(disk_tier_dir=spec.disk_tier_dir, disk_tier_capacity=spec.disk_tier_capacity)
    if spec.incremental:
        server.update(
            enable_incremental_update=True,
            incremental_dir=spec.incremental_dir,
            incremental_buffer_size=spec.incremental_buffer_size,
        )
    global_file = parse_global_config(
        {"common_config": {"job_type": "Train"}, "embedding_parameter_server_config": server},
        source=source,
    )
    return embedding_file, global_file
