"""Every environment variable persia reads, declared once, with its default and unit.

Read these through the functions here, never with ``os.environ`` elsewhere in the package.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: PERSIA-compatible: path of embedding_config.yml (set by PERSIA's launcher).
PERSIA_EMBEDDING_CONFIG = "PERSIA_EMBEDDING_CONFIG"
#: PERSIA-compatible: path of global_config.yml.
PERSIA_GLOBAL_CONFIG = "PERSIA_GLOBAL_CONFIG"
#: Folder for numba's compiled-kernel cache; must be writable.
NUMBA_CACHE_DIR = "NUMBA_CACHE_DIR"
#: Set to "0" to skip the deep (per-value) batch checks; cheap checks always run.
PERSIA_DEEP_CHECKS = "PERSIA_DEEP_CHECKS"
#: PERSIA-compatible rank / world size / local rank (torch.distributed's names also work).
RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"


def ensure_numba_cache_dir() -> str:
    """Point numba's cache at a writable folder before numba is imported.

    Uses ``NUMBA_CACHE_DIR`` when set; else ``<tmp>/persia-numba-cache-<uid>``, so an installed,
    read-only package still caches its kernels.
    """
    current = os.environ.get(NUMBA_CACHE_DIR)
    if current:
        return current
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"persia-numba-cache-{uid}"
    os.environ[NUMBA_CACHE_DIR] = str(path)
    return str(path)


def deep_checks_enabled() -> bool:
    """Whether per-value batch checks (finite dense features, ...) run. Default: on."""
    return os.environ.get(PERSIA_DEEP_CHECKS, "1") != "0"


def env_int(name: str, default: int) -> int:
    """An integer environment variable, or ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default
