"""numba kernels of the wire codec (:mod:`persia.rpc.wire`): one pass per row each way.

Every function is ``@njit(nogil=True, cache=True)``, arrays in and out, no validation (the
entry points in :mod:`persia.rpc.wire` check shapes). numba has no float16 on the CPU, so the
codes are float16 bit patterns in ``uint16``: :func:`f32_to_f16_bits` rounds to nearest, ties to
even, exactly as NumPy's ``astype(np.float16)`` does (the tests compare them bit for bit), and
decoding reads a 65536-entry float32 table of every pattern.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["F16_TABLE", "decode_kernel", "encode_kernel", "f32_to_f16_bits"]

_BLOCK = 4096  # values per block of the encoder (16 KiB of float32)

#: float16 bit pattern -> its float32 value (NaN patterns give NaN, infinities infinities).
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(nogil=True, cache=True)
def f32_to_f16_bits(
    values: np.ndarray, scratch: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``out[j]`` = the bits of the float16 nearest ``values[j]`` (float32; ties to even, NaN
    stays NaN, overflow is an infinity); ``scratch``: a float32 buffer as long. Branch-free per
    element (F. Giesen's magic-number rounding), so the loops vectorise."""
    bits = values.view(np.uint32)
    sbits = scratch.view(np.uint32)
    for j in range(values.shape[0]):
        # subnormal float16s: adding 0.5 puts the rounded float16 mantissa in the low bits
        scratch[j] = abs(values[j]) + np.float32(0.5)
    for j in range(values.shape[0]):
        f = bits[j]
        sign = f & np.uint32(0x80000000)
        a = f ^ sign
        odd = (a >> np.uint32(13)) & np.uint32(1)
        # rebias the exponent (127 -> 15) and round the mantissa to 10 bits, ties to even
        normal = (a + np.uint32(0xC8000FFF) + odd) >> np.uint32(13)
        sub = sbits[j] - np.uint32(0x3F000000)
        h = normal if a >= np.uint32(0x38800000) else sub
        if a >= np.uint32(0x47800000):  # |x| >= 2**16 (or infinity, NaN)
            h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
        out[j] = np.uint16(h | (sign >> np.uint32(16)))


@njit(nogil=True, cache=True)
def encode_kernel(
    rows: np.ndarray, codes: np.ndarray, exps: np.ndarray, top: int, e_min: int, e_max: int
) -> None:  # pragma: no cover - compiled
    """``codes[i] = f16(rows[i] * 2**-e_i)`` (as bits) and ``exps[i] = e_i``, where ``e_i`` is
    the exponent of row ``i``'s largest finite magnitude minus ``top``, clipped to
    ``[e_min, e_max]`` (``-e_min <= 127``: the scale is a float32); a coded magnitude of
    ``2**top`` with ``e_i + top >= 128`` (it would decode past float32's largest) takes
    float16's next value down. ``rows`` and ``codes`` are C-contiguous."""
    n, dim = rows.shape
    # rows go through the float16 rounding a block at a time: the buffers stay in cache
    block = max(1, _BLOCK // max(dim, 1))
    scaled = np.empty(block * dim, dtype=np.float32)
    scratch = np.empty(block * dim, dtype=np.float32)
    flat = codes.reshape(n * dim)
    inf = np.float32(np.inf)
    zero = np.float32(0.0)
    over = False
    for start in range(0, n, block):
        stop = min(start + block, n)
        for i in range(start, stop):
            m = zero
            for j in range(dim):
                a = abs(rows[i, j])
                m = max(m, a if a < inf else zero)  # NaN and infinities do not set the scale
            e = min(max(math.frexp(m)[1] - top, e_min), e_max)
            exps[i] = e
            over = over or e + top >= 128
            scale = np.float32(math.ldexp(1.0, -e))
            base = (i - start) * dim
            for j in range(dim):
                scaled[base + j] = rows[i, j] * scale
        size = (stop - start) * dim
        f32_to_f16_bits(scaled[:size], scratch[:size], flat[start * dim : stop * dim])
    if over:  # rare: rows within 2**-12 of float32's largest magnitude
        cap = np.uint16((top + 15) << 10)  # the bits of 2**top
        for i in range(n):
            if exps[i] + top >= 128:
                for j in range(dim):
                    if (codes[i, j] & np.uint16(0x7FFF)) == cap:
                        codes[i, j] = (codes[i, j] & np.uint16(0x8000)) | np.uint16(cap - 1)


@njit(nogil=True, cache=True)
def decode_kernel(
    codes: np.ndarray, exps: np.ndarray, table: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``out[i] = table[codes[i]] * 2**exps[i]`` (float32; ``exps >= -127``)."""
    n, dim = codes.shape
    for i in range(n):
        scale = np.float32(math.ldexp(1.0, int(exps[i])))
        for j in range(dim):
            out[i, j] = table[codes[i, j]] * scale
