"""numba kernels of the store (``@njit(nogil=True, cache=True)`` functions only).

Import ``persia`` (or ``persia._settings.ensure_numba_cache_dir``) before this package so numba's
cache folder is writable.
"""
