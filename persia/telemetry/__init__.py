"""Prometheus metrics of every role (docs/metrics.md): the only module that imports
``prometheus_client``.

Off by default: :func:`current` is then a :class:`Recorder` that records nothing, and the hot
path tests its ``on`` before it reads a clock. Metrics are turned on, once per process, by

* ``metrics_config.enable_metrics`` in ``global_config.yml`` (or the job file's ``metrics``
  section): :func:`enable_from_config`, called when a training context is entered; with
  ``PERSIA_METRICS_GATEWAY_ADDR`` set, the process pushes to that Pushgateway every
  ``push_interval_seconds`` and once more at the end (PERSIA's way);
* ``persia train --metrics-port PORT``: :func:`serve`, a scrape endpoint;
* a server's ``/metrics`` handler: :func:`render` gives the text and its content type.

Each process pushes its own group, grouping key ``job`` (``metrics_config.job_name``) and
``instance`` (``<role>-<replica>``); every series carries ``role`` and ``replica`` labels, so one
process that holds several roles (the local backend: NN worker, embedding worker and every shard)
reports each under its own. On the Ray backend every actor pushes its own metrics
(:func:`settings` is what the driver hands to the actors it starts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from persia import _settings
from persia.errors import ConfigError
from persia.logger import get_default_logger
from persia.telemetry._catalog import CATALOG, EW, LOADER, NN, PS, ROLES, SERVER, MetricDef
from persia.telemetry._export import CONTENT_TYPE, MetricsServer, Pusher, push_url
from persia.telemetry._recorder import FeatureStats, Recorder

__all__ = [
    "CATALOG",
    "CONTENT_TYPE",
    "EW",
    "LOADER",
    "NN",
    "PS",
    "ROLES",
    "SERVER",
    "FeatureStats",
    "MetricDef",
    "MetricsSettings",
    "Recorder",
    "configure",
    "current",
    "enable_from_config",
    "push_now",
    "render",
    "serve",
    "settings",
    "shutdown",
    "unwatch",
    "watch_delta_lag",
    "watch_shards",
]

_logger = get_default_logger()
_OFF = Recorder()
_current: Recorder = _OFF
_lock = threading.RLock()
_pusher: Pusher | None = None
_push_settings: MetricsSettings | None = None
_server: MetricsServer | None = None


@dataclass(frozen=True)
class MetricsSettings:
    """Where a process pushes: PERSIA's ``metrics_config`` plus the gateway address.

    Attributes:
        job_name: the Pushgateway group's ``job`` (``metrics_config.job_name``).
        gateway: ``host:port`` or a URL of the Pushgateway.
        push_interval_s: seconds between pushes (``push_interval_seconds``).
    """

    job_name: str
    gateway: str
    push_interval_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.job_name, str) or not self.job_name.strip():
            problems.append(f"job_name must be a non-empty string, got {self.job_name!r}")
        if not isinstance(self.gateway, str) or not self.gateway.strip():
            problems.append(f"the gateway address must be host:port, got {self.gateway!r}")
        if isinstance(self.push_interval_s, bool) or not (
            isinstance(self.push_interval_s, int | float) and self.push_interval_s > 0
        ):
            problems.append(
                f"push_interval_seconds must be a number > 0, got {self.push_interval_s!r}"
            )
        if problems:
            raise ConfigError(["metrics_config: " + p for p in problems])


def current() -> Recorder:
    """This process's recorder: the no-op :class:`Recorder` while metrics are off."""
    return _current


def configure(
    role: str,
    replica: int = 0,
    *,
    push: MetricsSettings | dict[str, Any] | None = None,
    replicas: dict[str, int] | None = None,
) -> Recorder:
    """Turns collection on in this process (once: later calls keep the first identity) and, with
    ``push``, starts pushing (once: a process pushes to one gateway).

    Args:
        role: this process's role (``nn-worker``, ``embedding-worker``, ``parameter-server``,
            ``data-loader`` or ``server``): its push's ``instance`` is ``<role>-<replica>``.
        replica: its replica index.
        push: where to push (a :class:`MetricsSettings` or its dict, as :func:`settings` gives).
        replicas: the replica numbers of the other roles this process holds (default 0).
    """
    global _current, _pusher, _push_settings
    if role not in ROLES:
        raise ConfigError(f"metrics role must be one of {list(ROLES)}, got {role!r}")
    with _lock:
        if not _current.on:
            from persia.telemetry._live import Live

            _current = Live(role, replica, replicas)
        if push is not None and _pusher is None:
            if isinstance(push, dict):
                push = MetricsSettings(**push)
            live = _current
            instance = f"{getattr(live, 'role', role)}-{getattr(live, 'replica', replica)}"
            _pusher = Pusher(
                push_url(push.gateway.strip(), push.job_name.strip(), instance),
                push.push_interval_s,
                live.render,
            )
            _push_settings = push
        return _current


def enable_from_config(metrics_config: Any, role: str, replica: int = 0) -> Recorder:
    """Turns metrics on as PERSIA's ``metrics_config`` says (``enable_metrics``,
    ``push_interval_seconds``, ``job_name``), pushing to ``PERSIA_METRICS_GATEWAY_ADDR``.

    With ``enable_metrics`` on and no gateway address, the metrics are collected (for
    ``--metrics-port`` or a server's ``/metrics``) but not pushed, and a warning says so
    (PERSIA pushed to ``metrics_gateway:9091`` then)."""
    if metrics_config is None or not getattr(metrics_config, "enable_metrics", False):
        return _current
    gateway = _settings.metrics_gateway_addr()
    push = None
    if gateway is None:
        from persia.logger import warn_once

        warn_once(
            _logger,
            "metrics-no-gateway",
            f"metrics_config.enable_metrics is on but {_settings.PERSIA_METRICS_GATEWAY_ADDR} is "
            "not set: metrics are collected but not pushed (PERSIA pushed to "
            "metrics_gateway:9091)",
        )
    else:
        push = MetricsSettings(
            job_name=getattr(metrics_config, "job_name", "persia_default_jobname"),
            gateway=gateway,
            push_interval_s=getattr(metrics_config, "push_interval_seconds", 10),
        )
    return configure(role, replica, push=push)


def settings() -> dict[str, Any] | None:
    """What this process pushes to, as a dict for :func:`configure` in another process (the
    actors a driver starts); None when it does not push."""
    with _lock:
        return None if _push_settings is None else asdict(_push_settings)


def render() -> tuple[bytes, str]:
    """This process's metrics in Prometheus's text format, and the content type to serve them
    with (empty while metrics are off): what a ``/metrics`` handler returns."""
    return _current.render(), CONTENT_TYPE


def serve(port: int, host: str = "0.0.0.0", role: str = NN, replica: int = 0) -> MetricsServer:
    """Turns metrics on (as ``role``) and serves them at ``http://host:port/metrics`` (port 0:
    a free one, see the result's ``port``).

    Raises:
        ConfigError: the port cannot be bound.
    """
    global _server
    configure(role, replica)
    with _lock:
        if _server is not None:
            return _server
        try:
            _server = MetricsServer(host, port, lambda: _current.render())
        except OSError as exc:
            raise ConfigError(f"--metrics-port: cannot serve on {host}:{port}: {exc}") from None
        return _server


def push_now() -> bool | None:
    """Pushes once now (None: not pushing)."""
    pusher = _pusher
    return None if pusher is None else pusher.push()


def shutdown(linger_s: float = 0.0) -> None:
    """Ends metrics in this process: the last push, and, with ``linger_s``, the scrape endpoint
    stays up until it has been scraped once more (at most ``linger_s`` seconds) so that a
    Prometheus scraping it sees the final values; then everything is off again."""
    global _current, _pusher, _push_settings, _server
    with _lock:
        pusher, server = _pusher, _server
        _pusher, _push_settings, _server = None, None, None
    if pusher is not None:
        pusher.close()
    if server is not None:
        if linger_s > 0:
            server.wait_scrape(server.scrapes, linger_s)
        server.close()
    with _lock:
        _current = _OFF


def watch_shards(owner: Any, fn: Callable[[Any], list[tuple[int, dict[str, Any]]]]) -> None:
    """Reads ``fn(owner)`` -> ``[(replica, Shard.stats()), ...]`` whenever the metrics are
    collected (rows held, evictions, misses, ...), for as long as ``owner`` lives."""
    from persia.telemetry._sources import SOURCES

    SOURCES.add("shards", owner, fn)


def watch_delta_lag(owner: Any, fn: Callable[[Any], float | None]) -> None:
    """Reads ``fn(owner)``, a delta writer's lag in seconds, whenever the metrics are collected."""
    from persia.telemetry._sources import SOURCES

    SOURCES.add("delta_lag", owner, fn)


def unwatch(owner: Any) -> None:
    """Stops reading ``owner``."""
    from persia.telemetry._sources import SOURCES

    SOURCES.remove(owner)
