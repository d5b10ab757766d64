"""Plain NumPy twins of the optimizer kernels in persia/embedding/kernels.py.

One Python loop over the gradient rows, NumPy float32 over dim, written straight from the formulas
in persia/embedding/optim.py. Each twin updates ``values`` and ``state`` in place and returns
``[applied, skipped_absent, skipped_nonfinite]``.
"""

from __future__ import annotations

import math

import numpy as np

f32 = np.float32


def fma(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32 (via float64, as the kernels and torch's add_)."""
    return (np.float64(a) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(f32)


def _clip(row: np.ndarray, bound: float) -> np.ndarray:
    if 0 < bound < math.inf:
        return np.clip(row, f32(-bound), f32(bound))
    return row


def _skip(rows: np.ndarray, grads: np.ndarray, i: int, counts: list[int]) -> bool:
    if rows[i] == -1:
        counts[1] += 1
        return True
    if not np.all(np.isfinite(grads[i])):
        counts[2] += 1
        return True
    return False


def sgd(values, state, rows, grads, bound, lr, momentum=0.0, weight_decay=0.0):
    counts = [0, 0, 0]
    for i in range(len(rows)):
        if _skip(rows, grads, i, counts):
            continue
        r = rows[i]
        w = values[r].copy()
        g = fma(f32(weight_decay), w, grads[i])
        if momentum > 0:
            state[r] = f32(momentum) * state[r] + g
            g = state[r]
        values[r] = _clip(fma(-f32(lr), g, w), bound)
        counts[0] += 1
    return np.array(counts, dtype=np.int64)


def adagrad(values, state, rows, grads, bound, lr, weight_decay, g_square_momentum, eps, rowwise):
    counts = [0, 0, 0]
    dim = values.shape[1]
    for i in range(len(rows)):
        if _skip(rows, grads, i, counts):
            continue
        r = rows[i]
        w = values[r].copy()
        g = fma(f32(weight_decay), w, grads[i])
        if rowwise:
            total = f32(0)
            for x in g * g:  # summed in order, as the kernel does
                total = f32(total + x)
            state[r, 0] = f32(g_square_momentum) * state[r, 0] + total / f32(dim)
            std = np.sqrt(state[r, 0]) + f32(eps)
        else:
            state[r] = f32(g_square_momentum) * state[r] + g * g
            std = np.sqrt(state[r]) + f32(eps)
        values[r] = _clip(fma(-f32(lr), g / std, w), bound)
        counts[0] += 1
    return np.array(counts, dtype=np.int64)


def adam(values, state, rows, grads, bound, lr, betas, weight_decay, eps, max_step=2**24):
    counts = [0, 0, 0]
    dim = values.shape[1]
    b1, b2 = betas
    for i in range(len(rows)):
        if _skip(rows, grads, i, counts):
            continue
        r = rows[i]
        t = min(int(state[r, 2 * dim]) + 1, max_step)
        state[r, 2 * dim] = t
        w = values[r].copy()
        g = fma(f32(weight_decay), w, grads[i])
        m = state[r, :dim]
        v = state[r, dim : 2 * dim]
        m += f32(1 - b1) * (g - m)
        v += f32(1 - b2) * (g * g - v)
        step_size = f32(lr * math.sqrt(1 - b2**t) / (1 - b1**t))
        values[r] = _clip(w - step_size * (m / (np.sqrt(v) + f32(eps))), bound)
        counts[0] += 1
    return np.array(counts, dtype=np.int64)


def apply(opt, values, state, rows, grads, bound):
    """Dispatch a persia.embedding.optim optimizer to its twin."""
    name = opt.name
    if name == "sgd":
        return sgd(values, state, rows, grads, bound, opt.lr, opt.momentum, opt.weight_decay)
    if name in ("adagrad", "rowwise_adagrad"):
        return adagrad(
            values,
            state,
            rows,
            grads,
            bound,
            opt.lr,
            opt.weight_decay,
            opt.g_square_momentum,
            opt.eps,
            name == "rowwise_adagrad",
        )
    if name == "adam":
        return adam(values, state, rows, grads, bound, opt.lr, opt.betas, opt.weight_decay, opt.eps)
    raise ValueError(name)
