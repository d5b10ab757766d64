"""numba kernels of the parameter-server core (@njit functions only)."""
