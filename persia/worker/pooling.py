"""Validated entry points to the embedding worker's kernels: prefixing, de-duplication, pooling.

The layout of one slot of a batch, and the exact arithmetic of every pooling mode, are drawn in
:mod:`persia.worker.kernels`. Here each function checks its input (dtypes, shapes, ranges; cheap
checks always, the per-ID range check of ``inverse`` unless ``PERSIA_DEEP_CHECKS=0``), allocates the
output and calls the kernel. Bad input raises :class:`~persia.errors.BatchError` (or
:class:`~persia.errors.ConfigError` for a bad prefix setting) naming the field and the value.

Example: two slots of a batch of 3 samples, de-duplicated together, pooled into one buffer
(run by tests/worker/test_kernels.py)::

    >>> import numpy as np
    >>> a = np.array([7, 3, 3, 7], np.uint64)            # slot a: [[7, 3], [3], [7]]
    >>> b = np.array([7, 5], np.uint64)                  # slot b: [[], [7], [5]]
    >>> keys, seg = prefix_concat([a, b], prefixes=[1, 2], prefix_bits=12)
    >>> uniques, inverse, unique_offsets = Deduper().unique_inverse_segments(keys, seg)
    >>> inverse.tolist(), unique_offsets.tolist()        # a's 7 and b's 7 are different keys
    ([0, 1, 1, 0, 2, 3], [0, 2, 4])
    >>> rows = np.arange(8, dtype=np.float32).reshape(4, 2)   # stand-in for the store's rows
    >>> out = np.empty((3, 4), np.float32)
    >>> _ = pool_forward(np.array([2, 1, 1]), inverse[seg[0]:seg[1]], rows, "sum", out=out, col=0)
    >>> _ = pool_forward(np.array([0, 1, 1]), inverse[seg[1]:seg[2]], rows, "mean", out=out, col=2)
    >>> out.tolist()
    [[2.0, 4.0, 0.0, 0.0], [2.0, 3.0, 4.0, 5.0], [0.0, 1.0, 6.0, 7.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from persia._settings import deep_checks_enabled
from persia.errors import BatchError, ConfigError
from persia.worker import kernels as _k

__all__ = [
    "PoolingMode",
    "DEFAULT_PREFIX_BITS",
    "add_prefix",
    "prefix_concat",
    "PrefixMasks",
    "prefix_masks",
    "Deduper",
    "unique_inverse",
    "pool_forward",
    "pool_backward",
    "pool_raw_forward",
    "pool_raw_backward",
    "nonfinite_rows",
]

PoolingMode = Literal["sum", "mean", "sqrt"]

#: PERSIA's default ``feature_index_prefix_bit``.
DEFAULT_PREFIX_BITS = 12

_MODES = {"sum": _k.SUM, "mean": _k.MEAN, "sqrt": _k.SQRT}
_MAX_IDS = 2**31 - 1  # inverse is int32


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _ids(name: str, ids: np.ndarray) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        raise BatchError(f"{name} must be a numpy array of uint64, got {type(ids).__name__}")
    if ids.dtype != np.uint64:
        raise BatchError(f"{name} must have dtype uint64, got {ids.dtype}")
    if ids.ndim != 1:
        raise BatchError(f"{name} must be 1-D, got shape {ids.shape}")
    if ids.shape[0] > _MAX_IDS:
        raise BatchError(f"{name} holds {ids.shape[0]} IDs, more than {_MAX_IDS}")
    return ids


def _prefix_parts(prefix: int, prefix_bits: int) -> tuple[np.uint64, np.uint64]:
    """(high bits, low mask) of a prefix; validates both."""
    if isinstance(prefix_bits, bool) or not isinstance(prefix_bits, int | np.integer):
        raise ConfigError(f"prefix_bits must be an int, got {type(prefix_bits).__name__}")
    if not 0 <= prefix_bits < 64:
        raise ConfigError(f"prefix_bits must be in [0, 64), got {prefix_bits}")
    if isinstance(prefix, bool) or not isinstance(prefix, int | np.integer):
        raise ConfigError(f"prefix must be an int, got {type(prefix).__name__}")
    prefix = int(prefix)
    if not 0 <= prefix < (1 << prefix_bits):
        raise ConfigError(
            f"prefix must be in [0, 2**prefix_bits) = [0, {1 << prefix_bits}), got {prefix}"
        )
    low = 64 - int(prefix_bits)
    high = (prefix << low) & 0xFFFF_FFFF_FFFF_FFFF if prefix_bits else 0
    return np.uint64(high), np.uint64((1 << low) - 1)


def _lengths(lengths: np.ndarray) -> np.ndarray:
    if not isinstance(lengths, np.ndarray):
        raise BatchError(f"lengths must be a numpy integer array, got {type(lengths).__name__}")
    if lengths.ndim != 1:
        raise BatchError(f"lengths must be 1-D, got shape {lengths.shape}")
    if lengths.dtype not in (np.int32, np.int64):
        if not np.issubdtype(lengths.dtype, np.integer):
            raise BatchError(f"lengths must have an integer dtype, got {lengths.dtype}")
        lengths = lengths.astype(np.int64)
    if lengths.size and int(lengths.min()) < 0:
        raise BatchError(f"lengths must be >= 0, got {int(lengths.min())}")
    return lengths


def _inverse(inverse: np.ndarray, lengths: np.ndarray, num_rows: int) -> np.ndarray:
    if not isinstance(inverse, np.ndarray):
        raise BatchError(f"inverse must be a numpy int32 array, got {type(inverse).__name__}")
    if inverse.dtype != np.int32:
        raise BatchError(f"inverse must have dtype int32, got {inverse.dtype}")
    if inverse.ndim != 1:
        raise BatchError(f"inverse must be 1-D, got shape {inverse.shape}")
    total = int(lengths.sum(dtype=np.int64))
    if total != inverse.shape[0]:
        raise BatchError(f"sum(lengths) must equal len(inverse) = {inverse.shape[0]}, got {total}")
    if inverse.size and deep_checks_enabled():
        lo, hi = int(inverse.min()), int(inverse.max())
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            raise BatchError(f"inverse values must be in [0, {num_rows}), got {bad}")
    return inverse


def _f32(name: str, a: np.ndarray, ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise BatchError(f"{name} must be a numpy float32 array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise BatchError(f"{name} must have dtype float32, got {a.dtype}")
    if a.ndim != ndim:
        raise BatchError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def _mode(mode: str) -> int:
    code = _MODES.get(mode)  # type: ignore[call-overload]
    if code is None:
        raise BatchError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    return code


# ---------------------------------------------------------------------------------------------
# Prefixing
# ---------------------------------------------------------------------------------------------


def add_prefix(ids: np.ndarray, prefix: int, prefix_bits: int = DEFAULT_PREFIX_BITS) -> np.ndarray:
    """Keys of a slot: the prefix in the top ``prefix_bits`` bits, the ID's low bits below.

    ``key = (prefix << (64 - prefix_bits)) | (id & ((1 << (64 - prefix_bits)) - 1))``, PERSIA's
    ``feature_index_prefix_bit`` scheme. ``prefix_bits == 0`` returns the IDs unchanged (a copy).

    Args:
        ids: uint64 IDs of one slot (or feature group).
        prefix: the slot's prefix, in ``[0, 2**prefix_bits)``.
        prefix_bits: how many top bits hold the prefix, in ``[0, 64)``.

    Returns:
        A new uint64 array of keys.

    Raises:
        BatchError: ``ids`` is not a 1-D uint64 array.
        ConfigError: ``prefix`` or ``prefix_bits`` is out of range.
    """
    ids = _ids("ids", ids)
    high, low_mask = _prefix_parts(prefix, prefix_bits)
    out = np.empty(ids.shape[0], dtype=np.uint64)
    _k.add_prefix_kernel(ids, high, low_mask, out, 0)
    return out


def prefix_concat(
    ids_per_slot: Sequence[np.ndarray],
    prefixes: Sequence[int],
    prefix_bits: int = DEFAULT_PREFIX_BITS,
) -> tuple[np.ndarray, np.ndarray]:
    """The keys of several slots, prefixed and concatenated in one buffer.

    Args:
        ids_per_slot: one uint64 array of IDs per slot.
        prefixes: one prefix per slot (slots of one feature group share a prefix).
        prefix_bits: as in :func:`add_prefix`.

    Returns:
        ``(keys, seg_offsets)``: keys u64[total] and int64 offsets (length slots + 1), slot s's
        keys being ``keys[seg_offsets[s]:seg_offsets[s + 1]]``.
    """
    if len(ids_per_slot) != len(prefixes):
        raise BatchError(
            f"prefixes must have one entry per slot ({len(ids_per_slot)}), got {len(prefixes)}"
        )
    parts = [_prefix_parts(p, prefix_bits) for p in prefixes]
    arrays = [_ids(f"ids_per_slot[{s}]", a) for s, a in enumerate(ids_per_slot)]
    seg = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.shape[0] for a in arrays], out=seg[1:])
    if seg[-1] > _MAX_IDS:
        raise BatchError(f"a batch may hold at most {_MAX_IDS} IDs, got {int(seg[-1])}")
    keys = np.empty(int(seg[-1]), dtype=np.uint64)
    for s, (a, (high, low_mask)) in enumerate(zip(arrays, parts, strict=True)):
        _k.add_prefix_kernel(a, high, low_mask, keys, int(seg[s]))
    return keys, seg


class PrefixMasks:
    """The key of each of several slots' IDs, as arrays for the kernels: slot s's ID ``x`` has
    key ``highs[s] | (x & low_masks[s])`` (:func:`add_prefix`'s). Built by :func:`prefix_masks`,
    which validates the prefixes once; read-only."""

    __slots__ = ("highs", "low_masks")

    def __init__(self, highs: np.ndarray, low_masks: np.ndarray) -> None:
        self.highs = highs
        self.low_masks = low_masks
        highs.flags.writeable = False
        low_masks.flags.writeable = False


def prefix_masks(prefixes: Sequence[int], prefix_bits: int = DEFAULT_PREFIX_BITS) -> PrefixMasks:
    """The :class:`PrefixMasks` of slots with ``prefixes`` (checked as :func:`add_prefix` does)."""
    parts = [_prefix_parts(p, prefix_bits) for p in prefixes]
    highs = np.array([h for h, _ in parts], dtype=np.uint64)
    lows = np.array([m for _, m in parts], dtype=np.uint64)
    return PrefixMasks(highs, lows)


# ---------------------------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------------------------


class Deduper:
    """De-duplicates uint64 keys in one hash pass, reusing its scratch between calls.

    The scratch is an open-addressing table (a power of two long) of two parallel arrays: the
    key's index in the uniques buffer (int32, -1 = empty) and the key itself, so a probe compares
    the key in the slot it reads; plus an n-sized uniques buffer. The table is sized for the
    uniques of the last call at a load of at most 0.35 (at least 1024 slots), not for n, and
    grown (doubled, re-inserting the uniques seen so far) in the middle of a pass when it reaches
    0.7: a table that fits the caches is what makes the pass fast (measured here on 1M Zipf(1.1)
    IDs with 343k uniques: 57 M IDs/s with 2n slots, 70 M/s with 2^20, 114 M/s with 2^19), and a
    sparse one probes short chains (Criteo-shaped batches of 53k IDs with 14k uniques: 8.5 ns per
    ID at load 0.22, 11.5 at 0.43). The table is cleared after each call. Not thread-safe: use
    one per thread.
    """

    _MIN_SLOTS = 1024

    def __init__(self, expected_uniques: int = 0) -> None:
        """Create a deduper whose table fits ``expected_uniques`` keys (it grows on demand)."""
        if isinstance(expected_uniques, bool) or expected_uniques < 0:
            raise ConfigError(f"expected_uniques must be >= 0, got {expected_uniques}")
        self._last_uniques = int(expected_uniques)
        self._table = np.full(0, -1, dtype=np.int32)
        self._tkeys = np.empty(0, dtype=np.uint64)
        self._uniques = np.empty(0, dtype=np.uint64)

    @property
    def table_slots(self) -> int:
        """How many slots the scratch table holds now."""
        return self._table.shape[0]

    @staticmethod
    def _max_uniques(slots: int) -> int:
        """The most uniques a table of ``slots`` slots may hold (load <= 0.7)."""
        return slots * 7 // 10

    @staticmethod
    def _slots_for(uniques: int) -> int:
        """The smallest power of two holding ``uniques`` at load <= 0.35, >= _MIN_SLOTS."""
        slots = Deduper._MIN_SLOTS
        while Deduper._max_uniques(slots) < 2 * uniques:
            slots *= 2
        return slots

    def _new_table(self, slots: int) -> None:
        self._table = np.full(slots, -1, dtype=np.int32)
        self._tkeys = np.empty(slots, dtype=np.uint64)

    def _prepare(self, n: int) -> None:
        if self._uniques.shape[0] < n:
            self._uniques = np.empty(n, dtype=np.uint64)
        want = self._slots_for(min(n, self._last_uniques))
        have = self._table.shape[0]
        if have < want or have > 4 * want:
            self._new_table(want)

    def _grow(self, u: int) -> None:
        self._new_table(2 * self._table.shape[0])
        _k.rehash_kernel(self._uniques, u, self._tkeys, self._table, self._shift())

    def _shift(self) -> np.uint64:
        return np.uint64(64 - (self._table.shape[0].bit_length() - 1))

    def unique_inverse(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Uniques of ``keys`` in first-seen order and the inverse index.

        Returns:
            ``(uniques u64[u], inverse i32[n])`` with ``uniques[inverse] == keys``.
        """
        keys = _ids("keys", keys)
        seg = np.array([0, keys.shape[0]], dtype=np.int64)
        uniques, inverse, _ = self._run(keys, seg)
        return uniques, inverse

    def unique_inverse_segments(
        self, keys: np.ndarray, seg_offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """De-duplicate the keys of every slot of a batch at once (keys already prefixed).

        Args:
            keys: u64[n], the slots' keys concatenated (see :func:`prefix_concat`).
            seg_offsets: int64, length slots + 1, non-decreasing, from 0 to n.

        Returns:
            ``(uniques u64[u], inverse i32[n], unique_offsets i64[slots + 1])``: uniques first
            seen in slot s are ``uniques[unique_offsets[s]:unique_offsets[s + 1]]`` (a key also
            in an earlier slot of the same feature group keeps its earlier position).
        """
        keys = _ids("keys", keys)
        seg = _segments(seg_offsets, keys.shape[0])
        return self._run(keys, seg)

    def prefix_unique_inverse(
        self, ids: np.ndarray, seg_offsets: np.ndarray, masks: PrefixMasks
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`prefix_concat` then :meth:`unique_inverse`, in one pass that never writes the
        keys out: the IDs of several slots, each keyed with its own prefix, de-duplicated.

        Args:
            ids: u64[n], the slots' IDs concatenated (slot s is ``ids[seg[s]:seg[s + 1]]``).
            seg_offsets: int64, length slots + 1, non-decreasing, from 0 to n.
            masks: the slots' prefixes (:func:`prefix_masks`), one per slot.

        Returns:
            ``(uniques u64[u], inverse i32[n])``: the distinct keys in first-seen order and,
            per ID, the index of its key.
        """
        ids = _ids("ids", ids)
        seg = _segments(seg_offsets, ids.shape[0])
        if not isinstance(masks, PrefixMasks) or masks.highs.shape[0] != seg.shape[0] - 1:
            have = masks.highs.shape[0] if isinstance(masks, PrefixMasks) else type(masks).__name__
            raise BatchError(
                f"masks must be PrefixMasks of one prefix per slot ({seg.shape[0] - 1}), got {have}"
            )
        return self.prefix_unique_unchecked(ids, seg, masks)

    def prefix_unique_unchecked(
        self, ids: np.ndarray, seg: np.ndarray, masks: PrefixMasks
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`prefix_unique_inverse` of arguments the caller built and knows to be valid
        (uint64 IDs, int64 offsets from 0 to n, one prefix per slot): no checks."""
        n = ids.shape[0]
        self._prepare(n)
        inverse = np.empty(n, dtype=np.int32)
        pos, u = 0, 0
        while True:
            pos, u = _k.prefix_unique_kernel(
                ids, seg, masks.highs, masks.low_masks, pos, self._tkeys, self._table,
                self._shift(), u, self._max_uniques(self._table.shape[0]), self._uniques, inverse,
            )  # fmt: skip
            if pos >= n:
                break
            self._grow(u)
        self._table.fill(-1)
        self._last_uniques = u
        return self._uniques[:u].copy(), inverse

    def _run(self, keys: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = keys.shape[0]
        self._prepare(n)
        inverse = np.empty(n, dtype=np.int32)
        unique_offsets = np.zeros(seg.shape[0], dtype=np.int64)
        u = 0
        for s in range(seg.shape[0] - 1):
            pos, stop = int(seg[s]), int(seg[s + 1])
            while True:
                pos, u = _k.unique_inverse_kernel(
                    keys,
                    pos,
                    stop,
                    self._tkeys,
                    self._table,
                    self._shift(),
                    u,
                    self._max_uniques(self._table.shape[0]),
                    self._uniques,
                    inverse,
                )
                if pos == stop:
                    break
                self._grow(u)
            unique_offsets[s + 1] = u
        self._table.fill(-1)
        self._last_uniques = u
        return self._uniques[:u].copy(), inverse, unique_offsets


def _segments(seg_offsets: np.ndarray, n: int) -> np.ndarray:
    """``seg_offsets`` checked (1-D integers from 0 to n, non-decreasing) as int64."""
    if not isinstance(seg_offsets, np.ndarray) or seg_offsets.ndim != 1:
        raise BatchError("seg_offsets must be a 1-D numpy integer array")
    if seg_offsets.shape[0] < 1 or not np.issubdtype(seg_offsets.dtype, np.integer):
        raise BatchError(
            f"seg_offsets must be integers of length >= 1, got {seg_offsets.dtype} "
            f"of length {seg_offsets.shape[0]}"
        )
    seg = seg_offsets.astype(np.int64, copy=False)
    if int(seg[0]) != 0 or int(seg[-1]) != n:
        raise BatchError(
            f"seg_offsets must run from 0 to len(keys) = {n}, got {int(seg[0])} .. {int(seg[-1])}"
        )
    if seg.shape[0] > 1 and bool((np.diff(seg) < 0).any()):
        raise BatchError("seg_offsets must be non-decreasing")
    return seg


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniques of ``keys`` in first-seen order and the inverse index, with a fresh scratch table.

    A :class:`Deduper` kept across calls saves the table's allocation; see there.
    """
    return Deduper().unique_inverse(keys)


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def pool_forward(
    lengths: np.ndarray,
    inverse: np.ndarray,
    emb: np.ndarray,
    mode: PoolingMode = "sum",
    *,
    out: np.ndarray | None = None,
    col: int = 0,
) -> np.ndarray:
    """Pool one slot per sample (sum, mean or 1/sqrt(n) scaling) into ``out[:, col:col + dim]``.

    Args:
        lengths: IDs per sample (int32 or int64, >= 0); its length is the batch size.
        inverse: int32, one entry per ID: the row of ``emb`` holding that ID's embedding.
        emb: f32[u, dim], one row per unique key.
        mode: "sum", "mean" or "sqrt" (see :mod:`persia.worker.kernels` for the arithmetic).
        out: f32[batch, >= col + dim] to write into; allocated as (batch, dim) when None.
        col: first column of ``out`` to write.

    Returns:
        ``out``, whose columns ``col:col + dim`` are fully overwritten (zeros for empty samples).
    """
    code = _mode(mode)
    lengths = _lengths(lengths)
    emb = _f32("emb", emb, 2)
    inverse = _inverse(inverse, lengths, emb.shape[0])
    dim = emb.shape[1]
    if dim <= 0:
        raise BatchError(f"emb's dim must be > 0, got {dim}")
    batch = lengths.shape[0]
    if out is None:
        if col != 0:
            raise BatchError(f"col must be 0 when out is not given, got {col}")
        out = np.empty((batch, dim), dtype=np.float32)
    else:
        out = _f32("out", out, 2)
        _check_out_cols(out, batch, col, dim)
    acc = np.empty(dim, dtype=np.float32)
    _k.pool_forward_kernel(lengths, inverse, emb, code, out, int(col), acc)
    return out


def _check_out_cols(a: np.ndarray, batch: int, col: int, dim: int, name: str = "out") -> None:
    if a.shape[0] != batch:
        raise BatchError(f"{name} must have batch size {batch} rows, got {a.shape[0]}")
    if isinstance(col, bool) or not isinstance(col, int | np.integer) or col < 0:
        raise BatchError(f"col must be an int >= 0, got {col!r}")
    if col + dim > a.shape[1]:
        raise BatchError(
            f"{name} has {a.shape[1]} columns, too few for col {col} + dim {dim} = {col + dim}"
        )
    if name == "out" and not a.flags.writeable:
        raise BatchError("out must be writeable")


def pool_backward(
    lengths: np.ndarray,
    inverse: np.ndarray,
    d_out: np.ndarray,
    mode: PoolingMode = "sum",
    *,
    num_uniques: int | None = None,
    col: int = 0,
    dim: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One gradient per unique key from the per-sample gradients of a summed slot.

    ``grad[inverse[i]] += d_out[b, col:col + dim] * scale_b`` over every ID i of sample b, with
    ``scale_b`` 1 (sum), ``1 / n_b`` (mean) or ``1 / sqrt(n_b)`` (sqrt).

    Args:
        lengths: IDs per sample, as in :func:`pool_forward`.
        inverse: int32 row of each ID, as in :func:`pool_forward`.
        d_out: f32[batch, >= col + dim], the gradient of the pooled output (it may be the
            gradient of the whole ``(batch, total_dim)`` buffer of a batch).
        mode: the pooling mode of the forward pass.
        num_uniques: u, the number of unique rows (or give ``out``).
        col: first column of the slot in ``d_out``.
        dim: the slot's dim; default ``out.shape[1]`` if given, else ``d_out.shape[1] - col``.
        out: f32[u, dim] to add the gradients into (slots sharing uniques accumulate there);
            a zeroed array is allocated when None.

    Returns:
        The f32[u, dim] gradients (``out`` when given); rows of keys with no occurrence get
        nothing added.
    """
    code = _mode(mode)
    lengths = _lengths(lengths)
    d_out = _f32("d_out", d_out, 2)
    if dim is None:
        dim = out.shape[1] if isinstance(out, np.ndarray) and out.ndim == 2 else None
    if dim is None:
        dim = d_out.shape[1] - int(col)
    grad = _grad_out(out, num_uniques, dim)
    inverse = _inverse(inverse, lengths, grad.shape[0])
    _check_out_cols(d_out, lengths.shape[0], col, dim, name="d_out")
    term = np.empty(dim, dtype=np.float32)
    _k.pool_backward_kernel(lengths, inverse, d_out, int(col), code, grad, term)
    return grad


def _grad_out(out: np.ndarray | None, num_uniques: int | None, dim: int) -> np.ndarray:
    """The gradient array to add into: ``out`` checked, or fresh zeros."""
    if dim <= 0:
        raise BatchError(f"dim must be > 0, got {dim}")
    if out is None:
        if num_uniques is None:
            raise BatchError("give num_uniques or out, got neither")
        return np.zeros((_count("num_uniques", num_uniques), dim), dtype=np.float32)
    out = _f32("out", out, 2)
    if num_uniques is not None and _count("num_uniques", num_uniques) != out.shape[0]:
        raise BatchError(f"num_uniques must equal out.shape[0] = {out.shape[0]}, got {num_uniques}")
    if out.shape[1] != dim:
        raise BatchError(f"out must have dim {dim} columns, got {out.shape[1]}")
    if not out.flags.writeable:
        raise BatchError("out must be writeable")
    return out


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise BatchError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def pool_raw_forward(
    lengths: np.ndarray,
    inverse: np.ndarray,
    emb: np.ndarray,
    sample_fixed_size: int,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """PERSIA's non-summed layout: each sample's first ``sample_fixed_size`` rows and a mask.

    Args:
        lengths: IDs per sample, as in :func:`pool_forward`.
        inverse: int32 row of each ID, as in :func:`pool_forward`.
        emb: f32[u, dim].
        sample_fixed_size: S, the rows kept per sample (> 0).
        out: f32[batch, S, dim + 1] to write into; allocated when None.

    Returns:
        ``(out, dropped)``: ``out[b, j, :dim]`` is the j-th row of sample b for j < min(n_b, S),
        ``out[b, j, dim]`` is 1 there and 0 elsewhere, padding rows are zeros; ``dropped`` counts
        the IDs past S.
    """
    lengths = _lengths(lengths)
    emb = _f32("emb", emb, 2)
    inverse = _inverse(inverse, lengths, emb.shape[0])
    dim = emb.shape[1]
    if dim <= 0:
        raise BatchError(f"emb's dim must be > 0, got {dim}")
    size = _count("sample_fixed_size", sample_fixed_size)
    if size == 0:
        raise BatchError("sample_fixed_size must be > 0, got 0")
    shape = (lengths.shape[0], size, dim + 1)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        out = _f32("out", out, 3)
        if out.shape != shape:
            raise BatchError(f"out must have shape {shape}, got {out.shape}")
        if not out.flags.writeable:
            raise BatchError("out must be writeable")
    dropped = _k.pool_raw_forward_kernel(lengths, inverse, emb, out)
    return out, int(dropped)


def pool_raw_backward(
    lengths: np.ndarray,
    inverse: np.ndarray,
    d_out: np.ndarray,
    *,
    num_uniques: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One gradient per unique key from the gradient of a raw slot's output.

    Args:
        lengths: IDs per sample.
        inverse: int32 row of each ID.
        d_out: f32[batch, S, dim + 1]; the mask channel's gradient is ignored.
        num_uniques: u (or give ``out``).
        out: f32[u, dim] to add the gradients into; zeros are allocated when None.

    Returns:
        f32[u, dim] (``out`` when given): the sum of ``d_out[b, j, :dim]`` over the kept positions
        of each key; IDs dropped in the forward pass (past S) contribute nothing.
    """
    lengths = _lengths(lengths)
    d_out = _f32("d_out", d_out, 3)
    if d_out.shape[0] != lengths.shape[0]:
        raise BatchError(f"d_out must have batch size {lengths.shape[0]}, got {d_out.shape[0]}")
    dim = d_out.shape[2] - 1
    if dim <= 0:
        raise BatchError(f"d_out's last axis must be dim + 1 >= 2, got {d_out.shape[2]}")
    grad = _grad_out(out, num_uniques, dim)
    inverse = _inverse(inverse, lengths, grad.shape[0])
    _k.pool_raw_backward_kernel(lengths, inverse, d_out, grad)
    return grad


def nonfinite_rows(grads: np.ndarray) -> tuple[np.ndarray, int]:
    """Which unique rows have a non-finite gradient (any NaN or infinity).

    Returns:
        ``(bad bool[u], count)``. The store skips such rows too; the worker reports ``count``.
    """
    grads = _f32("grads", grads, 2)
    bad = np.empty(grads.shape[0], dtype=np.bool_)
    count = _k.mark_nonfinite_kernel(grads, bad)
    return bad, int(count)
