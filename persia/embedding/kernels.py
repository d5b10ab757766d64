"""Optimizer update kernels of the parameter server (numba, nogil).

Each kernel updates ``values[rows[i]]`` and ``state[rows[i]]`` in place with the gradient
``grads[i]``, for ``i`` in order (a row listed twice is updated twice, in order). It skips
``rows[i] == -1`` (absent key) and any ``i`` whose gradient holds a NaN or an infinity (nothing of
that row is written), and returns ``counts = [applied, skipped_absent, skipped_nonfinite]``
(int64). When ``clip`` is true, the updated values are clipped to ``[-bound, bound]``.

The formulas are documented in :mod:`persia.embedding.optim`, whose wrappers validate shapes and
dtypes; these kernels validate nothing. All arithmetic is float32 (the scalars arrive as float32),
as torch does on CPU, except the Adam bias corrections, computed in float64 like torch's Python
scalars. ``fastmath`` stays off: results must match torch's and the NumPy twins in
``tests/naive_optim.py``.

Speed: the rows are random in a large table, so every row costs cache misses, and a plain loop
waits for them one row at a time (3.6M rows/s for Adagrad at dim 16 over 8M rows here). Each
kernel updates the rows in order while it prefetches the first and last cache line of the values
and state of the row ``_AHEAD`` positions further (:func:`prefetch`, a hint: the result is that
of a plain loop, duplicates included). Loading one value of each line of the next block of 64 rows instead,
as the kernels first did, measured 62 ns per row on a training step's 14k rows of a 670k-row
table here, the prefetch 30. Rows starting on 64-byte boundaries (aligned arrays, row bytes a
multiple of 64) save another ~12%. The kernels return ``(counts, 0.0)`` (the second value, once
a checksum of those loads, is kept for the callers).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_AHEAD = 32


def _prefetch_codegen(context, builder, sig, args, nidx):
    aryty = sig.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    idx = list(args[1:]) + [ir.Constant(ir.IntType(64), 0)] * (nidx - (len(args) - 1))
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # read, high temporal locality, data cache
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
    return context.get_dummy_value()


@intrinsic
def prefetch(typingctx, arr, i):
    """Prefetch the cache line of ``arr[i]`` (``arr[i, 0]`` for a 2-D array); a hint only."""
    sig = types.void(arr, types.intp)

    def codegen(context, builder, sig, args):
        return _prefetch_codegen(context, builder, sig, args, arr.ndim)

    return sig, codegen


@intrinsic
def prefetch_at(typingctx, arr, i, j):
    """Prefetch the cache line of ``arr[i, j]`` (a 2-D array); a hint only."""
    sig = types.void(arr, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        return _prefetch_codegen(context, builder, sig, args, 2)

    return sig, codegen


# float32 exponent bits: all ones means Inf or NaN.
_EXP_MASK = np.uint32(0x7F800000)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _nonfinite(gbits, i):
    """True when gradient row i (as uint32 bits) holds an Inf or a NaN."""
    bad = np.uint32(0)
    ui = np.uint64(i)
    for d in range(gbits.shape[1]):
        bad |= np.uint32((gbits[ui, np.uint64(d)] & _EXP_MASK) == _EXP_MASK)
    return bad != 0


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _fma(a, b, c):
    """a * b + c rounded once to float32, as torch's ``add_(x, alpha=...)`` computes it on CPU.

    The float64 product of two float32 values is exact; the sum is rounded to float64, then to
    float32 (a double rounding that differs from a true fma in about one case in 2**29).
    """
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _clip_row(values, r, bound):
    ur = np.uint64(r)
    for d in range(values.shape[1]):
        ud = np.uint64(d)
        w = values[ur, ud]
        if w > bound:
            w = bound
        elif w < -bound:
            w = -bound
        values[ur, ud] = w


@njit(nogil=True, cache=True, error_model="numpy")
def sgd_kernel(values, state, rows, grads, gbits, lr, momentum, weight_decay, clip, bound):
    """SGD with optional momentum (state = the momentum buffer, width dim or 0).

    g' = fma(wd, w, g); with momentum: buf = momentum * buf + g', w = fma(-lr, buf, w);
    else w = fma(-lr, g', w). fma: one rounding, as torch's add_(x, alpha=a).
    """
    dim = values.shape[1]
    use_momentum = state.shape[1] > 0
    n = rows.shape[0]
    counts = np.zeros(3, dtype=np.int64)
    last, width = values.shape[1] - 1, state.shape[1]
    for i in range(-_AHEAD, n):
        # the first and last cache line of the values and state of the row _AHEAD on (a
        # helper function for this kept the row update below from vectorising: 13 -> 41 ns
        # a row with the rows in cache)
        if i + _AHEAD < n:
            q = rows[i + _AHEAD]
            if q >= 0:
                prefetch(values, q)
                prefetch_at(values, q, last)
                if width > 0:
                    prefetch(state, q)
                    prefetch_at(state, q, width - 1)
        if i < 0:
            continue
        r = rows[i]
        if r < 0:
            counts[1] += 1
            continue
        if _nonfinite(gbits, i):
            counts[2] += 1
            continue
        ur = np.uint64(r)  # unsigned indices: no wrap-around branch, the row loops vectorise
        ui = np.uint64(i)
        if use_momentum:
            for d in range(dim):
                ud = np.uint64(d)
                w = values[ur, ud]
                g = _fma(weight_decay, w, grads[ui, ud])
                buf = momentum * state[ur, ud] + g
                state[ur, ud] = buf
                values[ur, ud] = _fma(-lr, buf, w)
        else:
            for d in range(dim):
                ud = np.uint64(d)
                w = values[ur, ud]
                g = _fma(weight_decay, w, grads[ui, ud])
                values[ur, ud] = _fma(-lr, g, w)
        if clip:
            _clip_row(values, r, bound)
        counts[0] += 1
    return counts, 0.0


@njit(nogil=True, cache=True, error_model="numpy")
def adagrad_kernel(
    values, state, rows, grads, gbits, lr, weight_decay, g_square_momentum, eps, clip, bound
):
    """Element-wise Adagrad (state = the accumulator, width dim).

    g' = fma(wd, w, g); acc = gsm * acc + g'^2; w = fma(-lr, g' / (sqrt(acc) + eps), w).
    """
    dim = values.shape[1]
    n = rows.shape[0]
    counts = np.zeros(3, dtype=np.int64)
    last, width = values.shape[1] - 1, state.shape[1]
    for i in range(-_AHEAD, n):
        # the first and last cache line of the values and state of the row _AHEAD on (a
        # helper function for this kept the row update below from vectorising: 13 -> 41 ns
        # a row with the rows in cache)
        if i + _AHEAD < n:
            q = rows[i + _AHEAD]
            if q >= 0:
                prefetch(values, q)
                prefetch_at(values, q, last)
                if width > 0:
                    prefetch(state, q)
                    prefetch_at(state, q, width - 1)
        if i < 0:
            continue
        r = rows[i]
        if r < 0:
            counts[1] += 1
            continue
        if _nonfinite(gbits, i):
            counts[2] += 1
            continue
        ur = np.uint64(r)  # unsigned indices: no wrap-around branch, the row loops vectorise
        ui = np.uint64(i)
        for d in range(dim):
            ud = np.uint64(d)
            w = values[ur, ud]
            g = _fma(weight_decay, w, grads[ui, ud])
            acc = g_square_momentum * state[ur, ud] + g * g
            state[ur, ud] = acc
            values[ur, ud] = _fma(-lr, g / (np.sqrt(acc) + eps), w)
        if clip:
            _clip_row(values, r, bound)
        counts[0] += 1
    return counts, 0.0


@njit(nogil=True, cache=True, error_model="numpy")
def rowwise_adagrad_kernel(
    values, state, rows, grads, gbits, lr, weight_decay, g_square_momentum, eps, clip, bound
):
    """Row-wise Adagrad (state = one accumulator per row, width 1).

    g' = fma(wd, w, g); acc = gsm * acc + mean(g'^2) (summed in order d = 0..dim-1, then / dim);
    w = fma(-lr, g' / (sqrt(acc) + eps), w).
    """
    dim = values.shape[1]
    fdim = np.float32(dim)
    scratch = np.empty((1, dim), dtype=np.float32)
    n = rows.shape[0]
    counts = np.zeros(3, dtype=np.int64)
    last, width = values.shape[1] - 1, state.shape[1]
    for i in range(-_AHEAD, n):
        # the first and last cache line of the values and state of the row _AHEAD on (a
        # helper function for this kept the row update below from vectorising: 13 -> 41 ns
        # a row with the rows in cache)
        if i + _AHEAD < n:
            q = rows[i + _AHEAD]
            if q >= 0:
                prefetch(values, q)
                prefetch_at(values, q, last)
                if width > 0:
                    prefetch(state, q)
                    prefetch_at(state, q, width - 1)
        if i < 0:
            continue
        r = rows[i]
        if r < 0:
            counts[1] += 1
            continue
        if _nonfinite(gbits, i):
            counts[2] += 1
            continue
        ur = np.uint64(r)  # unsigned indices: no wrap-around branch, the row loops vectorise
        ui = np.uint64(i)
        if weight_decay == 0:  # g' = g: fma(0, w, g) up to the sign of a zero, and cheaper
            for d in range(dim):
                ud = np.uint64(d)
                scratch[0, ud] = grads[ui, ud]
        else:
            for d in range(dim):
                ud = np.uint64(d)
                scratch[0, ud] = _fma(weight_decay, values[ur, ud], grads[ui, ud])
        total = np.float32(0.0)
        for d in range(dim):  # in order d = 0..dim-1: the same sum on every CPU
            ud = np.uint64(d)
            total += scratch[0, ud] * scratch[0, ud]
        acc = g_square_momentum * state[r, 0] + total / fdim
        state[r, 0] = acc
        std = np.sqrt(acc) + eps
        for d in range(dim):
            ud = np.uint64(d)
            values[ur, ud] = _fma(-lr, scratch[0, ud] / std, values[ur, ud])
        if clip:
            _clip_row(values, r, bound)
        counts[0] += 1
    return counts, 0.0


@njit(nogil=True, cache=True, error_model="numpy")
def adam_kernel(
    values, state, rows, grads, gbits, lr, beta1, beta2, weight_decay, eps, clip, bound, max_step
):
    """Adam with a per-row step count (torch.optim.SparseAdam's update, plus L2 weight decay).

    state[r] = [m (dim), v (dim), t]. t += 1 (saturating at max_step); g' = fma(wd, w, g);
    m += (1 - b1) * (g' - m); v += (1 - b2) * (g'^2 - v);
    w -= step_size * (m / (sqrt(v) + eps)), step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)
    (float64, rounded to float32). beta1 and beta2 arrive as float64, lr too.
    """
    dim = values.shape[1]
    n = rows.shape[0]
    counts = np.zeros(3, dtype=np.int64)
    log_b1 = np.log(beta1)  # -inf when beta1 == 0: then 1 - b1^t = 1
    log_b2 = np.log(beta2)
    one_minus_b1 = np.float32(1.0 - beta1)
    one_minus_b2 = np.float32(1.0 - beta2)
    last, width = values.shape[1] - 1, state.shape[1]
    for i in range(-_AHEAD, n):
        # the first and last cache line of the values and state of the row _AHEAD on (a
        # helper function for this kept the row update below from vectorising: 13 -> 41 ns
        # a row with the rows in cache)
        if i + _AHEAD < n:
            q = rows[i + _AHEAD]
            if q >= 0:
                prefetch(values, q)
                prefetch_at(values, q, last)
                if width > 0:
                    prefetch(state, q)
                    prefetch_at(state, q, width - 1)
        if i < 0:
            continue
        r = rows[i]
        if r < 0:
            counts[1] += 1
            continue
        if _nonfinite(gbits, i):
            counts[2] += 1
            continue
        ur = np.uint64(r)  # unsigned indices: no wrap-around branch, the row loops vectorise
        ui = np.uint64(i)
        t = state[r, 2 * dim]
        if t < max_step:
            t += np.float32(1.0)
            state[r, 2 * dim] = t
        step = np.float64(t)
        # 1 - b^t as -expm1(t * log b): cheaper than pow, and exact to float64 rounding
        bias1 = -np.expm1(step * log_b1)
        bias2 = -np.expm1(step * log_b2)
        step_size = np.float32(lr * np.sqrt(bias2) / bias1)
        first = state[r, :dim]  # views: m and v as separate arrays vectorise
        second = state[r, dim : 2 * dim]
        for d in range(dim):
            ud = np.uint64(d)
            w = values[ur, ud]
            g = _fma(weight_decay, w, grads[ui, ud])
            m = first[ud]
            m = m + one_minus_b1 * (g - m)
            first[ud] = m
            v = second[ud]
            v = v + one_minus_b2 * (g * g - v)
            second[ud] = v
            values[ur, ud] = w - step_size * (m / (np.sqrt(v) + eps))
        if clip:
            _clip_row(values, r, bound)
        counts[0] += 1
    return counts, 0.0
