"""Old import paths of the Ray backend, kept for scripts written against persia 0.1:
``persia.cluster.ray_backend.ClusterConfig`` and ``persia.cluster.ray_recovery.RecoveryConfig``.
The backend lives in :mod:`persia.backends.ray`; the transports in :mod:`persia.rpc`."""
