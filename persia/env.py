"""Rank, world size and local rank of this process, and a data loader's replica index and size,
with PERSIA's function names.

Resolution order, for each value:

1. a value given to :func:`set_env` (until :func:`reload_env`);
2. for rank and world size: if ``torch.distributed`` is initialised in this process, its rank /
   world size;
3. else the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``REPLICA_INDEX``,
   ``REPLICA_SIZE`` (set by ``torchrun`` and by ``persia-launcher``; names declared in
   :mod:`persia._settings`);
4. else the single-process defaults 0 / 1 / 0 / 0 / 1.

Values are read on every call (never cached at import), so a process group created later is seen;
PERSIA parsed the environment once, so its :func:`reload_env` re-read it. Here
:func:`reload_env` forgets what :func:`set_env` set and checks the environment at once.
A malformed variable (``RANK=abc``, a negative rank, ``WORLD_SIZE=0``, a rank not below the world
size, a replica index not below the replica size) raises :class:`~persia.errors.ConfigError`
naming the variable and its value.
"""

from __future__ import annotations

import sys

from persia import _settings
from persia.errors import ConfigError

__all__ = [
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "get_replica_index",
    "get_replica_size",
    "reload_env",
    "set_env",
]

#: What :func:`set_env` may set (PERSIA's names), each with its environment variable.
_FIELDS = {
    "replica_size": _settings.REPLICA_SIZE,
    "replica_index": _settings.REPLICA_INDEX,
    "world_size": _settings.WORLD_SIZE,
    "rank": _settings.RANK,
    "local_rank": _settings.LOCAL_RANK,
}
_overrides: dict[str, int] = {}


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
    if "world_size" in _overrides:
        return _overrides["world_size"]
    dist = _distributed()
    if dist is not None:
        return int(dist.get_world_size())
    return _env(_settings.WORLD_SIZE, 1, 1)


def get_rank() -> int:
    """The rank of this process among the NN workers, in ``[0, world size)``."""
    if "rank" in _overrides:
        return _overrides["rank"]
    dist = _distributed()
    if dist is not None:
        return int(dist.get_rank())
    rank = _env(_settings.RANK, 0, 0)
    world = get_world_size()
    if rank >= world:
        raise ConfigError(
            f"environment variable {_settings.RANK}: expected a rank below "
            f"{_settings.WORLD_SIZE}={world}, got {rank}"
        )
    return rank


def get_local_rank() -> int:
    """The rank of this process among the NN workers on this machine (picks its GPU)."""
    if "local_rank" in _overrides:
        return _overrides["local_rank"]
    return _env(_settings.LOCAL_RANK, 0, 0)


def get_replica_size() -> int:
    """The number of replicas of this process's role (data loaders: ``REPLICA_SIZE``, set by
    ``persia-launcher data-loader --replica-size``); 1 when not set."""
    if "replica_size" in _overrides:
        return _overrides["replica_size"]
    return _env(_settings.REPLICA_SIZE, 1, 1)


def get_replica_index() -> int:
    """This process's index among the replicas of its role, in ``[0, replica size)``
    (``REPLICA_INDEX``, set by ``persia-launcher data-loader --replica-index``); 0 when not set."""
    if "replica_index" in _overrides:
        return _overrides["replica_index"]
    index = _env(_settings.REPLICA_INDEX, 0, 0)
    size = get_replica_size()
    if index >= size:
        raise ConfigError(
            f"environment variable {_settings.REPLICA_INDEX}: expected an index below "
            f"{_settings.REPLICA_SIZE}={size}, got {index}"
        )
    return index


def set_env(**kwargs: int) -> None:
    """Sets values of this process by hand, ahead of the environment (PERSIA's ``set_env``).

    Args:
        **kwargs: any of ``replica_size``, ``replica_index``, ``world_size``, ``rank``,
            ``local_rank``. Unlike PERSIA, a value not given keeps coming from the environment
            (PERSIA reset it to None), and each value is checked.

    Raises:
        TypeError: an unknown keyword (as PERSIA).
        ConfigError: a value that is not an int, a negative one, or a size below 1.
    """
    unknown = sorted(set(kwargs) - set(_FIELDS))
    if unknown:
        raise TypeError(f"set_env() got unexpected keyword arguments {unknown}")
    problems = []
    for name, value in kwargs.items():
        minimum = 1 if name.endswith("size") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"set_env({name}=...): expected an int >= {minimum}, got {value!r}")
    if problems:
        raise ConfigError(problems)
    _overrides.update(kwargs)


def reload_env() -> None:
    """Forgets what :func:`set_env` set and checks the environment now (PERSIA's
    ``reload_env``).

    Raises:
        ConfigError: a malformed ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``REPLICA_INDEX`` or
            ``REPLICA_SIZE``.
    """
    _overrides.clear()
    get_rank()
    get_local_rank()
    get_replica_index()
