"""Synchronous dense training across NN workers: torch DistributedDataParallel, with PERSIA's
options (public path :mod:`persia.distributed`).

* :class:`DDPOption` (PERSIA's signature): ``DDPOption(initialization_method="tcp",
  backend="nccl", master_port=..., master_addr=..., sync_file=...)``. ``tcp`` joins the group at
  ``master_addr:master_port``; an address not given comes from ``MASTER_ADDR`` (set by
  ``persia-launcher nn-worker`` and torchrun), a port not given from ``MASTER_PORT``, else
  PERSIA's default 23456. ``file`` joins through ``sync_file``, which must not exist yet.
* :func:`get_default_distributed_option`: ``gloo`` on the CPU, ``nccl`` with a CUDA device, as
  PERSIA.
* :class:`BaguaDistributedOption`: Bagua is not available in persia; creating one raises
  :class:`BaguaNotAvailableError` (an ``ImportError``, as PERSIA raised without Bagua).

A process group that already exists (the Ray backend's NN-worker actors join theirs before the
training loop starts) is reused: the option then only wraps the model.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist

from persia import _settings, env
from persia.errors import BackendError, ConfigError, PersiaError

__all__ = [
    "BaguaDistributedOption",
    "BaguaNotAvailableError",
    "DDPOption",
    "DEFAULT_MASTER_PORT",
    "DistributedBaseOption",
    "get_default_distributed_option",
    "wrap_ddp",
]

#: PERSIA's default rendezvous port.
DEFAULT_MASTER_PORT = 23456
_BACKENDS = ("nccl", "gloo")
_INIT_METHODS = ("tcp", "file")


class BaguaNotAvailableError(PersiaError, ImportError):
    """Bagua is not part of persia (``BaguaDistributedOption``); an ``ImportError`` too."""


class DistributedBaseOption(ABC):
    """PERSIA's base of the options that turn a model into a data-parallel one.

    Args:
        master_port: the rendezvous port.
        master_addr: the rendezvous address (None: found at conversion time).
    """

    def __init__(self, master_port: int, master_addr: str | None = None) -> None:
        self.master_addr = master_addr
        self.master_port = master_port

    @abstractmethod
    def convert2distributed_model(
        self,
        model: torch.nn.Module,
        world_size: int,
        rank_id: int,
        device_id: int | None = None,
        master_addr: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> tuple[Any, torch.optim.Optimizer | None]:
        """Joins the process group and returns ``(data-parallel model, optimizer)``."""

    @abstractmethod
    def init_with_env_file(self) -> bool:
        """Whether the group is joined through a shared file."""


class DDPOption(DistributedBaseOption):
    """PERSIA's option for torch's DistributedDataParallel.

    Args:
        initialization_method: ``"tcp"`` (rendezvous at ``master_addr:master_port``) or
            ``"file"`` (through ``options["sync_file"]``).
        backend: ``"nccl"`` (CUDA) or ``"gloo"`` (CPU).
        **options: ``master_port`` (default ``MASTER_PORT``, else 23456), ``master_addr``
            (default ``MASTER_ADDR``), ``sync_file`` (``file`` only); persia 0.1's
            ``init_method`` (a torch init URL such as ``"env://"``, used as given).

    Raises:
        ConfigError: an unknown backend, initialization method or option, a port out of range.
    """

    def __init__(
        self, initialization_method: str = "tcp", backend: str = "nccl", **options: Any
    ) -> None:
        port_given = "master_port" in options
        master_port = options.pop("master_port", DEFAULT_MASTER_PORT)
        master_addr = options.pop("master_addr", None)
        super().__init__(master_port, master_addr)
        self._port_given = port_given
        self.init_method: str | None = options.pop("init_method", None)
        self.sync_file: str | None = options.pop("sync_file", None)
        problems = []
        if backend not in _BACKENDS:
            problems.append(f"backend must be one of {list(_BACKENDS)}, got {backend!r}")
        if initialization_method not in _INIT_METHODS:
            problems.append(
                f"initialization_method must be one of {list(_INIT_METHODS)}, "
                f"got {initialization_method!r}"
            )
        if (
            isinstance(master_port, bool)
            or not isinstance(master_port, int)
            or not 1 <= master_port <= 65535
        ):
            problems.append(f"master_port must be an int in [1, 65535], got {master_port!r}")
        if initialization_method == "file" and self.init_method is None and not self.sync_file:
            problems.append('initialization_method="file" needs sync_file=PATH')
        if options:
            problems.append(f"unknown options {sorted(options)}")
        if problems:
            raise ConfigError(problems, source="DDPOption")
        self.initialization_method = initialization_method
        self.backend = backend
        self.options = options

    def resolved_init_method(self, master_addr: str | None = None) -> str:
        """The torch ``init_method`` URL this option joins with.

        Raises:
            ConfigError: ``tcp`` without an address (neither ``master_addr`` nor
                ``MASTER_ADDR``), or ``file`` with a sync file that already exists.
        """
        if self.init_method is not None:
            return self.init_method
        if self.initialization_method == "file":
            path = str(self.sync_file)
            if os.path.exists(path):
                raise ConfigError(
                    f"sync_file {path!r} already exists: delete it before starting the job",
                    source="DDPOption",
                )
            return f"file://{path}"
        addr = self.master_addr or master_addr or _settings.master_addr()
        if not addr:
            raise ConfigError(
                "initialization_method='tcp' needs master_addr= or MASTER_ADDR "
                "(persia-launcher nn-worker and torchrun set it)",
                source="DDPOption",
            )
        port = self.master_port
        if not self._port_given:
            port = _settings.master_port() or self.master_port
        return f"tcp://{addr}:{port}"

    def convert2distributed_model(
        self,
        model: torch.nn.Module,
        world_size: int,
        rank_id: int,
        device_id: int | None = None,
        master_addr: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> tuple[Any, torch.optim.Optimizer | None]:
        """Joins the process group (unless this process already has one) and wraps ``model``
        in DistributedDataParallel; returns ``(model, optimizer)`` as PERSIA.

        Raises:
            ConfigError: ``backend="nccl"`` without a CUDA device, or see
                :meth:`resolved_init_method`.
            BackendError: the group could not be joined.
        """
        if not dist.is_initialized():
            if self.backend == "nccl" and device_id is None:
                raise ConfigError(
                    "backend 'nccl' needs a CUDA device (TrainCtx(device_id=...)); "
                    "use DDPOption(backend='gloo') on the CPU",
                    source="DDPOption",
                )
            init_method = self.resolved_init_method(master_addr)
            try:
                dist.init_process_group(
                    self.backend, init_method=init_method, rank=rank_id, world_size=world_size
                )
            except Exception as exc:
                raise BackendError(
                    f"could not join the dense allreduce group ({self.backend}, "
                    f"{init_method}): {exc}",
                    role="nn-worker",
                    rank=rank_id,
                ) from exc
        ids = [device_id] if device_id is not None else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), optimizer

    def init_with_env_file(self) -> bool:
        """Whether the group is joined through ``sync_file``."""
        return self.initialization_method == "file"


class BaguaDistributedOption(DistributedBaseOption):
    """PERSIA's Bagua option. Bagua is not available in persia: creating one raises.

    Raises:
        BaguaNotAvailableError: always (an ``ImportError`` and a :class:`PersiaError`).
    """

    def __init__(self, algorithm: str, **options: Any) -> None:
        raise BaguaNotAvailableError(
            f"BaguaDistributedOption({algorithm!r}): Bagua is not available in persia; use "
            "persia.distributed.DDPOption (backend='nccl' on GPUs, 'gloo' on CPUs) or leave "
            "distributed_option out (get_default_distributed_option)"
        )

    def convert2distributed_model(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise BaguaNotAvailableError("Bagua is not available in persia")

    def init_with_env_file(self) -> bool:  # pragma: no cover - never constructed
        return False


def get_default_distributed_option(device_id: int | None = None) -> DDPOption:
    """PERSIA's default: ``DDPOption(backend="nccl")`` with a CUDA ``device_id``, else
    ``DDPOption(backend="gloo")``."""
    return DDPOption(backend="nccl" if device_id is not None else "gloo")


def wrap_ddp(model: Any, option: Any, device: torch.device) -> Any:
    """Joins (or reuses) the process group and wraps ``model`` in DDP (what ``TrainCtx`` does
    with ``WORLD_SIZE > 1``).

    Args:
        model: the dense model.
        option: a :class:`DistributedBaseOption`; None: :func:`get_default_distributed_option`.
        device: the context's device.

    Raises:
        ConfigError: ``option`` is not a distributed option (see also :class:`DDPOption`).
        BackendError: the group could not be joined.
    """
    device_id = device.index if device.type == "cuda" else None
    if option is None:
        option = get_default_distributed_option(device_id)
    if not isinstance(option, DistributedBaseOption):
        raise ConfigError(
            "distributed_option must be a persia.distributed.DDPOption, "
            f"got {type(option).__name__}"
        )
    wrapped, _ = option.convert2distributed_model(
        model, env.get_world_size(), env.get_rank(), device_id
    )
    return wrapped
