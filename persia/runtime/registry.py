"""The backend registry: a backend's name -> the module that implements it.

The floors below the backends (``persia.ctx``, ``persia.data``, ``persia.job``) never import a
backend module: they ask :func:`backend` for one by name. :data:`BACKENDS` is the one declared
table, and :func:`backend`'s lazy import is the only import in persia that runs up the floor
order (docs/ARCHITECTURE.md, "Floors"; ``tests/test_layers.py`` knows it by name).

A backend module provides the functions of :class:`Backend`:

* ``build_runtime(...)``: the :class:`persia.runtime.pipeline.RuntimeProtocol` of one training or
  evaluation context (store, embedding worker, applier thread);
* ``run_job(train_fn, job, ...)``: runs a job file's training loop ``train_fn`` (a plain
  function of :mod:`persia.job.runner`) where the backend places it, the shape of Ray Train's
  train function plus scaling config;
* ``stream_sender(**options)`` / ``receive_batches(channel, timeout_s)``: the two ends of a
  data-loader stream between processes (``DataCtx`` / ``StreamingDataset``).

A backend whose parameter servers run outside the NN worker's process also provides
``build_inference_runtime(...)`` (:class:`InferenceBackend`): the read-only runtime of
inference-mode parameter servers (``job_type: Infer``). The local backend has none here: its
inference-mode servers are the in-process :class:`persia.checkpoint.follow.ServingRuntime`, which
sits above this floor and is built by ``persia.ctx`` itself.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from persia.errors import BackendError, PersiaError

if TYPE_CHECKING:
    from persia.embedding import EmbeddingConfig
    from persia.embedding.optim import EmbeddingOptimizer
    from persia.runtime.pipeline import RuntimeProtocol

__all__ = ["BACKENDS", "Backend", "InferenceBackend", "backend", "inference_backend", "names"]

#: Every backend persia knows: name -> module. The local backend is the default.
BACKENDS: Mapping[str, str] = {
    "local": "persia.runtime.local",
    "ray": "persia.backends.ray",
}


class Backend(Protocol):
    """What a backend module provides (module-level functions)."""

    def build_runtime(
        self,
        embedding_config: EmbeddingConfig,
        optimizer: EmbeddingOptimizer | None,
        embedding_config_file: str | os.PathLike | Any | None = None,
        global_config_file: str | os.PathLike | Any | None = None,
        backward_buffer_size: int = 10,
        cluster: Any = None,
    ) -> RuntimeProtocol: ...

    def run_job(self, train_fn: Callable[..., dict[str, Any]], job: Any, **options: Any) -> Any: ...

    def stream_sender(self, **options: Any) -> Any: ...

    def receive_batches(self, channel: str | None, timeout_s: float) -> Iterator[Any]: ...


class InferenceBackend(Protocol):
    """What a backend with inference-mode parameter servers of its own provides."""

    def build_inference_runtime(
        self,
        embedding_config_file: str | os.PathLike | Any | None,
        global_config: Any,
        embedding_config: EmbeddingConfig | None = None,
        cluster: Any = None,
        **options: Any,
    ) -> RuntimeProtocol: ...


def inference_backend(name: str) -> InferenceBackend:
    """The module of backend ``name`` as an :class:`InferenceBackend`.

    Raises:
        PersiaError: ``name`` is not a registered backend, or has no inference-mode servers of
            its own (``local``: built in process by ``persia.ctx``).
        BackendError: the backend's module cannot be imported.
    """
    module = backend(name)
    if not hasattr(module, "build_inference_runtime"):
        raise PersiaError(
            f"the {name!r} backend has no inference-mode parameter servers of its own"
        )
    return cast(InferenceBackend, module)


def names() -> list[str]:
    """The registered backend names, in declaration order."""
    return list(BACKENDS)


def backend(name: str) -> Backend:
    """The module implementing backend ``name``.

    Raises:
        PersiaError: ``name`` is not a registered backend.
        BackendError: the backend's module cannot be imported (an extra not installed).
    """
    module = BACKENDS.get(name)
    if module is None:
        allowed = " or ".join(repr(n) for n in BACKENDS)
        raise PersiaError(f"backend must be {allowed}, got {name!r}")
    try:
        return cast(Backend, importlib.import_module(module))
    except ImportError as exc:
        raise BackendError(
            f"the {name!r} backend cannot be imported (pip install persia[{name}]?): {exc}"
        ) from exc
