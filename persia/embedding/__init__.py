"""Embedding configuration and optimizers (PERSIA-compatible API)."""
