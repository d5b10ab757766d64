"""The cluster backend on Ray: parameter-server shards, embedding workers, data loaders and NN
workers as Ray actors (docs/cluster.md). The only package of persia that imports Ray.

The module-level functions are the backend's face to the backend registry
(:class:`persia.runtime.registry.Backend`); they import the modules behind them on first use, so
that naming the backend costs nothing until it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persia.backends.ray.backend import ClusterConfig
    from persia.backends.ray.recovery import RecoveryConfig
    from persia.runtime.pipeline import Runtime

__all__ = [
    "ClusterConfig",
    "RecoveryConfig",
    "build_inference_runtime",
    "build_runtime",
    "receive_batches",
    "run_job",
    "stream_sender",
]


def build_runtime(*args: Any, **kwargs: Any) -> Runtime:
    """:func:`persia.backends.ray.runtime.build_ray_runtime`."""
    from persia.backends.ray.runtime import build_ray_runtime

    return build_ray_runtime(*args, **kwargs)


def build_inference_runtime(*args: Any, **kwargs: Any) -> Any:
    """:func:`persia.backends.ray.serving.build_inference_runtime`: inference-mode parameter
    servers (``job_type: Infer``)."""
    from persia.backends.ray.serving import build_inference_runtime as build

    return build(*args, **kwargs)


def run_job(train_fn: Callable[..., dict[str, Any]], job: Any, **options: Any) -> dict[str, Any]:
    """:func:`persia.backends.ray.jobs.run_job`."""
    from persia.backends.ray.jobs import run_job as run

    return run(train_fn, job, **options)


def stream_sender(**options: Any) -> Any:
    """A :class:`persia.backends.ray.stream.StreamSender` (one data loader's sending side)."""
    from persia.backends.ray.stream import StreamSender

    return StreamSender(**options)


def receive_batches(channel: str | None, timeout_s: float) -> Iterator[Any]:
    """:func:`persia.backends.ray.stream.receive_batches`."""
    from persia.backends.ray.stream import receive_batches as receive

    return receive(channel, timeout_s)


def __getattr__(name: str) -> Any:
    if name == "ClusterConfig":
        from persia.backends.ray.backend import ClusterConfig

        return ClusterConfig
    if name == "RecoveryConfig":
        from persia.backends.ray.recovery import RecoveryConfig

        return RecoveryConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
