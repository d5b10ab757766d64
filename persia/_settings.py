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
#: Backend of TrainCtx / eval_ctx when not given in code: "local" (default) or "ray".
PERSIA_BACKEND = "PERSIA_BACKEND"
#: Ray's own variable: address of an existing Ray cluster to join (else a local one is started).
RAY_ADDRESS = "RAY_ADDRESS"
#: Seconds a call to a cluster role may take before it fails with BackendError (default 60).
PERSIA_RAY_TIMEOUT_S = "PERSIA_RAY_TIMEOUT_S"
#: Folder of a locally started Ray cluster's logs, sockets and auth token
#: (default ``<system temp>/persia-ray-<uid>``).
PERSIA_RAY_TEMP_DIR = "PERSIA_RAY_TEMP_DIR"
#: Ray namespace in which persia's processes join Ray and the roles of one job find each other
#: by name (default "persia": persia.backends.ray.naming).
PERSIA_RAY_NAMESPACE = "PERSIA_RAY_NAMESPACE"
#: PERSIA-compatible: this data loader's index and the number of data loaders (set by
#: persia-launcher data-loader --replica-index / --replica-size; defaults 0 and 1).
REPLICA_INDEX = "REPLICA_INDEX"
REPLICA_SIZE = "REPLICA_SIZE"
#: Name of the stream DataCtx sends to and StreamingDataset reads (default "default").
PERSIA_STREAM_CHANNEL = "PERSIA_STREAM_CHANNEL"
#: NN workers each data loader tells "end" before it exits (default 1).
PERSIA_STREAM_CONSUMERS = "PERSIA_STREAM_CONSUMERS"
#: Name shared by the roles of one job started by persia-launcher (their actors'
#: ``persia-<name>-...``); set: TrainCtx(backend="ray") attaches to its parameter servers.
PERSIA_JOB_NAME = "PERSIA_JOB_NAME"


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


#: OpenMP's idle policy; persia defaults it to PASSIVE (see :func:`passive_openmp_threads`).
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_openmp_threads() -> bool:
    """Makes torch's idle OpenMP threads sleep instead of spin, unless the user chose.

    persia runs its lookups and gradient application on background threads beside the dense
    compute; spinning OpenMP workers starve them (measured here on 2 cores under load: the Adult
    example ran at 2-6k samples/s with spinning threads, 25-35k with passive ones). Takes effect
    only if torch has not been imported yet; returns whether it did.
    """
    import sys

    if OMP_WAIT_POLICY in os.environ or "torch" in sys.modules:
        return False
    os.environ[OMP_WAIT_POLICY] = "PASSIVE"
    return True


def deep_checks_enabled() -> bool:
    """Whether per-value batch checks (finite dense features, ...) run. Default: on."""
    return os.environ.get(PERSIA_DEEP_CHECKS, "1") != "0"


def env_int(name: str, default: int) -> int:
    """An integer environment variable, or ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default
