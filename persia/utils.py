"""Small helpers kept from PERSIA's ``persia.utils``: ``setup_seed``, ``load_yaml``, ``dump_yaml``
and ``find_free_port``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from persia.errors import ConfigError

__all__ = ["setup_seed", "load_yaml", "dump_yaml", "find_free_port", "embedding_seed"]

#: The highest TCP port :func:`find_free_port` tries (PERSIA's name).
MAXIMUM_LOCAL_PORT_NUM: int = 65535

_MAX_SEED = 2**32 - 1  # numpy's legacy seeding accepts [0, 2**32)
_EMBEDDING_SEED = 0


def embedding_seed() -> int:
    """The seed of new embedding rows' initialisation and admission draws: the last
    ``setup_seed`` value, 0 before any call."""
    return _EMBEDDING_SEED


def setup_seed(seed: int) -> None:
    """Seeds Python's ``random``, NumPy, PyTorch and new embedding rows, and asks for deterministic algorithms.

    As PERSIA did: ``torch.use_deterministic_algorithms(True)`` plus cuDNN's deterministic mode
    (and benchmark mode off). Unlike PERSIA, ``warn_only=True``: an op without a deterministic
    implementation warns instead of raising, so a CPU-only or GPU job never crashes here.

    Args:
        seed: an integer in ``[0, 2**32)``.

    Raises:
        ConfigError: ``seed`` is not an integer in that range.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed: expected an int in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ConfigError(f"seed: expected an int in [0, 2**32), got {seed}")
    import torch

    global _EMBEDDING_SEED
    _EMBEDDING_SEED = seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def load_yaml(filepath: str | Path) -> Any:
    """Loads a YAML file (safe loader).

    Args:
        filepath: path of the file.

    Returns:
        The parsed document (``None`` for an empty file).

    Raises:
        ConfigError: the file is missing or unreadable, or is not valid YAML; names the file.
    """
    import yaml

    path = Path(filepath)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc}", source=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None


def dump_yaml(content: Any, filepath: str | Path) -> None:
    """Writes ``content`` to ``filepath`` as YAML (PERSIA's ``dump_yaml``); :func:`load_yaml`
    reads it back.

    Only plain data (dicts, lists, strings, numbers, booleans, None) is written: no Python
    object tags, so the file loads with a safe loader.

    Raises:
        ConfigError: ``content`` holds something that is not plain data, or the file cannot be
            written; names the file.
    """
    import yaml

    path = Path(filepath)
    try:
        text = yaml.safe_dump(content)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot write as YAML: {exc}", source=str(path)) from None
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the file: {exc}", source=str(path)) from None


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def find_free_port(port: int = 10000, interval: int = 1) -> int:
    """The first TCP port from ``port`` on, in steps of ``interval``, that can be bound now
    (PERSIA's ``find_free_port``). Another process may still take it before you bind it.

    Raises:
        ValueError: no free port up to :data:`MAXIMUM_LOCAL_PORT_NUM` (as PERSIA), or ``port``
            / ``interval`` out of range.
    """
    for name, value, low in (("port", port, 1), ("interval", interval, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"find_free_port: {name} must be an int >= {low}, got {value!r}")
    while port <= MAXIMUM_LOCAL_PORT_NUM:
        if _port_free(port):
            return port
        port += interval
    raise ValueError(f"find_free_port: no free port up to {MAXIMUM_LOCAL_PORT_NUM}")
