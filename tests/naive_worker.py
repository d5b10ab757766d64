"""Plain NumPy / Python twins of persia.worker.kernels and persia.hashing, for the tests.

Each twin computes the same float32 operations in the same order as its kernel, so results are
compared exactly.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1


def add_prefix(ids: np.ndarray, prefix: int, prefix_bits: int) -> np.ndarray:
    low = 64 - prefix_bits
    out = []
    for v in ids.tolist():
        out.append(((prefix << low) & MASK64) | (v & ((1 << low) - 1)))
    return np.array(out, dtype=np.uint64)


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index: dict[int, int] = {}
    inverse = []
    for k in keys.tolist():
        inverse.append(index.setdefault(k, len(index)))
    return np.array(list(index), dtype=np.uint64), np.array(inverse, dtype=np.int32)


def _divisor(mode: str, n: int) -> np.float32:
    return np.float32(n) if mode == "mean" else np.sqrt(np.float32(n))


def pool_forward(lengths, inverse, emb, mode):
    batch, dim = len(lengths), emb.shape[1]
    out = np.zeros((batch, dim), dtype=np.float32)
    pos = 0
    for b, n in enumerate(lengths.tolist()):
        acc = np.zeros(dim, dtype=np.float32)
        for t in range(pos, pos + n):
            acc = acc + emb[inverse[t]]
        if n and mode != "sum":
            acc = acc / _divisor(mode, n)
        out[b] = acc
        pos += n
    return out


def pool_backward(lengths, inverse, d_out, num_uniques, mode):
    dim = d_out.shape[1]
    grad = np.zeros((num_uniques, dim), dtype=np.float32)
    pos = 0
    for b, n in enumerate(lengths.tolist()):
        term = d_out[b] if mode == "sum" or n == 0 else d_out[b] / _divisor(mode, n)
        for t in range(pos, pos + n):
            grad[inverse[t]] = grad[inverse[t]] + term
        pos += n
    return grad


def pool_raw_forward(lengths, inverse, emb, size):
    batch, dim = len(lengths), emb.shape[1]
    out = np.zeros((batch, size, dim + 1), dtype=np.float32)
    pos = dropped = 0
    for b, n in enumerate(lengths.tolist()):
        for j in range(min(n, size)):
            out[b, j, :dim] = emb[inverse[pos + j]]
            out[b, j, dim] = 1.0
        dropped += max(0, n - size)
        pos += n
    return out, dropped


def pool_raw_backward(lengths, inverse, d_out, num_uniques):
    dim = d_out.shape[2] - 1
    grad = np.zeros((num_uniques, dim), dtype=np.float32)
    pos = 0
    for b, n in enumerate(lengths.tolist()):
        for j in range(min(n, d_out.shape[1])):
            grad[inverse[pos + j]] = grad[inverse[pos + j]] + d_out[b, j, :dim]
        pos += n
    return grad


def nonfinite_rows(grads):
    bad = ~np.isfinite(grads).all(axis=1)
    return bad, int(bad.sum())


def mix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def hash_bytes(b: bytes, salt: int = 0) -> int:
    h = 0xCBF29CE484222325 ^ salt
    for byte in b:
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return mix64(h)


def hash_int(v: int, salt: int = 0) -> int:
    return mix64((v & MASK64) ^ salt)
