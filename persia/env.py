"""Rank, world size and local rank of this process, with PERSIA's function names.

Resolution order, for each value:

1. if ``torch.distributed`` is initialised in this process, its rank / world size;
2. else the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by ``torchrun`` and
   by PERSIA's launcher; names declared in :mod:`persia._settings`);
3. else the single-process defaults 0 / 1 / 0.

Values are read on every call (never cached at import), so a process group created later is seen.
A malformed variable (``RANK=abc``, a negative rank, ``WORLD_SIZE=0``, a rank not below the world
size) raises :class:`~persia.errors.ConfigError` naming the variable and its value.
"""

from __future__ import annotations

import sys

from persia import _settings
from persia.errors import ConfigError

__all__ = ["get_rank", "get_world_size", "get_local_rank"]


def _distributed():
    """``torch.distributed`` if torch is already imported and a process group is initialised."""
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _env(name: str, default: int, minimum: int) -> int:
    try:
        value = _settings.env_int(name, default)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}: expected an integer, got {_raw(name)!r}"
        ) from None
    if value < minimum:
        raise ConfigError(
            f"environment variable {name}: expected an integer >= {minimum}, got {value}"
        )
    return value


def _raw(name: str) -> str:
    return _settings.env_raw(name)


def get_world_size() -> int:
    """The number of NN-worker processes in the job (1 when not distributed)."""
    dist = _distributed()
    if dist is not None:
        return int(dist.get_world_size())
    return _env(_settings.WORLD_SIZE, 1, 1)


def get_rank() -> int:
    """The rank of this process among the NN workers, in ``[0, world size)``."""
    dist = _distributed()
    if dist is not None:
        return int(dist.get_rank())
    rank = _env(_settings.RANK, 0, 0)
    world = _env(_settings.WORLD_SIZE, 1, 1)
    if rank >= world:
        raise ConfigError(
            f"environment variable {_settings.RANK}: expected a rank below "
            f"{_settings.WORLD_SIZE}={world}, got {rank}"
        )
    return rank


def get_local_rank() -> int:
    """The rank of this process among the NN workers on this machine (picks its GPU)."""
    return _env(_settings.LOCAL_RANK, 0, 0)
