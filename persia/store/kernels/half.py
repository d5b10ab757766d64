"""Half-precision rows: the numba conversions between float32 and 16-bit storage, and the
optimizer's gather / scatter around the float32 update.

A table stores its rows as ``float32``, ``float16`` or ``bfloat16``
(``persia.store.table.EmbeddingTable(row_dtype=...)``). numba has no float16 on the CPU and numpy
no bfloat16, so the kernels see 16-bit rows as integer bit patterns, and the *array type* says
which format they hold:

* ``float32`` rows: ``f32[R, dim]``, read and written as they are;
* ``float16`` rows: ``i16[R, dim]`` (a view of the table's ``float16`` array): IEEE binary16;
* ``bfloat16`` rows: ``u16[R, dim]`` (the table's own array): the high half of a float32.

The table kernels read a stored element with :func:`widen` (its float32 value, exact) and store
a new row with :func:`store_row` (round to nearest, ties to even: numpy's ``astype(float16)`` for
float16). numba resolves them from the array type when it compiles a kernel for it, so the
float32 kernels compile to what they were (``widen`` of float32 is the identity, ``store_row``
the old copy loop; measured unchanged, benchmarks/README.md) and a table dispatches once per
call, by the type of its array, not per element.

Optimizer updates of half rows (:func:`gather_rows_kernel`, :func:`scatter_rows_kernel`): the
distinct rows of a call are widened into a float32 block, the optimizer's float32 kernel runs on
the block (a row listed twice is updated twice, in order, on
the block), and the block is narrowed back, once per distinct row, by round to nearest even or by
stochastic rounding: a value between two neighbouring half values ``lo < x < hi`` becomes ``hi``
with probability ``(x - lo) / (hi - lo)`` (unbiased: its mean is ``x``). The random bits are a
SplitMix64 stream of ``(seed, element)``: the same call with the same seed rounds the same way.
Values that overflow the format become infinities (float16's largest is 65504; the default
``weight_bound`` of 10 keeps rows far from it).

The NumPy twins of these kernels are in ``tests/naive.py``.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from persia.embedding.kernels import prefetch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S1 = np.uint64(0xBF58476D1CE4E5B9)
_S2 = np.uint64(0x94D049BB133111EB)
_U30 = np.uint64(30)
_U27 = np.uint64(27)
_U31 = np.uint64(31)
_U40 = np.uint64(40)
_U48 = np.uint64(48)
_U51 = np.uint64(51)
_U11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53
_TWO24 = np.float32(16777216.0)  # 2**24: float16's subnormal step is 2**-24
_TWO112 = np.float32(2.0**112)  # rebias float16's exponent to float32's


@intrinsic
def f32_from_bits(typingctx, u):
    """The float32 whose bits are the uint32 ``u``."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def bits_of_f32(typingctx, x):
    """The bits (uint32) of the float32 ``x``."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def _mix(z):
    """SplitMix64's finaliser (the stochastic rounding's random bits)."""
    z = (z ^ (z >> _U30)) * _S1
    z = (z ^ (z >> _U27)) * _S2
    return z ^ (z >> _U31)


@njit(nogil=True, cache=True, inline="always")
def f16_to_f32(h):
    """float16 bits (the low 16 bits of the uint32 ``h``) -> float32, exactly."""
    o = (h & np.uint32(0x7FFF)) << np.uint32(13)
    # normals and subnormals: the bits shifted, times 2**112 (exact); Inf / NaN (exponent all
    # ones) come out as 65536 * (1 + mantissa), made Inf / NaN by setting every exponent bit.
    # Branch-free (a select), so that a row's conversion vectorises.
    f = bits_of_f32(f32_from_bits(o) * _TWO112)
    special = (h & np.uint32(0x7C00)) == np.uint32(0x7C00)
    f |= np.uint32(0x7F800000) if special else np.uint32(0)
    return f32_from_bits(f | ((h & np.uint32(0x8000)) << np.uint32(16)))


@njit(nogil=True, cache=True)
def f32_to_f16(x):
    """float32 -> float16 bits (uint32), round to nearest, ties to even (as numpy)."""
    f = bits_of_f32(np.float32(x))
    sign = (f >> np.uint32(16)) & np.uint32(0x8000)
    f &= np.uint32(0x7FFFFFFF)
    if f >= np.uint32(0x7F800000):  # Inf / NaN (NaN stays a quiet NaN)
        return sign | np.uint32(0x7C00) | (np.uint32(0x200) if f > np.uint32(0x7F800000) else 0)
    if f >= np.uint32(0x477FF000):  # >= 65520: rounds to Inf
        return sign | np.uint32(0x7C00)
    if f < np.uint32(0x38800000):  # below 2**-14: a subnormal (or zero, or the smallest normal)
        return sign | np.uint32(np.rint(f32_from_bits(f) * _TWO24))
    h = f - np.uint32(0x38000000)  # rebias the exponent (127 - 15 = 112)
    h += np.uint32(0x0FFF) + ((h >> np.uint32(13)) & np.uint32(1))
    return sign | (h >> np.uint32(13))


@njit(nogil=True, cache=True)
def f32_to_f16_stochastic(x, rnd):
    """float32 -> float16 bits, rounded up in magnitude with probability equal to the dropped
    fraction; ``rnd`` is 64 random bits."""
    f = bits_of_f32(np.float32(x))
    sign = (f >> np.uint32(16)) & np.uint32(0x8000)
    f &= np.uint32(0x7FFFFFFF)
    if f >= np.uint32(0x7F800000):
        return sign | np.uint32(0x7C00) | (np.uint32(0x200) if f > np.uint32(0x7F800000) else 0)
    if f >= np.uint32(0x47800000):  # >= 65536: Inf
        return sign | np.uint32(0x7C00)
    if f < np.uint32(0x38800000):  # subnormal range: steps of 2**-24
        m = np.float64(f32_from_bits(f)) * 16777216.0
        lo = np.floor(m)
        up = np.float64(rnd >> _U11) * _INV53 < (m - lo)
        return sign | np.uint32(np.uint32(lo) + (np.uint32(1) if up else np.uint32(0)))
    h = f - np.uint32(0x38000000)
    h += np.uint32(rnd >> _U51)  # 13 random bits below float16's last bit
    return sign | np.minimum(h >> np.uint32(13), np.uint32(0x7C00))


@njit(nogil=True, cache=True)
def bf16_to_f32(h):
    """bfloat16 bits (uint32 ``h`` < 2**16) -> float32, exactly."""
    return f32_from_bits(h << np.uint32(16))


@njit(nogil=True, cache=True)
def f32_to_bf16(x):
    """float32 -> bfloat16 bits (uint32), round to nearest, ties to even."""
    f = bits_of_f32(np.float32(x))
    if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it a quiet NaN
        return (f >> np.uint32(16)) | np.uint32(0x40)
    return (f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(nogil=True, cache=True)
def f32_to_bf16_stochastic(x, rnd):
    """float32 -> bfloat16 bits, stochastically rounded (16 random bits below the last bit)."""
    f = bits_of_f32(np.float32(x))
    if (f & np.uint32(0x7F800000)) == np.uint32(0x7F800000):  # Inf / NaN: as nearest
        return f32_to_bf16(x)
    return (f + np.uint32(rnd >> _U48)) >> np.uint32(16)


def widen(x):  # pragma: no cover - replaced by the overload inside numba
    """The float32 value of one stored element (see the module docstring)."""
    raise NotImplementedError("widen is for numba kernels")


def narrow(values, x):  # pragma: no cover - replaced by the overload inside numba
    """The float32 ``x`` as an element of ``values`` (round to nearest, ties to even)."""
    raise NotImplementedError("narrow is for numba kernels")


@overload(widen, inline="always")
def _widen(x):
    if x == types.float32:
        return lambda x: x
    if x == types.int16:  # float16 bits
        return lambda x: f16_to_f32(np.uint32(np.uint16(x)))
    if x == types.uint16:  # bfloat16 bits
        return lambda x: bf16_to_f32(np.uint32(x))
    return None


@overload(narrow)
def _narrow(values, x):
    dt = values.dtype
    if dt == types.float32:
        return lambda values, x: np.float32(x)
    if dt == types.int16:
        return lambda values, x: np.int16(np.uint16(f32_to_f16(x)))
    if dt == types.uint16:
        return lambda values, x: np.uint16(f32_to_bf16(x))
    return None


def narrow_stochastic(values, x, rnd):  # pragma: no cover - replaced inside numba
    """``narrow`` with stochastic rounding (``rnd``: 64 random bits)."""
    raise NotImplementedError("narrow_stochastic is for numba kernels")


@overload(narrow_stochastic)
def _narrow_stochastic(values, x, rnd):
    dt = values.dtype
    if dt == types.int16:
        return lambda values, x, rnd: np.int16(np.uint16(f32_to_f16_stochastic(x, rnd)))
    if dt == types.uint16:
        return lambda values, x, rnd: np.uint16(f32_to_bf16_stochastic(x, rnd))
    return None


def store_row(values, r, out, i):  # pragma: no cover - replaced by the overload inside numba
    """``values[r] = out[i]`` (a new row's initial vector), rounded to nearest even, and
    ``out[i]`` = what the row then holds."""
    raise NotImplementedError("store_row is for numba kernels")


def round_row(values, out, i):  # pragma: no cover - replaced by the overload inside numba
    """``out[i]`` rounded to what a row of ``values`` can hold (nothing for float32)."""
    raise NotImplementedError("round_row is for numba kernels")


@overload(store_row, inline="always")
def _store_row(values, r, out, i):
    if values.dtype == types.float32:  # the float32 kernels' own copy loop, as it was

        def copy(values, r, out, i):
            for j in range(out.shape[1]):
                values[np.uint64(r), np.uint64(j)] = out[np.uint64(i), np.uint64(j)]

        return copy

    def rounded(values, r, out, i):
        for j in range(out.shape[1]):
            v = narrow(values, out[i, j])
            values[r, j] = v
            out[i, j] = widen(v)

    return rounded


@overload(round_row, inline="always")
def _round_row(values, out, i):
    if values.dtype == types.float32:
        return lambda values, out, i: None

    def rounded(values, out, i):
        for j in range(out.shape[1]):
            out[i, j] = widen(narrow(values, out[i, j]))

    return rounded


#: rows ahead of the one being copied whose lines are prefetched
_AHEAD = 16


@njit(nogil=True, cache=True)
def gather_rows_kernel(values, state, rows, local, uniq, vblock, sblock):
    """The distinct rows of an update, widened: ``uniq[:k]`` = the distinct rows ``>= 0`` of
    ``rows`` in first-seen order, ``local[i]`` = the position of ``rows[i]`` among them (-1 for
    -1), ``vblock[:k]`` = their values as float32, ``sblock[:k]`` = their state. Returns ``k``.

    One pass: a small open-addressing map from row to position, and the copies of each new row,
    whose lines are prefetched ``_AHEAD`` entries before."""
    n = rows.shape[0]
    dim = values.shape[1]
    width = state.shape[1]
    size = 16
    while size < 2 * n:
        size *= 2
    mask = size - 1
    slots = np.full(size, -1, dtype=np.int32)
    k = 0
    for i in range(n):
        if i + _AHEAD < n:
            q = rows[i + _AHEAD]
            if q >= 0:
                prefetch(values, q)
                if width > 0:
                    prefetch(state, q)
        r = rows[i]
        if r < 0:
            local[i] = -1
            continue
        s = np.int64(_mix(np.uint64(r)) >> np.uint64(40)) & mask
        while True:
            j = slots[s]
            if j < 0:
                slots[s] = k
                uniq[k] = r
                local[i] = k
                for d in range(dim):
                    vblock[k, d] = widen(values[r, d])
                for d in range(width):
                    sblock[k, d] = state[r, d]
                k += 1
                break
            if uniq[j] == r:
                local[i] = j
                break
            s = (s + 1) & mask
    return k


@njit(nogil=True, cache=True)
def scatter_rows_kernel(vblock, sblock, uniq, values, state, stochastic, seed):
    """``values[uniq[i]] = narrow(vblock[i])`` and ``state[uniq[i]] = sblock[i]``: round to
    nearest even, or stochastically with the random bits of element ``(i, j)`` =
    ``mix(seed + (i * dim + j + 1) * GOLDEN)``."""
    dim = values.shape[1]
    width = state.shape[1]
    k = uniq.shape[0]
    for i in range(k):
        if i + _AHEAD < k:
            q = uniq[i + _AHEAD]
            prefetch(values, q)
            if width > 0:
                prefetch(state, q)
        r = uniq[i]
        for d in range(width):
            state[r, d] = sblock[i, d]
        if stochastic:
            for j in range(dim):
                e = np.uint64(i * dim + j + 1)
                values[r, j] = narrow_stochastic(values, vblock[i, j], _mix(seed + e * _GOLDEN))
        else:
            for j in range(dim):
                values[r, j] = narrow(values, vblock[i, j])


@njit(nogil=True, cache=True)
def narrow_kernel(src, out):
    """``out[i, j] = narrow(src[i, j])`` (float32 -> the type of ``out``, nearest even)."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            out[i, j] = narrow(out, src[i, j])


@njit(nogil=True, cache=True)
def widen_kernel(src, out):
    """``out[i, j] = widen(src[i, j])`` (float32)."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            out[i, j] = widen(src[i, j])
