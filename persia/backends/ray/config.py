"""The Ray backend's settings: one :class:`RoleSpec` per role, where the job's Ray cluster is,
how the data path runs, and recovery (:class:`RecoveryConfig`).

::

    ClusterConfig(
        ps=RoleSpec(count=2, num_cpus=0.5),          # parameter-server shards
        embedding_workers=RoleSpec(count=1),         # 0: inside each NN worker
        nn_workers=RoleSpec(count=2, resources={"gpu_host": 1}),
        data_loaders=RoleSpec(count=2),              # 0: the NN workers read the input
    )

The flat keywords of persia 0.1 (``num_ps``, ``ps_num_cpus``, ``ps_memory_bytes``,
``ps_resources``, ``num_nn_workers``, ``nn_num_cpus``, ``nn_resources``, ``num_data_loaders``,
``loader_num_cpus``, ``loader_resources``, ``num_embedding_workers``, ``ew_num_cpus``,
``ew_resources``) keep working, as constructor keywords and as read-only attributes, so
``ClusterConfig(num_ps=2, ps_resources={"ps_host": 1})`` and ``cluster.num_ps`` mean what they
meant. How the backend wires one job's processes together (an NN worker attaching to its
driver's parameter servers, the data-loader channel it pulls from) is private: :meth:`wired`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any

from persia import _settings
from persia.errors import ConfigError
from persia.rpc.wire import check_codec

__all__ = ["ClusterConfig", "RecoveryConfig", "RoleSpec", "TRANSPORTS"]

#: The data-path transports between an NN worker and its parameter servers.
TRANSPORTS = ("zmq", "ray")


def default_timeout_s() -> float:
    """``PERSIA_RAY_TIMEOUT_S``, else 60 seconds."""
    return _settings.ray_timeout_s()


@dataclass(frozen=True)
class RoleSpec:
    """How many replicas of one role run, and what each asks Ray for.

    Attributes:
        count: replicas; for the parameter servers None means ``num_hashmap_internal_shards``
            of ``global_config.yml``.
        num_cpus: CPUs each replica asks Ray for (fractions allowed: a whole small job fits a
            2-CPU node).
        resources: custom Ray resources per replica, e.g. ``{"ps_host": 1}`` to pin the
            replicas to nodes started with ``--resources='{"ps_host": 4}'``.
        memory_bytes: memory each replica asks Ray for (None: no request).
    """

    count: int | None = None
    num_cpus: float = 0.25
    resources: dict[str, float] = field(default_factory=dict)
    memory_bytes: int | None = None

    def problems(self, names: dict[str, str], min_count: int) -> list[str]:
        """What is wrong with this spec, each problem naming the field as ``names`` spells it
        (``{"count": "num_ps", ...}`` or ``{"count": "ps.count", ...}``)."""
        out = []
        c = self.count
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < min_count):
            out.append(f"{names['count']} must be an int >= {min_count}, got {c!r}")
        if not (isinstance(self.num_cpus, (int, float)) and self.num_cpus >= 0):
            out.append(f"{names['num_cpus']} must be a number >= 0, got {self.num_cpus!r}")
        if not isinstance(self.resources, dict):
            out.append(f"{names['resources']} must be a dict, got {self.resources!r}")
        m = self.memory_bytes
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            out.append(f"{names['memory_bytes']} must be an int > 0, got {m!r}")
        return out


@dataclass(frozen=True)
class RecoveryConfig:
    """How a dead parameter-server shard is restored.

    Attributes:
        checkpoint_dir: where the job's full checkpoints go (``ctx.dump_checkpoint(dir)``); the
            newest one written after the job started (and after its last load) is the base of a
            restore. None: restore from the deltas alone (the job must start empty).
        delta_interval_s: the flush interval T: deltas are flushed every T / 2 so that a
            recovery loses at most about T seconds of the dead shard's updates.
        max_recoveries: how many restores one job may do before a dead shard is an error again.
    """

    checkpoint_dir: str | os.PathLike[str] | None = None
    delta_interval_s: float = 1.0
    max_recoveries: int = 3

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.delta_interval_s, (int, float)) and self.delta_interval_s > 0):
            problems.append(f"delta_interval_s must be > 0, got {self.delta_interval_s!r}")
        if (
            isinstance(self.max_recoveries, bool)
            or not isinstance(self.max_recoveries, int)
            or self.max_recoveries < 1
        ):
            problems.append(f"max_recoveries must be an int >= 1, got {self.max_recoveries!r}")
        if problems:
            raise ConfigError(problems, source="RecoveryConfig")


@dataclass(frozen=True)
class _Wiring:
    """How the backend ties one job's processes together (set by the backend, not by users).

    Attributes:
        attach_ps: join the running parameter servers named by the job name instead of
            starting new ones (they are not stopped at the end).
        data_channel: the stream channel this NN worker pulls its training batches from.
    """

    attach_ps: bool = False
    data_channel: str | None = None


#: persia 0.1's flat keywords -> (role field, RoleSpec field).
_ALIASES: dict[str, tuple[str, str]] = {
    "num_ps": ("ps", "count"),
    "ps_num_cpus": ("ps", "num_cpus"),
    "ps_memory_bytes": ("ps", "memory_bytes"),
    "ps_resources": ("ps", "resources"),
    "num_nn_workers": ("nn_workers", "count"),
    "nn_num_cpus": ("nn_workers", "num_cpus"),
    "nn_resources": ("nn_workers", "resources"),
    "num_data_loaders": ("data_loaders", "count"),
    "loader_num_cpus": ("data_loaders", "num_cpus"),
    "loader_resources": ("data_loaders", "resources"),
    "num_embedding_workers": ("embedding_workers", "count"),
    "ew_num_cpus": ("embedding_workers", "num_cpus"),
    "ew_resources": ("embedding_workers", "resources"),
}
_WIRING = ("attach_ps", "data_channel")
_MIN_COUNT = {"ps": 1, "embedding_workers": 0, "nn_workers": 1, "data_loaders": 0}
_ROLE_DEFAULTS = {
    "ps": RoleSpec(count=None, num_cpus=0.25),
    "embedding_workers": RoleSpec(count=0, num_cpus=0.25),
    "nn_workers": RoleSpec(count=1, num_cpus=0.5),
    "data_loaders": RoleSpec(count=0, num_cpus=0.25),
}


class _Flat:
    """A read-only attribute of :class:`ClusterConfig` under persia 0.1's flat name: field
    ``attr`` of the role spec ``role`` (``count=True``: as an int, 0 for None)."""

    def __init__(self, role: str, attr: str, count: bool = False) -> None:
        self.role, self.attr, self.count = role, attr, count

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = getattr(getattr(obj, self.role), self.attr)
        return int(value or 0) if self.count else value


class ClusterConfig:
    """How the cluster backend places and reaches its roles.

    Args:
        ps: the parameter-server shards (count None: ``num_hashmap_internal_shards``).
        embedding_workers: embedding-worker actors doing the lookups and gradient aggregation
            for every NN worker (round robin by batch); count 0: each NN worker runs its
            embedding worker in its own process (see :mod:`persia.backends.ray.embedding_workers`).
        nn_workers: NN-worker processes (Ray actors) forming one DDP group; count 1: this
            process is the only NN worker (see :mod:`persia.backends.ray.ddp`).
        data_loaders: data-loader actors reading the job's training input for ``persia train``
            (count 0: the NN workers read it themselves); any count feeds any number of NN
            workers, the last incomplete round of W batches dropped (see
            :mod:`persia.backends.ray.loaders`).
        address: Ray cluster to join (``ray://...`` or ``host:port``); None: ``RAY_ADDRESS``,
            else a local cluster is started.
        transport: ``"zmq"`` (zero-copy ZeroMQ channel, the default) or ``"ray"`` (actor calls)
            for the per-batch lookups and gradients.
        bind_host: address the parameter servers' ZeroMQ sockets bind to; None: the node's Ray
            address (loopback on a local cluster).
        channel_security: ``"curve"``: every ZeroMQ socket of the job (parameter servers,
            embedding workers, data loaders) admits only the job's own clients, encrypted;
            ``"null"``: unauthenticated, for trusted networks only (:mod:`persia.rpc.security`);
            None: ``PERSIA_CHANNEL_SECURITY``, else ``"curve"``.
        wire_compression: ``"f16"``: the rows and gradients between embedding workers and
            parameter servers cross the channel as float16 with a per-row scale, about half
            the bytes (:mod:`persia.rpc.wire`); ``"none"``: float32; None:
            ``PERSIA_WIRE_COMPRESSION``, else ``"none"``.
        timeout_s: the longest a call to a role may take before :class:`BackendError`; None:
            ``PERSIA_RAY_TIMEOUT_S``, else 60.
        num_cpus: CPUs of a local cluster started here (None: Ray's count of this machine).
        recover: restore a dead parameter-server shard from the last full checkpoint plus the
            incremental deltas and go on training (True, or a :class:`RecoveryConfig`); False:
            a dead shard ends the job with :class:`BackendError`. One NN worker only.
        job_name: the name of the job's actors (``persia-<job_name>-ps-<rank>``); None: a
            fresh one.
        **aliases: persia 0.1's flat keywords (module doc), e.g. ``num_ps=2``.

    Raises:
        ConfigError: every problem of the settings at once.
    """

    __slots__ = (
        "ps",
        "embedding_workers",
        "nn_workers",
        "data_loaders",
        "address",
        "transport",
        "bind_host",
        "channel_security",
        "wire_compression",
        "timeout_s",
        "num_cpus",
        "recover",
        "job_name",
        "_wiring",
    )
    ps: RoleSpec
    embedding_workers: RoleSpec
    nn_workers: RoleSpec
    data_loaders: RoleSpec
    address: str | None
    transport: str
    bind_host: str | None
    channel_security: str
    wire_compression: str
    timeout_s: float | None
    num_cpus: int | None
    recover: bool | RecoveryConfig
    job_name: str | None
    _wiring: _Wiring

    def __init__(
        self,
        ps: RoleSpec | None = None,
        embedding_workers: RoleSpec | None = None,
        nn_workers: RoleSpec | None = None,
        data_loaders: RoleSpec | None = None,
        *,
        address: str | None = None,
        transport: str = "zmq",
        bind_host: str | None = None,
        channel_security: str | None = None,
        wire_compression: str | None = None,
        timeout_s: float | None = None,
        num_cpus: int | None = None,
        recover: bool | RecoveryConfig = False,
        job_name: str | None = None,
        **aliases: Any,
    ) -> None:
        roles = {
            "ps": ps,
            "embedding_workers": embedding_workers,
            "nn_workers": nn_workers,
            "data_loaders": data_loaders,
        }
        problems = []
        changes: dict[str, dict[str, Any]] = {}
        wiring: dict[str, Any] = {}
        for key, value in aliases.items():
            if key in _WIRING:
                wiring[key] = value
            elif key in _ALIASES:
                role, attr = _ALIASES[key]
                changes.setdefault(role, {})[attr] = value
            else:
                problems.append(f"unknown setting {key!r}")
        for role, spec in roles.items():
            if spec is not None and not isinstance(spec, RoleSpec):
                problems.append(f"{role} must be a RoleSpec, got {spec!r}")
                spec = None
            if spec is not None and role in changes:
                given = ", ".join(sorted(k for k, (r, _) in _ALIASES.items() if r == role))
                problems.append(
                    f"give {role}=RoleSpec(...) or the flat keywords ({given}), not both"
                )
            spec = spec if spec is not None else _ROLE_DEFAULTS[role]
            if role != "ps" and spec.memory_bytes is not None:
                problems.append(f"{role}.memory_bytes is not supported (parameter servers only)")
            object.__setattr__(self, role, _replace(spec, **changes.get(role, {})))
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "transport", transport)
        object.__setattr__(self, "bind_host", bind_host)
        if channel_security is None:
            try:
                channel_security = _settings.channel_security()
            except ConfigError as exc:
                problems.append(str(exc))
                channel_security = "curve"
        object.__setattr__(self, "channel_security", channel_security)
        try:
            wire_compression = (
                _settings.wire_compression()
                if wire_compression is None
                else check_codec(wire_compression)
            )
        except ConfigError as exc:
            problems.append(str(exc))
            wire_compression = "none"
        object.__setattr__(self, "wire_compression", wire_compression)
        object.__setattr__(self, "timeout_s", timeout_s)
        object.__setattr__(self, "num_cpus", num_cpus)
        object.__setattr__(self, "recover", recover)
        object.__setattr__(self, "job_name", job_name)
        object.__setattr__(self, "_wiring", _Wiring(**wiring))
        problems += self._problems()
        if problems:
            raise ConfigError(problems, source="ClusterConfig")

    def _problems(self) -> list[str]:
        out = []
        for role, min_count in _MIN_COUNT.items():
            spec: RoleSpec = getattr(self, role)
            names = {attr: f"{role}.{attr}" for attr in ("count", "num_cpus", "resources")}
            names["memory_bytes"] = f"{role}.memory_bytes"
            # the flat names in messages (as persia 0.1 spelled them: tests and docs use them)
            names.update({attr: key for key, (r, attr) in _ALIASES.items() if r == role})
            out += spec.problems(names, min_count)
            if role != "ps" and spec.count is None:
                out.append(f"{names['count']} must be an int >= {min_count}, got None")
        if self.channel_security not in ("curve", "null"):
            out.append(f"channel_security must be curve or null, got {self.channel_security!r}")
        if self.transport not in TRANSPORTS:
            out.append(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        t = self.timeout_s
        if t is not None and not (isinstance(t, (int, float)) and t > 0):
            out.append(f"timeout_s must be > 0, got {t!r}")
        if self.attach_ps and not self.job_name:
            out.append("attach_ps needs job_name (the running parameter servers' name)")
        if out:
            return out
        nn = self.num_nn_workers
        if not isinstance(self.recover, (bool, RecoveryConfig)):
            out.append(f"recover must be a bool or a RecoveryConfig, got {self.recover!r}")
        elif self.recover and self.num_embedding_workers:
            out.append("recover is not supported with num_embedding_workers > 0")
        elif self.recover and nn > 1:
            out.append(
                f"--recover works with one NN worker, got num_nn_workers={nn} "
                "(each would restore its own copy of a dead shard)"
            )
        return out

    # ------------------------------------------------------------------ the old flat names
    # (read-only views of the role specs: ``num_ps`` is ``ps.count``, ... as :data:`_ALIASES`
    # says; the counts of the roles that always have one read as ints)
    num_ps = _Flat("ps", "count")
    ps_num_cpus = _Flat("ps", "num_cpus")
    ps_memory_bytes = _Flat("ps", "memory_bytes")
    ps_resources = _Flat("ps", "resources")
    num_nn_workers = _Flat("nn_workers", "count", count=True)
    nn_num_cpus = _Flat("nn_workers", "num_cpus")
    nn_resources = _Flat("nn_workers", "resources")
    num_data_loaders = _Flat("data_loaders", "count", count=True)
    loader_num_cpus = _Flat("data_loaders", "num_cpus")
    loader_resources = _Flat("data_loaders", "resources")
    num_embedding_workers = _Flat("embedding_workers", "count", count=True)
    ew_num_cpus = _Flat("embedding_workers", "num_cpus")
    ew_resources = _Flat("embedding_workers", "resources")

    # ------------------------------------------------------------------------ the wiring
    @property
    def attach_ps(self) -> bool:
        """Whether this process joins running parameter servers (set by the backend)."""
        return self._wiring.attach_ps

    @property
    def data_channel(self) -> str | None:
        """The data-loader stream this NN worker pulls from (set by the backend)."""
        return self._wiring.data_channel

    def wired(self, **wiring: Any) -> ClusterConfig:
        """A copy with the backend's wiring changed (``attach_ps``, ``data_channel``)."""
        unknown = set(wiring) - set(_WIRING)
        if unknown:
            raise ConfigError(f"ClusterConfig.wired: unknown wiring {sorted(unknown)}")
        out = self.replace()
        object.__setattr__(out, "_wiring", _replace(self._wiring, **wiring))
        out._check()
        return out

    # ------------------------------------------------------------------------- the rest
    def replace(self, **changes: Any) -> ClusterConfig:
        """A copy with ``changes`` (any constructor keyword, flat aliases included)."""
        kwargs: dict[str, Any] = {name: getattr(self, name) for name in self._public()}
        for key in list(changes):
            if key in _ALIASES:
                role, attr = _ALIASES[key]
                kwargs[role] = _replace(kwargs[role], **{attr: changes.pop(key)})
        kwargs.update(changes)
        out = ClusterConfig(**kwargs, **{k: getattr(self, k) for k in _WIRING if k not in kwargs})
        return out

    def _check(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(problems, source="ClusterConfig")

    def resolved_timeout_s(self) -> float:
        """``timeout_s``, else ``PERSIA_RAY_TIMEOUT_S``, else 60."""
        return float(self.timeout_s) if self.timeout_s is not None else default_timeout_s()

    @staticmethod
    def _public() -> tuple[str, ...]:
        return tuple(n for n in ClusterConfig.__slots__ if not n.startswith("_"))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ClusterConfig is frozen: use .replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterConfig):
            return NotImplemented
        names = (*self._public(), "_wiring")
        return all(getattr(self, n) == getattr(other, n) for n in names)

    def __hash__(self) -> int:
        return hash((self.job_name, self.address, self.transport))

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._public())
        return f"ClusterConfig({body})"

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {n: getattr(self, n) for n in self._public()}
        kwargs.update({n: getattr(self, n) for n in _WIRING})
        return (_rebuild, (kwargs,))


def _rebuild(kwargs: dict[str, Any]) -> ClusterConfig:
    return ClusterConfig(**kwargs)
