"""Backends that place persia's roles outside the user's process. Each is reached through the
backend registry (:mod:`persia.runtime.registry`), never imported by the floors below it."""
