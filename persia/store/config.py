"""Configs of a table's row initialiser and admission rule (frozen dataclasses, validated)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from persia.errors import ConfigError

__all__ = ["Uniform", "Normal", "Admission", "Init"]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Uniform:
    """Initialise every element uniformly in ``[low, high)`` (deterministic per (key, seed)).

    Args:
        low: lower bound (finite).
        high: upper bound (finite, > low).
    """

    low: float
    high: float

    def __post_init__(self) -> None:
        problems = []
        if not _finite(self.low):
            problems.append(f"Uniform.low must be a finite number, got {self.low!r}")
        if not _finite(self.high):
            problems.append(f"Uniform.high must be a finite number, got {self.high!r}")
        if not problems and not self.low < self.high:
            problems.append(f"Uniform.low must be < high, got low={self.low!r}, high={self.high!r}")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, object]:
        """A JSON-able description (for checkpoint manifests)."""
        return {"kind": "uniform", "low": float(self.low), "high": float(self.high)}


@dataclass(frozen=True)
class Normal:
    """Initialise every element from a normal distribution (Box-Muller, deterministic per key).

    Args:
        mean: the mean (finite).
        std: the standard deviation (finite, > 0).
    """

    mean: float = 0.0
    std: float = 0.01

    def __post_init__(self) -> None:
        problems = []
        if not _finite(self.mean):
            problems.append(f"Normal.mean must be a finite number, got {self.mean!r}")
        if not _finite(self.std) or not self.std > 0:
            problems.append(f"Normal.std must be a finite number > 0, got {self.std!r}")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, object]:
        """A JSON-able description (for checkpoint manifests)."""
        return {"kind": "normal", "mean": float(self.mean), "std": float(self.std)}


Init = Uniform | Normal


def init_from_dict(d: dict[str, object]) -> Init:
    """Inverse of ``Uniform.to_dict`` / ``Normal.to_dict``."""
    kind = d.get("kind")
    if kind == "uniform":
        return Uniform(float(d["low"]), float(d["high"]))  # type: ignore[arg-type]
    if kind == "normal":
        return Normal(float(d["mean"]), float(d["std"]))  # type: ignore[arg-type]
    raise ConfigError(f"init.kind must be 'uniform' or 'normal', got {kind!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Admission:
    """Which missed keys a training lookup creates (PERSIA's ``admit_probability`` and more).

    A training miss of key ``k`` is counted in a count-min sketch (``sketch_depth`` rows of
    ``sketch_width`` uint32 counters), giving the estimate ``c`` of how often ``k`` has missed,
    this miss included. ``k`` is created when ``c >= min_count`` and the draw
    ``u(k, seed, c) < probability``, where ``u`` is a counter-based hash of (key, seed, c) mapped to
    [0, 1): reproducible, and a rejected key gets a new draw on its next miss. The sketch exists
    only when ``probability < 1`` or ``min_count > 1``.

    Args:
        probability: admission probability in [0, 1].
        min_count: create a key only once it has missed this many times (0 or 1: at once).
        sketch_width: counters per sketch row, a power of two >= 16.
        sketch_depth: sketch rows, 1..16.
    """

    probability: float = 1.0
    min_count: int = 0
    sketch_width: int = field(default=1 << 18)
    sketch_depth: int = 4

    def __post_init__(self) -> None:
        problems = []
        if not _finite(self.probability) or not 0.0 <= self.probability <= 1.0:
            problems.append(
                f"Admission.probability must be a number in [0, 1], got {self.probability!r}"
            )
        if not _is_int(self.min_count) or self.min_count < 0:
            problems.append(f"Admission.min_count must be an int >= 0, got {self.min_count!r}")
        w = self.sketch_width
        if not _is_int(w) or w < 16 or w & (w - 1):
            problems.append(f"Admission.sketch_width must be a power of two >= 16, got {w!r}")
        if not _is_int(self.sketch_depth) or not 1 <= self.sketch_depth <= 16:
            problems.append(
                f"Admission.sketch_depth must be an int in 1..16, got {self.sketch_depth!r}"
            )
        if problems:
            raise ConfigError(problems)

    @property
    def uses_sketch(self) -> bool:
        """Whether admission needs the miss-count sketch (anything but "admit every key")."""
        return self.probability < 1.0 or self.min_count > 1

    def to_dict(self) -> dict[str, object]:
        """A JSON-able description (for checkpoint manifests)."""
        return {
            "probability": float(self.probability),
            "min_count": int(self.min_count),
            "sketch_width": int(self.sketch_width),
            "sketch_depth": int(self.sketch_depth),
        }
