"""Embedding hyperparameters (PERSIA-compatible API): :class:`EmbeddingConfig`.

The per-slot layout (dims, pooling, feature groups) comes from ``embedding_config.yml``
(:func:`persia.embedding.config.load_embedding_config`); the optimizers live in
:mod:`persia.embedding.optim`; the batch types in :mod:`persia.embedding.data`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from persia.errors import ConfigError

__all__ = ["EmbeddingConfig", "get_default_embedding_config"]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class EmbeddingConfig:
    """Hyperparameters of the embedding rows, shared by every slot.

    Args:
        emb_initialization: ``(low, high)`` of the uniform initialisation of a new row;
            ``low < high``.
        admit_probability: probability that a new key gets a row on a training lookup that
            misses it (``0 <= p <= 1``, PERSIA's range; 1 admits every key, 0 none: a key not
            admitted reads zeros and is drawn again on its next miss). 0 is accepted as PERSIA
            accepts it; the embedding spec built from it warns that no row would ever be made.
        weight_bound: every value of a row is clipped to ``[-weight_bound, weight_bound]`` after
            each update when ``weight_bound > 0`` (PERSIA's rule); ``<= 0`` (PERSIA's way to
            turn it off, e.g. ``0``) or ``math.inf`` disables clipping. NaN is refused.

    Raises:
        ConfigError: listing every invalid field, with the value received.
    """

    emb_initialization: tuple[float, float] = (-0.01, 0.01)
    admit_probability: float = 1.0
    weight_bound: float = 10

    def __post_init__(self) -> None:
        problems = []
        init = self.emb_initialization
        if (
            not isinstance(init, (tuple, list))
            or len(init) != 2
            or not all(_is_number(x) and math.isfinite(x) for x in init)
        ):
            problems.append(
                f"emb_initialization: expected a pair of finite numbers (low, high), got {init!r}"
            )
        elif not init[0] < init[1]:
            problems.append(f"emb_initialization: expected low < high, got {tuple(init)!r}")
        else:
            object.__setattr__(self, "emb_initialization", (float(init[0]), float(init[1])))
        p = self.admit_probability
        if not _is_number(p) or not 0 <= p <= 1:
            problems.append(f"admit_probability: expected a number in [0, 1], got {p!r}")
        bound = self.weight_bound
        if not _is_number(bound) or math.isnan(bound):
            problems.append(
                f"weight_bound: expected a number (> 0: clip to [-bound, bound]; <= 0 or inf: "
                f"no clipping), got {bound!r}"
            )
        if problems:
            raise ConfigError(problems, source="EmbeddingConfig")
        object.__setattr__(self, "admit_probability", float(p))
        object.__setattr__(self, "weight_bound", float(bound))


def get_default_embedding_config() -> EmbeddingConfig:
    """The default hyperparameters: ``EmbeddingConfig()``."""
    return EmbeddingConfig()
