"""Embedding optimizers, run by the parameter server on the rows a batch touched.

PERSIA's names and signatures (``SGD``, ``Adam``, ``Adagrad``), with persia's formulas below
(PERSIA's own Adagrad used the old accumulator and put eps inside the sqrt; ported jobs run, their
numbers differ slightly). Every update is **lazy**: only the rows listed in a call change, and
momentum, weight decay and Adam's step count apply to a row when it is updated, as torch does
for sparse gradients. ``g`` is the gradient of one row, ``w`` its values, ``wd`` the weight decay
(L2: added to the gradient), all arithmetic in float32 as torch does on CPU:

* **SGD**: ``g' = g + wd * w``; with momentum ``buf = momentum * buf + g'`` (buf starts at 0, so
  the first step sets ``buf = g'``, torch's first-step rule) and ``w -= lr * buf``; without,
  ``w -= lr * g'``. State: the momentum buffer (dim columns), none without momentum.
* **Adagrad** (element-wise): ``g' = g + wd * w``; ``acc = gsm * acc + g'^2``;
  ``w -= lr * (g' / (sqrt(acc) + eps))``; ``acc`` starts at ``initial_accumulator_value``.
  With ``wd = 0`` and ``g_square_momentum = 1`` this is exactly torch.optim.Adagrad's sparse path
  (accumulate first, then divide by sqrt(acc) + eps). State: dim columns.
* **Row-wise Adagrad** (``vectorwise_shared=True``): one accumulator per row,
  ``acc = gsm * acc + mean(g'^2)``, ``w -= lr * (g' / (sqrt(acc) + eps))``. State: 1 column.
* **Adam**, with a per-row step count ``t`` (``t += 1`` each time the row is updated):
  ``g' = g + wd * w``; ``m = b1 * m + (1 - b1) * g'``; ``v = b2 * v + (1 - b2) * g'^2``
  (computed as torch.optim.SparseAdam does, ``m += (1 - b1) * (g' - m)``);
  ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * (m / (sqrt(v) + eps))``: torch.optim.SparseAdam's
  update exactly (which is ``(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps')`` with
  ``eps' = eps / sqrt(1 - b2^t)``: eps scaled as SparseAdam does, not as dense Adam does).
  State: ``[m (dim), v (dim), t]``; ``t`` is stored as float32 and so stops counting at 2**24
  (16.7M updates of one row), where both bias corrections are 1 to float precision anyway.

Rounding: ``w -= lr * x`` and ``g + wd * w`` are rounded once (as an fma), which is how torch's
``add_(x, alpha=...)`` computes them on CPU; every other operation is a float32 operation in the
order written. So persia reproduces torch's sparse Adagrad and SGD to the last bit, except where
torch's vectorised float32 sqrt is not correctly rounded (1 ulp in about a fifth of the values on
an AVX-512 CPU) and where torch's SGD adds the gradient entries of a repeated row one at a time
(persia gets one summed gradient per row): about 1e-7 relative after several steps.

After each update, when ``0 < weight_bound < inf``, the row's values are clipped to
``[-weight_bound, weight_bound]``. A gradient row with any NaN or infinity is skipped (nothing
of that row is written) and counted; so is a row number of -1 (an absent key). If a row number
appears twice in one call, the two updates apply one after the other, in order (as two steps).

Example:
    >>> import numpy as np
    >>> opt = Adagrad(lr=0.1)
    >>> values = np.zeros((4, 2), np.float32)
    >>> state = np.tile(opt.initial_state(2), (4, 1))
    >>> opt.apply(values, state, np.array([2, -1], np.int32), np.ones((2, 2), np.float32), 10.0)
    array([1, 1, 0])
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from persia.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "EmbeddingOptimizer",
    "SGD",
    "Adam",
    "Adagrad",
    "build_optimizer",
    "optimizer_spec",
]

#: The per-row step count of Adam, stored as float32, stops at this value (t + 1 == t beyond).
ADAM_MAX_STEP = 2**24


def _kernels() -> ModuleType:
    """The numba kernels, imported on first use: ``persia.store`` may import this module (the
    layers point embedding -> store), so importing ``persia.store`` here at load time could cycle."""
    from persia.embedding import kernels as optim

    return optim


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(problems: list[str], name: str, value: object, ok: bool, expected: str) -> None:
    """Append a problem unless ``value`` is a finite real number and ``ok`` holds."""
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        problems.append(f"{name} must be a finite number, got {value!r}")
    elif not ok:
        problems.append(f"{name} must be {expected}, got {value!r}")


def _real(value: object) -> float:
    return float(value) if _is_number(value) else math.nan  # type: ignore[arg-type]


@dataclass(frozen=True)
class EmbeddingOptimizer(abc.ABC):
    """Base class of the embedding optimizers: validation, state layout, update, serialisation.

    Subclasses are frozen dataclasses; bad values raise ``ConfigError`` listing every problem.
    """

    _registry: ClassVar[dict[str, type[EmbeddingOptimizer]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        EmbeddingOptimizer._registry[cls.__name__] = cls

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError([f"{type(self).__name__}: {p}" for p in problems])
        for f in fields(self):  # normalise numbers to float (ints are accepted)
            value = getattr(self, f.name)
            if _is_number(value):
                object.__setattr__(self, f.name, float(value))

    @abc.abstractmethod
    def _problems(self) -> list[str]:
        """Every invalid field, one message each."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short name: "sgd", "adagrad", "rowwise_adagrad" or "adam"."""

    @abc.abstractmethod
    def state_width(self, dim: int) -> int:
        """Number of float32 optimizer-state columns per row for embeddings of ``dim``."""

    def initial_state(self, dim: int) -> np.ndarray:
        """The optimizer state of a freshly created row: float32 ``(state_width(dim),)``."""
        return np.zeros(self.state_width(_check_dim(dim)), dtype=np.float32)

    def apply(
        self,
        values: np.ndarray,
        state: np.ndarray,
        rows: np.ndarray,
        grads: np.ndarray,
        weight_bound: float,
    ) -> np.ndarray:
        """Apply ``grads[i]`` to row ``rows[i]`` of ``values`` and ``state``, in place.

        Args:
            values: float32 ``(R, dim)``, C-contiguous: the embedding rows.
            state: float32 ``(R, state_width(dim))``, C-contiguous: their optimizer state.
            rows: int32 ``(n,)``: row numbers in ``[0, R)``, or -1 for an absent key (skipped).
            grads: float32 ``(n, dim)``, C-contiguous: one gradient per entry of ``rows``.
            weight_bound: clip updated values to ``[-weight_bound, weight_bound]`` when
                ``0 < weight_bound < inf``; ``<= 0`` or ``inf`` means no clipping.

        Returns:
            int64 ``[applied, skipped_absent, skipped_nonfinite]``.

        Raises:
            StoreError: on a wrong dtype, shape, layout, row number or weight bound.
        """
        gbits, clip, bound = _validate(self, values, state, rows, grads, weight_bound)
        if rows.shape[0] == 0:
            return np.zeros(3, dtype=np.int64)
        counts, _ = self._run(values, state, rows, grads, gbits, clip, bound)
        return counts

    @abc.abstractmethod
    def _run(
        self,
        values: np.ndarray,
        state: np.ndarray,
        rows: np.ndarray,
        grads: np.ndarray,
        gbits: np.ndarray,
        clip: bool,
        bound: np.float32,
    ) -> tuple[np.ndarray, float]:
        """Runs the optimizer's kernel; returns (counts, seconds)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, ``{"type": <class name>, <field>: <value>, ...}``."""
        d: dict[str, Any] = {"type": type(self).__name__}
        for key, value in asdict(self).items():
            d[key] = list(value) if isinstance(value, tuple) else value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddingOptimizer:
        """Rebuild an optimizer from :meth:`to_dict`'s output (dispatches on ``"type"``).

        Raises:
            ConfigError: unknown type, unknown or missing fields, or bad values.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"optimizer must be a dict, got {type(d).__name__}")
        kind = d.get("type")
        target = EmbeddingOptimizer._registry.get(kind) if isinstance(kind, str) else None
        if target is None:
            known = sorted(EmbeddingOptimizer._registry)
            raise ConfigError(f"optimizer type must be one of {known}, got {kind!r}")
        if cls is not EmbeddingOptimizer and not issubclass(target, cls):
            raise ConfigError(f"optimizer type must be {cls.__name__}, got {kind!r}")
        kwargs = {k: v for k, v in d.items() if k != "type"}
        names = {f.name for f in fields(target)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(
                f"{kind}: unknown field(s) {unknown}; expected some of {sorted(names)}"
            )
        if "betas" in kwargs and isinstance(kwargs["betas"], list):
            kwargs["betas"] = tuple(kwargs["betas"])
        try:
            return target(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{kind}: {exc}") from None


def _check_dim(dim: int) -> int:
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim <= 0:
        raise StoreError(f"dim must be an integer > 0, got {dim!r}")
    return int(dim)


def _check_array(name: str, array: object, dtype: type, ndim: int) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise StoreError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise StoreError(f"{name} must have dtype {np.dtype(dtype).name}, got {array.dtype}")
    if array.ndim != ndim:
        raise StoreError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise StoreError(f"{name} must be C-contiguous")
    return array


def _validate(
    opt: EmbeddingOptimizer,
    values: np.ndarray,
    state: np.ndarray,
    rows: np.ndarray,
    grads: np.ndarray,
    weight_bound: float,
) -> tuple[np.ndarray, bool, np.float32]:
    """Check the arguments of ``apply``; return the gradient bits and the clipping settings."""
    _check_array("values", values, np.float32, 2)
    _check_array("state", state, np.float32, 2)
    _check_array("rows", rows, np.int32, 1)
    _check_array("grads", grads, np.float32, 2)
    num_rows, dim = values.shape
    if dim == 0:
        raise StoreError("values must have dim > 0, got shape (R, 0)")
    if not values.flags.writeable or not state.flags.writeable:
        raise StoreError("values and state must be writeable")
    width = opt.state_width(dim)
    if state.shape != (num_rows, width):
        raise StoreError(
            f"state must have shape {(num_rows, width)} for {opt.name} at dim {dim}, "
            f"got {state.shape}"
        )
    if grads.shape != (rows.shape[0], dim):
        raise StoreError(f"grads must have shape {(rows.shape[0], dim)}, got {grads.shape}")
    if rows.shape[0]:
        low, high = int(rows.min()), int(rows.max())
        if low < -1 or high >= num_rows:
            bad = low if low < -1 else high
            raise StoreError(f"rows must be in [-1, {num_rows}), got {bad}")
    if not _is_number(weight_bound) or math.isnan(float(weight_bound)):
        raise StoreError(
            f"weight_bound must be a number (<= 0 or inf: no clip), got {weight_bound!r}"
        )
    bound = float(weight_bound)
    clip = 0.0 < bound < math.inf
    return grads.view(np.uint32), clip, np.float32(bound if clip else 0.0)


@dataclass(frozen=True)
class SGD(EmbeddingOptimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay.

    Args:
        lr: learning rate, > 0.
        momentum: momentum factor, >= 0 (0: no momentum buffer is kept).
        weight_decay: L2 penalty added to the gradient, >= 0.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def _problems(self) -> list[str]:
        p: list[str] = []
        _check(p, "lr", self.lr, _real(self.lr) > 0, "> 0")
        _check(p, "momentum", self.momentum, _real(self.momentum) >= 0, ">= 0")
        _check(p, "weight_decay", self.weight_decay, _real(self.weight_decay) >= 0, ">= 0")
        return p

    @property
    def name(self) -> str:
        """Short name: "sgd"."""
        return "sgd"

    def state_width(self, dim: int) -> int:
        """``dim`` columns (the momentum buffer) with momentum, else 0."""
        return _check_dim(dim) if self.momentum > 0 else 0

    def _run(self, values, state, rows, grads, gbits, clip, bound):  # type: ignore[no-untyped-def]
        return _kernels().sgd_kernel(
            values,
            state,
            rows,
            grads,
            gbits,
            np.float32(self.lr),
            np.float32(self.momentum),
            np.float32(self.weight_decay),
            clip,
            bound,
        )


@dataclass(frozen=True)
class Adagrad(EmbeddingOptimizer):
    """Adagrad, element-wise or row-wise (``vectorwise_shared=True``).

    Args:
        lr: learning rate, > 0.
        initial_accumulator_value: the accumulator of a new row, >= 0.
        weight_decay: L2 penalty added to the gradient, >= 0.
        g_square_momentum: decay of the accumulator, in (0, 1] (1: plain Adagrad).
        eps: added to sqrt(accumulator), > 0.
        vectorwise_shared: one accumulator per row (mean of g^2 over the row).
    """

    lr: float = 1e-2
    initial_accumulator_value: float = 1e-2
    weight_decay: float = 0
    g_square_momentum: float = 1
    eps: float = 1e-10
    vectorwise_shared: bool = False

    def _problems(self) -> list[str]:
        p: list[str] = []
        _check(p, "lr", self.lr, _real(self.lr) > 0, "> 0")
        iav = self.initial_accumulator_value
        _check(p, "initial_accumulator_value", iav, _real(iav) >= 0, ">= 0")
        _check(p, "weight_decay", self.weight_decay, _real(self.weight_decay) >= 0, ">= 0")
        gsm = _real(self.g_square_momentum)
        _check(p, "g_square_momentum", self.g_square_momentum, 0 < gsm <= 1, "in (0, 1]")
        _check(p, "eps", self.eps, _real(self.eps) > 0, "> 0")
        if not isinstance(self.vectorwise_shared, (bool, np.bool_)):
            p.append(f"vectorwise_shared must be a bool, got {self.vectorwise_shared!r}")
        return p

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "vectorwise_shared", bool(self.vectorwise_shared))

    @property
    def name(self) -> str:
        """Short name: "adagrad", or "rowwise_adagrad" when ``vectorwise_shared``."""
        return "rowwise_adagrad" if self.vectorwise_shared else "adagrad"

    def state_width(self, dim: int) -> int:
        """``dim`` columns (one accumulator per value), or 1 when row-wise."""
        dim = _check_dim(dim)
        return 1 if self.vectorwise_shared else dim

    def initial_state(self, dim: int) -> np.ndarray:
        """Every accumulator at ``initial_accumulator_value``."""
        return np.full(self.state_width(dim), self.initial_accumulator_value, dtype=np.float32)

    def _run(self, values, state, rows, grads, gbits, clip, bound):  # type: ignore[no-untyped-def]
        kernel = (
            _kernels().rowwise_adagrad_kernel
            if self.vectorwise_shared
            else _kernels().adagrad_kernel
        )
        return kernel(
            values,
            state,
            rows,
            grads,
            gbits,
            np.float32(self.lr),
            np.float32(self.weight_decay),
            np.float32(self.g_square_momentum),
            np.float32(self.eps),
            clip,
            bound,
        )


@dataclass(frozen=True)
class Adam(EmbeddingOptimizer):
    """Adam with a per-row step count (torch.optim.SparseAdam's update) and L2 weight decay.

    Args:
        lr: learning rate, > 0.
        betas: decay rates of the first and second moments, each in [0, 1).
        weight_decay: L2 penalty added to the gradient, >= 0.
        eps: added to sqrt(v), > 0.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0
    eps: float = 1e-8

    def _problems(self) -> list[str]:
        p: list[str] = []
        _check(p, "lr", self.lr, _real(self.lr) > 0, "> 0")
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            p.append(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        else:
            for i, b in enumerate(betas):
                _check(p, f"betas[{i}]", b, 0 <= _real(b) < 1, "in [0, 1)")
        _check(p, "weight_decay", self.weight_decay, _real(self.weight_decay) >= 0, ">= 0")
        _check(p, "eps", self.eps, _real(self.eps) > 0, "> 0")
        return p

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))

    @property
    def name(self) -> str:
        """Short name: "adam"."""
        return "adam"

    def state_width(self, dim: int) -> int:
        """``2 * dim + 1``: m, v, and the row's step count (float32) in the last column."""
        return 2 * _check_dim(dim) + 1

    def _run(self, values, state, rows, grads, gbits, clip, bound):  # type: ignore[no-untyped-def]
        return _kernels().adam_kernel(
            values,
            state,
            rows,
            grads,
            gbits,
            float(self.lr),
            float(self.betas[0]),
            float(self.betas[1]),
            np.float32(self.weight_decay),
            np.float32(self.eps),
            clip,
            bound,
            np.float32(ADAM_MAX_STEP),
        )


#: Name in an :class:`~persia.embedding.spec.EmbeddingSpec` -> (class, fixed fields).
_BY_NAME: dict[str, tuple[type[EmbeddingOptimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "adagrad": (Adagrad, {}),
    "rowwise_adagrad": (Adagrad, {"vectorwise_shared": True}),
    "adam": (Adam, {}),
}


def build_optimizer(name: str, args: Mapping[str, Any]) -> EmbeddingOptimizer:
    """The optimizer an :class:`~persia.embedding.spec.EmbeddingSpec` names
    (``spec.optimizer``, ``spec.optimizer_args``).

    Raises:
        ConfigError: an unknown name, or bad options.
    """
    if name not in _BY_NAME:
        raise ConfigError(f"optimizer: expected one of {', '.join(_BY_NAME)}, got {name!r}")
    cls, fixed = _BY_NAME[name]
    return cls(**fixed, **dict(args))


def optimizer_spec(optimizer: EmbeddingOptimizer) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` of ``optimizer`` as an :class:`~persia.embedding.spec.EmbeddingSpec`
    holds them: ``lr`` and every field not at its default; :func:`build_optimizer` rebuilds an
    equal optimizer.

    Raises:
        ConfigError: an optimizer class the spec has no name for.
    """
    name = optimizer.name
    entry = _BY_NAME.get(name)
    if entry is None or type(optimizer) is not entry[0]:
        raise ConfigError(
            f"embedding optimizer {type(optimizer).__name__} ({name!r}) is not one of "
            f"{', '.join(_BY_NAME)}"
        )
    fixed = entry[1]
    args: dict[str, Any] = {}
    for f in fields(optimizer):
        if f.name in fixed or f.name == "vectorwise_shared":
            continue
        value = getattr(optimizer, f.name)
        if f.name == "lr" or f.default is MISSING or value != f.default:
            args[f.name] = value
    return name, args
