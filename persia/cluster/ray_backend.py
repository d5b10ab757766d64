"""Old import path of :class:`persia.backends.ray.backend.ClusterConfig` (kept for scripts)."""

from persia.backends.ray.backend import ClusterConfig, RayStore, init_ray

__all__ = ["ClusterConfig", "RayStore", "init_ray"]
