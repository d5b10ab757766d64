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


def prefix_unique_inverse(ids, seg, prefixes, prefix_bits):
    """Twin of ``Deduper.prefix_unique_inverse``: prefix each slot's IDs, then de-duplicate."""
    keys = np.concatenate(
        [add_prefix(ids[seg[s] : seg[s + 1]], p, prefix_bits) for s, p in enumerate(prefixes)]
        or [np.empty(0, np.uint64)]
    )
    return unique_inverse(keys)


def pool_onehot_forward(inverse, emb, n):
    """Twin of ``pool_onehot_forward_kernel``: slot s's row of sample b is inverse[s * n + b]."""
    m = len(inverse) // n if n else 0
    dim = emb.shape[1]
    out = np.zeros((n, m * dim), dtype=np.float32)
    for s in range(m):
        for b in range(n):
            out[b, s * dim : (s + 1) * dim] = emb[inverse[s * n + b]]
    return out


def pool_onehot_backward(inverse, d_out, num_uniques, dim):
    """Twin of ``pool_onehot_backward_kernel``: adds in sample-major order; (grad, nonfinite)."""
    n = d_out.shape[0]
    m = d_out.shape[1] // dim
    grad = np.zeros((num_uniques, dim), dtype=np.float32)
    for b in range(n):
        for s in range(m):
            r = inverse[s * n + b]
            grad[r] = grad[r] + d_out[b, s * dim : (s + 1) * dim]
    return grad, nonfinite_rows(grad)[1]


def group_by_shard(uniques, shard, num_shards, inverse):
    """Twin of ``group_by_shard_kernel``: (reordered uniques, remapped inverse, bounds)."""
    order = [t for s in range(num_shards) for t in range(len(uniques)) if shard[t] == s]
    pos = np.empty(len(uniques), dtype=np.int32)
    pos[order] = np.arange(len(order), dtype=np.int32)
    bounds = np.zeros(num_shards + 1, dtype=np.int64)
    np.cumsum(np.bincount(shard, minlength=num_shards), out=bounds[1:])
    return uniques[order], pos[inverse], bounds


class Worker:
    """A plain NumPy twin of ``persia.worker.EmbeddingWorker`` over an in-process store: the
    algorithm the worker had before its fused kernels (per slot prefixing, one de-duplication per
    dim, per-shard lookups of the keys in first-seen order, per-slot pooling, and the one-hot
    layout's sample-major segment sum), with the twins above."""

    def __init__(self, slots, prefix_bits, store, one_hot=True):
        self.slots = {s.name: s for s in slots}
        self.bits = prefix_bits
        self.store = store
        self.one_hot = one_hot
        self.nonfinite = 0

    def _keys(self, spec, feature):
        values, lengths = feature.values, feature.lengths
        if spec.hash_stack_rounds:
            from persia.worker.embedding_worker import hash_stack

            values = hash_stack(values, spec.hash_stack_rounds, spec.hash_stack_size)
            lengths = lengths * spec.hash_stack_rounds
        return add_prefix(values, spec.prefix, self.bits), lengths

    def forward(self, batch, training):
        n = batch.batch_size
        groups, layout, column = {}, [], 0
        for fi, f in enumerate(batch.id_type_features):
            spec = self.slots[f.name]
            keys, lengths = self._keys(spec, f)
            col = -1
            if spec.pooling == "raw":
                layout.append(("raw", fi, spec.dim))
            else:
                layout.append(("sum", column, spec.dim))
                col = column
                column += spec.dim
            groups.setdefault(spec.dim, []).append((fi, spec, keys, lengths, col))
        summed = np.zeros((n, column), dtype=np.float32)
        raw, state = {}, []
        for dim, parts in groups.items():
            keys = np.concatenate([p[2] for p in parts])
            uniques, inverse = unique_inverse(keys)
            where = self.store.shard_of(uniques)
            rows = np.zeros((len(uniques), dim), dtype=np.float32)
            for s, shard in enumerate(self.store.shards):
                sel = np.flatnonzero(where == s)
                if len(sel):
                    rows[sel] = shard.lookup(uniques[sel], dim, training)
            one_hot = (
                self.one_hot
                and all(p[1].pooling != "raw" and len(p[2]) == n for p in parts)
                and all(p[3].min() >= 1 for p in parts if n)
                and [p[4] for p in parts] == [i * dim for i in range(len(parts))]
                and len(parts) * dim == column
            )
            pos = 0
            spans = []
            for fi, spec, k, lengths, col in parts:
                inv = inverse[pos : pos + len(k)]
                spans.append((fi, spec, lengths, col, pos, pos + len(k)))
                pos += len(k)
                if spec.pooling == "raw":
                    raw[fi] = pool_raw_forward(lengths, inv, rows, spec.sample_fixed_size)[0]
                else:
                    summed[:, col : col + dim] = pool_forward(lengths, inv, rows, spec.pooling)
            state.append((dim, uniques, inverse, where, spans, one_hot))
        return summed, raw, layout, state

    def backward(self, state, summed_grad, raw_grads):
        totals = np.zeros(3, dtype=np.int64)
        n = summed_grad.shape[0] if summed_grad is not None else None
        for dim, uniques, inverse, where, spans, one_hot in state:
            if one_hot and summed_grad is not None:
                grad, bad = pool_onehot_backward(
                    np.ascontiguousarray(inverse), summed_grad, len(uniques), dim
                )
            else:
                grad = np.zeros((len(uniques), dim), dtype=np.float32)
                touched = False
                for fi, spec, lengths, col, a, b in spans:
                    inv = inverse[a:b]
                    if spec.pooling == "raw":
                        if fi not in raw_grads:
                            continue
                        _pool_raw_backward_into(grad, lengths, inv, raw_grads[fi])
                    elif summed_grad is not None:
                        d_out = summed_grad[:n, col : col + dim]
                        _pool_backward_into(grad, lengths, inv, d_out, spec.pooling)
                    else:
                        continue
                    touched = True
                if not touched:
                    continue
                bad = nonfinite_rows(grad)[1]
            self.nonfinite += bad
            for s, shard in enumerate(self.store.shards):
                sel = np.flatnonzero(where == s)
                if len(sel):
                    totals += shard.apply_gradients(uniques[sel], np.ascontiguousarray(grad[sel]))
        return totals


def _pool_backward_into(grad, lengths, inverse, d_out, mode):
    """``pool_backward`` adding onto ``grad`` in place (a key's sum runs on across slots)."""
    pos = 0
    for b, n in enumerate(lengths.tolist()):
        term = d_out[b] if mode == "sum" or n == 0 else d_out[b] / _divisor(mode, n)
        for t in range(pos, pos + n):
            grad[inverse[t]] = grad[inverse[t]] + term
        pos += n


def _pool_raw_backward_into(grad, lengths, inverse, d_out):
    dim = grad.shape[1]
    pos = 0
    for b, n in enumerate(lengths.tolist()):
        for j in range(min(n, d_out.shape[1])):
            grad[inverse[pos + j]] = grad[inverse[pos + j]] + d_out[b, j, :dim]
        pos += n
