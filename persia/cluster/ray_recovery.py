"""Old import path of :class:`persia.backends.ray.recovery.RecoveryConfig` (kept for scripts)."""

from persia.backends.ray.recovery import RecoveryConfig

__all__ = ["RecoveryConfig"]
