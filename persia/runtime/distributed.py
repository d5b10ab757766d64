"""Synchronous dense training across NN workers: torch DistributedDataParallel.

PERSIA's ``DDPOption`` is accepted: ``backend`` ("gloo" on CPU, "nccl" on GPU; default by device)
and ``init_method``. The process group is initialised from the environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) unless it already exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from persia import env
from persia.errors import BackendError


@dataclass(frozen=True)
class DDPOption:
    """PERSIA's DDP option: which collective backend and how to find the peers."""

    backend: str | None = None
    init_method: str = "env://"


def wrap_ddp(model: Any, option: Any, device: torch.device) -> Any:
    """Joins (or reuses) the process group and wraps ``model`` in DDP."""
    backend = getattr(option, "backend", None) or ("nccl" if device.type == "cuda" else "gloo")
    init_method = getattr(option, "init_method", None) or "env://"
    if init_method == "tcp":  # PERSIA's spelling: discovery through the environment
        init_method = "env://"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend,
                init_method=init_method,
                rank=env.get_rank(),
                world_size=env.get_world_size(),
            )
        except Exception as exc:
            raise BackendError(
                f"could not join the dense allreduce group ({backend}, {init_method}): {exc}",
                role="nn-worker",
                rank=env.get_rank(),
            ) from exc
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
