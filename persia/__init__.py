"""persia: hybrid training of recommender models with huge embedding tables.

The embedding layer lives on sharded parameter servers and is trained asynchronously with a
bounded staleness; the dense network is trained synchronously. One process by default, Ray for
clusters. See README.md.
"""

from persia._settings import ensure_numba_cache_dir, passive_openmp_threads

ensure_numba_cache_dir()
passive_openmp_threads()

from persia.errors import (  # noqa: E402
    BackendError,
    BatchError,
    CheckpointError,
    ConfigError,
    PersiaError,
    StoreError,
)
from persia.version import __version__  # noqa: E402

__all__ = [
    "__version__",
    "PersiaError",
    "ConfigError",
    "BatchError",
    "StoreError",
    "CheckpointError",
    "BackendError",
]
