"""Plain-Python twins of persia's numba kernels; tests compare the kernels against these.

Store twins: the hashes, init, admission, count-min sketch, the open-addressing index with
backward-shift deletion, and ``NaiveTable`` (a dict of rows plus an OrderedDict as the LRU list)
with the batch semantics of ``persia.store.table.EmbeddingTable``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

MASK64 = (1 << 64) - 1
PROBE_SALT = 0x9E3779B97F4A7C15
SHARD_SALT = 0xD1B54A32D192ED03
INIT_SALT = 0x2545F4914F6CDD1D
ADMIT_SALT = 0xA0761D6478BD642F
SKETCH_SALT = 0xE7037ED1A0B428DB
GOLDEN = 0x9E3779B97F4A7C15


def fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK64
    return k ^ (k >> 33)


def fmix64_inverse(h: int) -> int:
    """The ``k`` with ``fmix64(k) == h`` (every step of the finaliser is invertible)."""
    h ^= h >> 33
    h = (h * pow(0xC4CEB9FE1A85EC53, -1, 1 << 64)) & MASK64
    h ^= h >> 33
    h = (h * pow(0xFF51AFD7ED558CCD, -1, 1 << 64)) & MASK64
    return h ^ (h >> 33)


def key_with_probe_hash(h: int) -> int:
    """The key whose probe hash is ``h`` (to build keys that collide in home slot and tag)."""
    return fmix64_inverse(h) ^ PROBE_SALT


def mix_sm(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def home_slot(key: int, size: int) -> int:
    """Home slot of ``key`` in an index of ``size`` (power of two) slots: the high bits."""
    return fmix64(int(key) ^ PROBE_SALT) >> (64 - (size.bit_length() - 1))


def shard_of(key: int, num_shards: int) -> int:
    h = mix_sm(int(key) ^ SHARD_SALT)
    return ((h >> 32) * num_shards) >> 32


def stream_base(key: int, seed: int, salt: int) -> int:
    return mix_sm(mix_sm(int(key) ^ salt) ^ ((seed * GOLDEN) & MASK64))


def stream_uniform(base: int, j: int) -> float:
    h = mix_sm((base + (j + 1) * GOLDEN) & MASK64)
    return (h >> 11) * 2.0**-53


def init_row(key: int, seed: int, dim: int, kind: str, a: float, b: float) -> np.ndarray:
    """Initial vector of ``key``: kind "uniform" (a=low, b=high) or "normal" (a=mean, b=std)."""
    base = stream_base(key, seed, INIT_SALT)
    out = np.empty(dim, dtype=np.float32)
    for j in range(dim):
        if kind == "uniform":
            out[j] = a + (b - a) * stream_uniform(base, j)
        else:
            u1 = 1.0 - stream_uniform(base, 2 * j)
            u2 = stream_uniform(base, 2 * j + 1)
            out[j] = a + b * (math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return out


def admit_draw(key: int, seed: int, count: int) -> float:
    return stream_uniform(stream_base(key, seed, ADMIT_SALT), count)


class NaiveSketch:
    """Count-min sketch of uint32 counters (saturating)."""

    def __init__(self, depth: int, width: int) -> None:
        self.counts = np.zeros((depth, width), dtype=np.int64)

    def add(self, key: int) -> int:
        depth, width = self.counts.shape
        est = 1 << 62
        for d in range(depth):
            h = mix_sm(int(key) ^ ((SKETCH_SALT + d * GOLDEN) & MASK64)) & (width - 1)
            if self.counts[d, h] < 0xFFFFFFFF:
                self.counts[d, h] += 1
            est = min(est, int(self.counts[d, h]))
        return est


EMPTY = MASK64  # an empty index slot


def entry(key: int, row: int) -> int:
    """Index entry of ``key`` in ``row``: the low 32 bits of its probe hash, then the row."""
    return ((fmix64(int(key) ^ PROBE_SALT) & 0xFFFFFFFF) << 32) | row


class NaiveIndex:
    """Linear-probing index of entries ``tag << 32 | row`` (``EMPTY`` = empty) keyed through
    ``row_keys``; compares keys only (the tags are a speed-up of the kernels, not a semantic)."""

    def __init__(self, size: int) -> None:
        self.slots = [EMPTY] * size
        self.size = size

    def _row(self, s: int) -> int:
        return -1 if self.slots[s] == EMPTY else self.slots[s] & 0xFFFFFFFF

    def find(self, row_keys: Any, key: int) -> int:
        s = home_slot(key, self.size)
        while self._row(s) >= 0:
            if int(row_keys[self._row(s)]) == int(key):
                return self._row(s)
            s = (s + 1) % self.size
        return -1

    def insert(self, key: int, row: int) -> None:
        s = home_slot(key, self.size)
        while self._row(s) >= 0:
            s = (s + 1) % self.size
        self.slots[s] = entry(key, row)

    def delete(self, row_keys: Any, key: int) -> None:
        """Backward-shift deletion of ``key``."""
        s = home_slot(key, self.size)
        while int(row_keys[self._row(s)]) != int(key):
            s = (s + 1) % self.size
        hole, k = s, s
        while True:
            k = (k + 1) % self.size
            r = self._row(k)
            if r < 0:
                break
            home = home_slot(int(row_keys[r]), self.size)
            dist_home = (k - home) % self.size
            dist_hole = (k - hole) % self.size
            if dist_home >= dist_hole:  # home at or before the hole: may move back
                self.slots[hole] = self.slots[k]
                hole = k
        self.slots[hole] = EMPTY


class NaiveSGD:
    """Plain SGD (no state) with the optimizer contract of docs/CONTRACTS.md, in numpy."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr

    def state_width(self, dim: int) -> int:
        return 0

    def initial_state(self, dim: int) -> np.ndarray:
        return np.zeros(0, dtype=np.float32)

    def apply(
        self,
        values: np.ndarray,
        state: np.ndarray,
        rows: np.ndarray,
        grads: np.ndarray,
        weight_bound: float,
    ) -> np.ndarray:
        counts = np.zeros(3, dtype=np.int64)
        for i, r in enumerate(rows):
            if r < 0:
                counts[1] += 1
            elif not np.isfinite(grads[i]).all():
                counts[2] += 1
            else:
                values[r] -= np.float32(self.lr) * grads[i]
                if 0 < weight_bound < math.inf:
                    np.clip(values[r], -weight_bound, weight_bound, out=values[r])
                counts[0] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"type": "NaiveSGD", "lr": self.lr}


class NaiveTable:
    """Twin of ``EmbeddingTable``: a dict key -> [values, state] and an OrderedDict LRU.

    Training lookup of a batch: keys present before the batch are refreshed in batch order;
    then the missing ones are created (if admitted) in batch order, each evicting the oldest key at
    capacity.
    """

    def __init__(
        self,
        dim: int,
        capacity: int,
        optimizer: Any,
        init: tuple[str, float, float] = ("uniform", -0.01, 0.01),
        seed: int = 0,
        probability: float = 1.0,
        min_count: int = 0,
        sketch_shape: tuple[int, int] = (4, 1 << 18),
        weight_bound: float = 10.0,
    ) -> None:
        self.dim, self.capacity, self.optimizer = dim, capacity, optimizer
        self.init, self.seed = init, seed
        self.probability, self.min_count = probability, min_count
        self.use_sketch = probability < 1.0 or min_count > 1
        self.sketch = NaiveSketch(*sketch_shape)
        self.weight_bound = weight_bound
        self.rows: dict[int, list[np.ndarray]] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.counts = dict(evictions=0, misses=0, admissions=0, rejections=0)

    def lookup(self, keys: np.ndarray, training: bool) -> np.ndarray:
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        present = [int(k) in self.rows for k in keys]
        for i, k in enumerate(keys):
            if present[i]:
                out[i] = self.rows[int(k)][0]
                if training:
                    self.lru.move_to_end(int(k))
            elif not training:
                self.counts["misses"] += 1
        if not training:
            return out
        for i, k in enumerate(keys):
            k = int(k)
            if present[i]:
                continue
            if k in self.rows:
                out[i] = self.rows[k][0]
                self.lru.move_to_end(k)
                continue
            self.counts["misses"] += 1
            if self.use_sketch:
                c = self.sketch.add(k)
                admitted = c >= self.min_count and admit_draw(k, self.seed, c) < self.probability
            else:
                admitted = True
            if not admitted:
                self.counts["rejections"] += 1
                continue
            self.counts["admissions"] += 1
            if len(self.rows) >= self.capacity:
                old, _ = self.lru.popitem(last=False)
                del self.rows[old]
                self.counts["evictions"] += 1
            vec = init_row(k, self.seed, self.dim, *self.init)
            self.rows[k] = [vec, self.optimizer.initial_state(self.dim).copy()]
            self.lru[k] = None
            out[i] = vec
        return out

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Apply per row through the optimizer on a 1-row scratch array."""
        total = np.zeros(3, dtype=np.int64)
        for i, k in enumerate(keys):
            row = self.rows.get(int(k))
            if row is None:
                total[1] += 1
                continue
            values = row[0][None, :].copy()
            state = row[1][None, :].copy()
            c = self.optimizer.apply(
                values, state, np.zeros(1, np.int32), grads[i : i + 1], self.weight_bound
            )
            row[0], row[1] = values[0], state[0]
            total += c
        return total

    def set_capacity(self, capacity: int) -> None:
        while len(self.rows) > capacity:
            old, _ = self.lru.popitem(last=False)
            del self.rows[old]
            self.counts["evictions"] += 1
        self.capacity = capacity

    def export_rows(self) -> dict[str, np.ndarray]:
        keys = list(self.lru)
        width = self.optimizer.state_width(self.dim)
        return {
            "keys": np.array(keys, dtype=np.uint64),
            "values": np.array([self.rows[k][0] for k in keys], np.float32).reshape(
                len(keys), self.dim
            ),
            "state": np.array([self.rows[k][1] for k in keys], np.float32).reshape(
                len(keys), width
            ),
        }


def lru_relink_each(prev: list[int], nxt: list[int], head: int, tail: int, touched: list[int],
                    linked: set[int]) -> tuple[list[int], list[int], int, int]:  # fmt: skip
    """Twin of ``lru_flush_kernel``: relink each touched row at its touch, in order (a row not
    in ``linked`` is appended, then linked). Returns the new (prev, next, head, tail)."""
    prev, nxt = list(prev), list(nxt)
    for r in touched:
        if r in linked:
            if r == tail:
                continue
            p, n = prev[r], nxt[r]
            if p >= 0:
                nxt[p] = n
            else:
                head = n
            if n >= 0:
                prev[n] = p
            else:
                tail = p
        linked.add(r)
        prev[r], nxt[r] = tail, -1
        if tail >= 0:
            nxt[tail] = r
        else:
            head = r
        tail = r
    return prev, nxt, head, tail


# ------------------------------------------------------------------------- half-precision rows
# Twins of persia.store.kernels.half: numpy's own float16 conversion, bfloat16 by integer
# arithmetic on the float32 bits, and the stochastic rounding's random stream.

HALF_STORAGE = {"float16": np.float16, "bfloat16": np.uint16}


def half_encode(x: np.ndarray, row_dtype: str) -> np.ndarray:
    """float32 -> the stored half rows, round to nearest, ties to even."""
    x = np.asarray(x, dtype=np.float32)
    if row_dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    f = x.view(np.uint32).astype(np.uint64)
    return ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)


def half_decode(h: np.ndarray) -> np.ndarray:
    """Stored half rows -> float32 (exact)."""
    if h.dtype == np.float16:
        return h.astype(np.float32)
    return (h.astype(np.uint32) << 16).view(np.float32)


def sr_random_bits(seed: int, count: int) -> np.ndarray:
    """``mix_sm(seed + (e + 1) * GOLDEN)`` for e = 0 .. count - 1 (uint64)."""
    e = np.arange(1, count + 1, dtype=np.uint64)
    z = np.uint64(seed) + e * np.uint64(GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def half_encode_stochastic(x: np.ndarray, row_dtype: str, rnd: np.ndarray) -> np.ndarray:
    """float32 (finite, |x| < 65504 for float16) -> stored half rows, stochastic rounding with
    the 64 random bits ``rnd`` of each element (the kernel's bit usage)."""
    x = np.asarray(x, dtype=np.float32)
    f = x.view(np.uint32).astype(np.uint64)
    if row_dtype == "bfloat16":
        return ((f + (rnd >> np.uint64(48))) >> 16).astype(np.uint16)
    sign = (f >> 16) & 0x8000
    a = f & 0x7FFFFFFF
    normal = (a - 0x38000000 + (rnd >> np.uint64(51))) >> 13
    m = np.abs(x).astype(np.float64) * 2.0**24
    lo = np.floor(m)
    up = (rnd >> np.uint64(11)).astype(np.float64) * 2.0**-53 < (m - lo)
    sub = lo.astype(np.uint64) + up.astype(np.uint64)
    out = np.where(a < 0x38800000, sub, normal) | sign
    return out.astype(np.uint16).view(np.float16)


def half_apply(
    opt_apply,
    values: np.ndarray,
    state: np.ndarray,
    rows: np.ndarray,
    grads: np.ndarray,
    bound: float,
    stochastic_seed: int | None = None,
) -> np.ndarray:
    """The update of half rows: the distinct rows (first seen order) widened, ``opt_apply`` on
    the float32 block (a row listed twice updated twice), rounded back in place."""
    uniq: list[int] = []
    where: dict[int, int] = {}
    local = np.empty(len(rows), dtype=np.int32)
    for i, r in enumerate(rows.tolist()):
        if r < 0:
            local[i] = -1
            continue
        if r not in where:
            where[r] = len(uniq)
            uniq.append(r)
        local[i] = where[r]
    u = np.array(uniq, dtype=np.int64)
    block = half_decode(values[u])
    sblock = state[u].copy()
    counts = opt_apply(block, sblock, local, grads, bound)
    state[u] = sblock
    row_dtype = "float16" if values.dtype == np.float16 else "bfloat16"
    if stochastic_seed is None:
        values[u] = half_encode(block, row_dtype)
    else:
        rnd = sr_random_bits(stochastic_seed, block.size).reshape(block.shape)
        values[u] = half_encode_stochastic(block, row_dtype, rnd).view(values.dtype)
    return counts
