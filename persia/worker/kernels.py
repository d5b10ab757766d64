"""numba kernels of the embedding worker: key prefixing, de-duplication, pooling and its backward.

Every function here is ``@njit(nogil=True, cache=True)``: arrays in and out, little allocation, no
validation, a count or status as the result. The validated entry points are in
:mod:`persia.worker.pooling`; the plain NumPy twins the tests compare against are in
``tests/naive_worker.py``.

The batch layout (columnar, one slot). For a batch of 4 samples whose IDs are
``[[7, 3], [], [3], [9, 7, 7]]``::

    values   = [7, 3, 3, 9, 7, 7]         # every ID, sample after sample
    lengths  = [2, 0, 1, 3]               # IDs per sample (empty samples allowed)
    uniques  = [7, 3, 9]                  # de-duplicated, in first-seen order
    inverse  = [0, 1, 1, 2, 0, 0]         # uniques[inverse[i]] == values[i]
    emb      = f32[3, dim]                # one row per unique key (from the store)

Pooling modes (integer codes below), for sample ``b`` with ``n_b`` IDs and rows ``e_1..e_n``:

* ``SUM``:  ``out[b] = e_1 + ... + e_n`` (added in order, in float32);
* ``MEAN``: ``out[b] = SUM / n_b`` (float32 division);
* ``SQRT``: ``out[b] = SUM / sqrt(n_b)`` (PERSIA's ``sqrt_scaling``; float32 sqrt and division);
* empty samples give zeros in every mode;
* raw (PERSIA's ``embedding_summation: false``): ``out[b, j, :dim] = e_{j+1}`` for
  ``j < min(n_b, S)`` and ``out[b, j, dim] = 1`` there (the mask channel); rows ``j >= n_b`` are
  zeros, mask included; IDs past ``S = sample_fixed_size`` are dropped and counted.

Backward: ``grad_u[inverse[i]] += scale_b * d_out[b]`` over every ID occurrence ``i`` of sample
``b`` (for MEAN the term is ``d_out[b] / n_b``, for SQRT ``d_out[b] / sqrt(n_b)``); for raw, the
kept positions get ``d_out[b, j, :dim]`` and the mask channel's gradient is ignored.

The summed kernels write a slot into columns ``col:col + dim`` of a wider output, so a caller can
pool every slot of a batch straight into one ``(batch, total_dim)`` buffer.
"""

from __future__ import annotations

import numpy as np
from numba import njit

SUM = 0
MEAN = 1
SQRT = 2

# splitmix64's increment and finaliser constants (Steele, Lea, Flood 2014; Vigna's splitmix64.c).
# The de-duplication table's probe hash; private scratch, not a file format (persia.hashing is).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)


@njit(nogil=True, cache=True, inline="always")
def mix64(x):
    """splitmix64's output for state ``x``: ``fin(x + 0x9E3779B97F4A7C15)`` (a bijection)."""
    z = x + _GAMMA
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


# ---------------------------------------------------------------------------------------------
# Prefixing
# ---------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def add_prefix_kernel(ids, high, low_mask, out, start):
    """out[start + i] = high | (ids[i] & low_mask); returns the number written."""
    n = ids.shape[0]
    for i in range(n):
        out[start + i] = high | (ids[i] & low_mask)
    return n


# ---------------------------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def unique_inverse_kernel(keys, start, stop, table, shift, u, max_uniques, uniques, inverse):
    """One hash pass over ``keys[start:stop]``, continuing a de-duplication that holds u uniques.

    ``table`` (int32, a power of two long; -1 = empty) maps a key to its index in ``uniques``; a
    key's home slot is the top ``64 - shift`` bits of ``mix64(key)``; linear probing, comparing
    ``uniques[table[slot]]`` with the key. New keys are appended to ``uniques`` (first-seen
    order); ``inverse[i]`` receives the index of ``keys[i]``.

    Stops before inserting a new key once ``u == max_uniques`` (the caller's load limit): the
    caller then grows the table (:func:`rehash_kernel`) and calls again from the returned position.

    Returns:
        ``(position reached, uniques held)``; the position is ``stop`` when the range is done.
    """
    mask = table.shape[0] - 1
    for i in range(start, stop):
        k = keys[i]
        s = np.int64(mix64(k) >> shift)
        while True:
            v = table[s]
            if v < 0:
                if u >= max_uniques:
                    return i, u
                table[s] = u
                uniques[u] = k
                inverse[i] = u
                u += 1
                break
            if uniques[v] == k:
                inverse[i] = v
                break
            s = (s + 1) & mask
    return stop, u


@njit(nogil=True, cache=True)
def rehash_kernel(uniques, u, table, shift):
    """Insert ``uniques[:u]`` (distinct keys) into an empty table as indices 0..u-1."""
    mask = table.shape[0] - 1
    for t in range(u):
        s = np.int64(mix64(uniques[t]) >> shift)
        while table[s] >= 0:
            s = (s + 1) & mask
        table[s] = t
    return u


# ---------------------------------------------------------------------------------------------
# Pooling forward / backward
# ---------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def pool_forward_kernel(lengths, inverse, emb, mode, out, col, acc):
    """Summed pooling (SUM / MEAN / SQRT) of one slot into ``out[:, col:col + dim]``.

    Rows are added in order into the scratch ``acc`` (f32[dim]), then scaled and stored. Every
    entry of the column range is written (zeros for empty samples), so ``out`` may be
    uninitialised. Returns the number of IDs consumed (``sum(lengths)``).
    """
    dim = emb.shape[1]
    pos = 0
    for b in range(lengths.shape[0]):
        n = lengths[b]
        for d in range(dim):
            acc[d] = np.float32(0.0)
        for t in range(pos, pos + n):
            r = inverse[t]
            for d in range(dim):
                acc[d] += emb[r, d]
        pos += n
        if n > 0 and mode != SUM:
            if mode == MEAN:
                div = np.float32(n)
            else:
                div = np.sqrt(np.float32(n))
            for d in range(dim):
                out[b, col + d] = acc[d] / div
        else:
            for d in range(dim):
                out[b, col + d] = acc[d]
    return pos


@njit(nogil=True, cache=True)
def pool_backward_kernel(lengths, inverse, d_out, col, mode, grad_u, term):
    """Segment sum of per-sample gradients into one gradient per unique row.

    ``grad_u[inverse[i]] += term_b`` for every ID i of sample b, where ``term_b`` is
    ``d_out[b, col:col + dim]`` for SUM, that divided by ``n_b`` for MEAN and by ``sqrt(n_b)`` for
    SQRT (computed once per sample into the scratch ``term``, f32[dim]). ``grad_u`` must hold
    zeros (or a sum to add to) on entry. Returns the number of IDs consumed.
    """
    dim = grad_u.shape[1]
    pos = 0
    for b in range(lengths.shape[0]):
        n = lengths[b]
        if n == 0:
            continue
        if mode == SUM:
            for d in range(dim):
                term[d] = d_out[b, col + d]
        else:
            if mode == MEAN:
                div = np.float32(n)
            else:
                div = np.sqrt(np.float32(n))
            for d in range(dim):
                term[d] = d_out[b, col + d] / div
        for t in range(pos, pos + n):
            r = inverse[t]
            for d in range(dim):
                grad_u[r, d] += term[d]
        pos += n
    return pos


@njit(nogil=True, cache=True)
def pool_raw_forward_kernel(lengths, inverse, emb, out):
    """Raw (non-summed) layout: ``out[b, j] = [emb[inverse[pos_b + j]], 1]`` for the first
    ``min(n_b, S)`` IDs, zeros after. Every entry of ``out`` (batch, S, dim + 1) is written.

    Returns the number of IDs dropped because a sample had more than S.
    """
    S = out.shape[1]
    dim = emb.shape[1]
    pos = 0
    dropped = 0
    for b in range(lengths.shape[0]):
        n = lengths[b]
        m = min(n, S)
        for j in range(m):
            r = inverse[pos + j]
            for d in range(dim):
                out[b, j, d] = emb[r, d]
            out[b, j, dim] = np.float32(1.0)
        for j in range(m, S):
            for d in range(dim + 1):
                out[b, j, d] = np.float32(0.0)
        dropped += n - m
        pos += n
    return dropped


@njit(nogil=True, cache=True)
def pool_raw_backward_kernel(lengths, inverse, d_out, grad_u):
    """``grad_u[inverse[pos_b + j]] += d_out[b, j, :dim]`` for the kept positions j < min(n_b, S).

    The mask channel's gradient (``d_out[..., dim]``) is ignored; dropped IDs get nothing.
    Returns the number of gradient rows added.
    """
    S = d_out.shape[1]
    dim = grad_u.shape[1]
    pos = 0
    added = 0
    for b in range(lengths.shape[0]):
        n = lengths[b]
        m = min(n, S)
        for j in range(m):
            r = inverse[pos + j]
            for d in range(dim):
                grad_u[r, d] += d_out[b, j, d]
        added += m
        pos += n
    return added


@njit(nogil=True, cache=True)
def mark_nonfinite_kernel(grads, bad):
    """bad[r] = True where row r of ``grads`` has any NaN or infinity; returns how many."""
    count = 0
    for r in range(grads.shape[0]):
        flag = False
        for d in range(grads.shape[1]):
            if not np.isfinite(grads[r, d]):
                flag = True
                break
        bad[r] = flag
        if flag:
            count += 1
    return count
