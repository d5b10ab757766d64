"""One embedding table: uint64 keys -> rows of one dim, with LRU eviction, init and admission.

Layout (all plain numpy arrays, so a table pickles and saves without tricks)::

    index     u64[S]         open addressing, linear probing, S a power of two; an entry is
                             tag << 32 | row (tag: 32 bits of the key's hash), all ones = empty
    row_keys  u64[R]         key of each live row (rows 0 .. nrows-1 are live)
    values    f32[R, dim]    embeddings (f16[R, dim] with row_dtype float16; u16[R, dim], the
                             bfloat16 bit patterns, with row_dtype bfloat16)
    state     f32[R, W]      optimizer state (W = optimizer.state_width(dim))
    lru_prev  i32[R]         LRU links: oldest (head) ... newest (tail)
    lru_next  i32[R]
    lru_ts    i64[R]         the same bytes as the links, read as the time of each row's last
                             touch while the LRU is held as stamps (fast training lookups, see
                             persia.store.kernels.table)

``row_keys``, ``lru_prev`` and ``lru_next`` are strided views of one array of 16-byte records
(key, prev, next), so the cache line a probe reads to compare a key also holds the row's links; a
training lookup's relink then costs only its two neighbours' lines. Every array starts on a 64-byte
boundary, so a 64-byte row (dim 16 float32) is one cache line, not two. Both are layout only:
pickling or saving copies each array into a plain contiguous one, and the table works the same.

The arrays start small and grow by 1.5x (never beyond ``capacity`` rows); the index keeps
``S >= R / 0.7`` slots (load factor <= 0.7: the tags make a probe read ``row_keys`` only for a
likely match, so a fuller index costs little; at dim 16 with Adagrad that is 144 bytes of rows and
links plus 11.4-22.9 bytes of index per row). At capacity a new key takes the
row of the least recently used key, which is deleted from the index by backward-shift deletion.

**Row dtype** (``row_dtype``): rows are stored as float32 (the default), float16 or bfloat16;
the optimizer state stays float32. Lookups return float32 (a half value widens exactly); an
update widens the rows it touches to float32, runs the optimizer's float32 update and rounds
them back, to nearest even or stochastically (``rounding``; see persia.store.kernels.half). At dim
16 with row-wise Adagrad a float16 row costs 32 + 4 bytes of values and state, 16 of key and
links and 11.4-22.9 of index: 3.9-4.8 bytes per parameter. :meth:`export_rows` gives the values in
the stored dtype (bit for bit); :meth:`import_rows` takes float32 (rounded to nearest even) or
rows of another row dtype (converted: :func:`decode_rows` says how).

A table is not locked: ``persia.store.shard.Shard`` holds the lock.

Disk tier (:meth:`EmbeddingTable.attach_tier`, ``persia.store.disk``): rows that leave RAM at
capacity are written to disk with their state instead of being dropped. The hooks sit before the
kernels, which stay as they are: a training lookup (or an import) first makes room by spilling the
oldest RAM rows that it does not touch, then brings the keys it finds on disk back into RAM (their
disk records are freed), so the kernels never evict and a key on disk is never new to admission;
an evaluation lookup reads a disk row without moving it; a gradient for a disk row is applied on
disk; a snapshot (checkpoint) holds the disk rows as the oldest.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from persia.embedding.spec import ROW_DTYPES, ROW_ROUNDINGS
from persia.errors import StoreError
from persia.logger import get_default_logger, get_logger, warn_once
from persia.store.config import Admission, Init, Normal, Uniform
from persia.store.kernels import half as H
from persia.store.kernels import table as K

if TYPE_CHECKING:
    from persia.store.disk import DiskTier

__all__ = [
    "EmbeddingTable",
    "Optimizer",
    "check_keys",
    "check_grads",
    "ROW_DTYPES",
    "ROUNDINGS",
    "check_row_dtype",
    "row_dtype_of",
    "decode_rows",
    "encode_rows",
]

#: Row storage dtypes, the default first; how an update rounds half rows back.
ROUNDINGS = ROW_ROUNDINGS
#: The numpy dtype a table stores each row dtype in (numpy has no bfloat16: its bit patterns).
_STORAGE: dict[str, np.dtype[Any]] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
            "bfloat16": np.dtype(np.uint16)}  # fmt: skip
_NAME_OF = {dt: name for name, dt in _STORAGE.items()}


def check_row_dtype(value: Any, field: str = "row_dtype") -> str:
    """``value`` as one of :data:`ROW_DTYPES`, or ``StoreError`` naming ``field``."""
    if not isinstance(value, str) or value not in ROW_DTYPES:
        raise StoreError(f"{field} must be one of {', '.join(ROW_DTYPES)}, got {value!r}")
    return value


def row_dtype_of(values: np.ndarray) -> str:
    """The row dtype an array of stored rows holds: float32, float16, or bfloat16 (uint16 bit
    patterns, the only 16-bit integer rows); ``StoreError`` for any other dtype."""
    name = _NAME_OF.get(values.dtype)
    if name is None:
        raise StoreError(
            f"values must be float32, float16 or uint16 (bfloat16 bits), got {values.dtype}"
        )
    return name


def decode_rows(values: np.ndarray) -> np.ndarray:
    """Stored rows (float32, float16, or uint16 bfloat16 bits) as float32 (exact)."""
    name = row_dtype_of(values)
    if name == "float32":
        return values
    if name == "float16":
        return values.astype(np.float32)
    return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_rows(values: np.ndarray, row_dtype: str) -> np.ndarray:
    """float32 rows in the storage of ``row_dtype`` (round to nearest, ties to even)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if row_dtype == "float32":
        return values
    out: np.ndarray = np.empty(values.shape, dtype=_STORAGE[row_dtype])
    if values.size:
        flat = values.reshape(values.shape[0], -1)
        H.narrow_kernel(flat, _kernel_view(out).reshape(flat.shape))
    return out


def _kernel_view(values: np.ndarray) -> np.ndarray:
    """The rows as the kernels take them: float32 as they are, float16 as int16 bit patterns,
    bfloat16 as the uint16 ones (see persia.store.kernels.half)."""
    if values.dtype == np.float16:
        return values.view(np.int16)
    return values


_log = get_logger("persia.store.table")

_MAX_LOAD = 0.7
_MIN_ALLOC = 16
#: how many stamped spills ``rows_kept_below`` can look back on
_SPILL_LOG = 64
_MAX_ROWS = 2**31 - 1


class Optimizer(Protocol):
    """What a table needs from an optimizer (see docs/CONTRACTS.md)."""

    def state_width(self, dim: int) -> int: ...

    def initial_state(self, dim: int) -> np.ndarray: ...

    def apply(
        self,
        values: np.ndarray,
        state: np.ndarray,
        rows: np.ndarray,
        grads: np.ndarray,
        weight_bound: float,
    ) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


def check_keys(keys: Any, field: str = "keys") -> np.ndarray:
    """``keys`` as a 1-D C-contiguous uint64 array, or ``StoreError``.

    Other integer dtypes are converted when that is exact (no negative values).
    """
    if not isinstance(keys, np.ndarray):
        raise StoreError(f"{field} must be a numpy array of uint64, got {type(keys).__name__}")
    if keys.ndim != 1:
        raise StoreError(f"{field} must be 1-D, got shape {keys.shape}")
    if keys.dtype == np.uint64:
        return np.ascontiguousarray(keys)
    if keys.dtype.kind == "u":
        return keys.astype(np.uint64)
    if keys.dtype.kind == "i":
        if keys.size and int(keys.min()) < 0:
            raise StoreError(
                f"{field} must be uint64 (or non-negative integers), got dtype {keys.dtype} "
                f"with negative value {int(keys.min())}"
            )
        return keys.astype(np.uint64)
    raise StoreError(f"{field} must have dtype uint64, got {keys.dtype}")


def check_grads(grads: Any, n: int, dim: int, field: str = "grads") -> np.ndarray:
    """``grads`` as a C-contiguous float32 ``(n, dim)`` array, or ``StoreError``."""
    if not isinstance(grads, np.ndarray):
        raise StoreError(f"{field} must be a numpy array of float32, got {type(grads).__name__}")
    if grads.dtype.kind != "f":
        raise StoreError(f"{field} must have dtype float32, got {grads.dtype}")
    if grads.ndim != 2 or grads.shape != (n, dim):
        raise StoreError(f"{field} must have shape ({n}, {dim}) (keys x dim), got {grads.shape}")
    return np.ascontiguousarray(grads, dtype=np.float32)


def check_positive_int(value: Any, field: str) -> int:
    """``value`` as an int > 0, or ``StoreError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise StoreError(f"{field} must be an int > 0, got {value!r}")
    return int(value)


#: row arrays start on a cache-line boundary: a 64-byte row (dim 16 float32) then spans one cache
#: line, not two (numpy's own large allocations start 16 bytes past one)
_ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary.

    A plain numpy array (a view into a slightly larger byte buffer), so it pickles and saves like
    any other; a copy made by pickle or ``np.load`` is not necessarily aligned (only slower)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    buf = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    return buf[off : off + nbytes].view(dt).reshape(shape)


def aligned_full(shape: tuple[int, ...], fill: Any, dtype: Any) -> np.ndarray:
    """``aligned_empty`` filled with ``fill`` (every page touched)."""
    out = aligned_empty(shape, dtype)
    out.fill(fill)
    return out


def _index_size(alloc: int) -> int:
    need = max(16, int(np.ceil(alloc / _MAX_LOAD)))
    return 1 << (need - 1).bit_length()


class EmbeddingTable:
    """Rows of one dim for uint64 keys, bounded by ``capacity`` rows (LRU eviction past it).

    Args:
        dim: embedding dim (> 0).
        capacity: the most rows the table holds (> 0, < 2**31).
        optimizer: supplies the per-row state width, a new row's state and the update.
        init: how a new row's values are drawn (from (key, seed) only).
        admission: which missed keys a training lookup creates.
        seed: seed of init and admission draws.
        weight_bound: passed to ``optimizer.apply`` (<= 0 or inf: no clipping).
        row_dtype: how rows are stored: float32, float16 or bfloat16 (see the module docstring).
        rounding: how updates round half-precision rows: nearest (even) or stochastic.
    """

    values: np.ndarray
    state: np.ndarray
    row_keys: np.ndarray
    lru_prev: np.ndarray
    lru_next: np.ndarray
    lru_ts: np.ndarray
    _records: np.ndarray
    index: np.ndarray
    #: rows evicted from RAM go here (``attach_tier``); None: they are dropped
    tier: DiskTier | None = None
    #: with a tier: the rows chosen to spill next and where the spills are in them
    #: (``_spill_stamped``)
    _spill_queue: np.ndarray
    _spill_pos: int

    def __init__(
        self,
        dim: int,
        capacity: int,
        optimizer: Optimizer,
        init: Init | None = None,
        admission: Admission | None = None,
        seed: int = 0,
        weight_bound: float = 10.0,
        row_dtype: str = "float32",
        rounding: str = "nearest",
    ) -> None:
        self.dim = check_positive_int(dim, "dim")
        self.row_dtype = check_row_dtype(row_dtype)
        if not isinstance(rounding, str) or rounding not in ROUNDINGS:
            raise StoreError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        self.rounding = rounding
        self._updates = 0  # calls of apply_rows on half rows: the stochastic rounding's stream
        self.capacity = check_positive_int(capacity, "capacity")
        if self.capacity > _MAX_ROWS:
            raise StoreError(f"capacity must be < 2**31 rows, got {capacity}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise StoreError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.init: Init = init if init is not None else Uniform(-0.01, 0.01)
        if not isinstance(self.init, (Uniform, Normal)):
            raise StoreError(f"init must be Uniform or Normal, got {type(self.init).__name__}")
        self.admission = admission if admission is not None else Admission()
        if not isinstance(self.admission, Admission):
            raise StoreError(f"admission must be an Admission, got {type(admission).__name__}")
        self.optimizer = optimizer
        self.weight_bound = float(weight_bound)
        self.state_width = int(optimizer.state_width(self.dim))
        init_state = np.ascontiguousarray(optimizer.initial_state(self.dim), dtype=np.float32)
        if init_state.shape != (self.state_width,):
            raise StoreError(
                f"optimizer.initial_state({self.dim}) must have shape ({self.state_width},), "
                f"got {init_state.shape}"
            )
        self._init_state = init_state
        if isinstance(self.init, Uniform):
            self._init_args = (K.INIT_UNIFORM, float(self.init.low), float(self.init.high))
        else:
            self._init_args = (K.INIT_NORMAL, float(self.init.mean), float(self.init.std))
        adm = self.admission
        self._use_sketch = adm.uses_sketch
        shape = (adm.sketch_depth, adm.sketch_width) if self._use_sketch else (1, 1)
        self._sketch = np.zeros(shape, dtype=np.uint32)
        self.meta = np.zeros(K.META_LEN, dtype=np.int64)
        self.meta[K.M_HEAD] = -1
        self.meta[K.M_TAIL] = -1
        self.skipped_absent = 0
        self.skipped_nonfinite = 0
        self.applied = 0
        #: changes when rows move in a way the eviction count and the spill log do not tell
        #: (a removal) or the stamps are renumbered (see ``rows_kept_below``)
        self.layout = 0
        #: the latest stamped spills: ``(evictions before, evictions after, rows left, newest
        #: stamp spilled)`` each
        self._spill_log: collections.deque[tuple[int, int, int, int]] = collections.deque(
            maxlen=_SPILL_LOG
        )
        #: rows a stamped spill left empty, for the lookup that spilled to make its rows in
        #: (``[:meta[M_HOLES]]``; none outside that lookup)
        self._holes = np.zeros(0, dtype=np.int32)
        self._alloc(min(self.capacity, _MIN_ALLOC))

    # ----------------------------------------------------------------------------- storage
    def _alloc(self, rows: int) -> None:
        self.values = aligned_full((rows, self.dim), 0, _STORAGE[self.row_dtype])
        self.state = aligned_full((rows, self.state_width), 0, np.float32)
        self._set_records(rows, 0)
        self.lru_prev.fill(-1)
        self.lru_next.fill(-1)
        self._set_index(_index_size(rows))

    def flush_lru(self) -> None:
        """The LRU in its linked form (from the stamps the fast training lookups left, when it
        is held as stamps): what every operation but the fast training lookup works on."""
        if self.meta[K.M_STAMPED]:
            clock = int(self.meta[K.M_CLOCK])
            if clock <= 4 * self.rows + 1024:  # a slot per stamp: less memory than a sort
                K.lru_link_stamps_kernel(
                    self.lru_ts, self.rows, clock, self.lru_prev, self.lru_next, self.meta
                )
            else:
                order = np.argsort(self.lru_ts[: self.rows], kind="stable").astype(np.int32)
                K.lru_link_kernel(order, self.lru_prev, self.lru_next, self.meta)

    def _stamp_lru(self) -> None:
        """The LRU in its stamped form (what the fast training lookup works on)."""
        if not self.meta[K.M_STAMPED]:
            if self.tier is not None:  # the only way back to stamps: renumbered from here
                self._drop_spill_queue()
            self.layout += 1  # the spill log's stamps are no longer comparable
            K.lru_stamp_kernel(self.lru_next, self.lru_ts, self.meta)

    def _set_records(self, rows: int, keep: int) -> None:
        """Allocate ``row_keys``, ``lru_prev`` and ``lru_next`` for ``rows`` rows as views of one
        16-byte record per row (key, prev, next), copying the first ``keep`` rows.

        One record shares a cache line with the key the probe compares, so a training lookup's
        relink finds the row's own links in a line it has already read."""
        rec = aligned_empty((rows, 2), np.uint64)
        rec[keep:] = 0  # touch the pages now, not on the hot path
        links = rec.view(np.int32)
        row_keys, lru_prev, lru_next = rec[:, 0], links[:, 2], links[:, 3]
        if keep:  # the records' bytes: the links or the stamps, whichever form the LRU is in
            rec[:keep] = self._records[:keep]
        self._records = rec
        self.row_keys, self.lru_prev, self.lru_next = row_keys, lru_prev, lru_next
        self.lru_ts = rec[:, 1].view(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        # the records once, not their four views (a pickle would copy each view apart and the
        # stamps would no longer share the links' bytes)
        state = dict(self.__dict__)
        for view in ("row_keys", "lru_prev", "lru_next", "lru_ts"):
            state.pop(view, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        records = self._records
        rec = aligned_empty(records.shape, np.uint64)
        rec[:] = records
        self._records = rec
        links = rec.view(np.int32)
        self.row_keys, self.lru_prev, self.lru_next = rec[:, 0], links[:, 2], links[:, 3]
        self.lru_ts = rec[:, 1].view(np.int64)

    def _set_index(self, size: int) -> None:
        self.index = aligned_full((size,), K.EMPTY, np.uint64)
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        K.rebuild_index_kernel(self.index, self._shift, self.row_keys, int(self.meta[K.M_NROWS]))

    def _resize(self, rows: int) -> None:
        """Reallocate the row arrays to ``rows`` (>= nrows) and rebuild the index if its size
        changes."""
        n = self.rows
        self._set_records(rows, n)
        for name in ("values", "state"):
            old = getattr(self, name)
            new = aligned_empty((rows,) + old.shape[1:], old.dtype)
            new[:n] = old[:n]
            new[n:] = 0  # touch the pages now, not on the hot path
            setattr(self, name, new)
        size = _index_size(rows)
        if size != self.index.shape[0]:
            self._set_index(size)

    def _grow(self) -> None:
        alloc = self.values.shape[0]
        self._resize(min(self.capacity, max(alloc + 1, (alloc * 3 + 1) // 2)))

    def reserve(self, rows: int) -> None:
        """Allocate room for ``min(rows, capacity)`` rows now (no growth until then); with a
        disk tier, the rows past the capacity are reserved on disk (its index)."""
        rows = check_positive_int(rows, "rows")
        if self.tier is not None and rows > self.capacity:
            self.tier.reserve(rows - self.capacity)
        rows = min(rows, self.capacity)
        if rows > self.values.shape[0]:
            self._resize(rows)

    def set_capacity(self, capacity: int) -> None:
        """Change the capacity; shrinking evicts the least recently used rows beyond it."""
        capacity = check_positive_int(capacity, "capacity")
        if capacity > _MAX_ROWS:
            raise StoreError(f"capacity must be < 2**31 rows, got {capacity}")
        self.flush_lru()
        if self.tier is not None and self.rows > capacity:
            self._spill(self.rows - capacity, np.zeros(0, dtype=np.uint64))
        if self.rows > capacity:
            K.evict_oldest_kernel(
                self.rows - capacity, self.index, self._shift, self.row_keys, self._kv,
                self.state, self.lru_prev, self.lru_next, self.meta,
            )  # fmt: skip
        self.capacity = capacity
        if self.values.shape[0] > capacity:
            self._resize(capacity)

    @property
    def _kv(self) -> np.ndarray:
        """``values`` as the kernels take it (see persia.store.kernels.half)."""
        return _kernel_view(self.values)

    @property
    def rows(self) -> int:
        """Live rows."""
        return int(self.meta[K.M_NROWS] - self.meta[K.M_HOLES])

    @property
    def _top(self) -> int:
        """Rows in use, holes included (a bound on row numbers): :attr:`rows` but during a
        training lookup that spilled (see :meth:`_spill_rows`)."""
        return int(self.meta[K.M_NROWS])

    @property
    def bytes_used(self) -> int:
        """Bytes of every array the table holds (rows, index, links, touch log, sketch)."""
        arrays = (self.values, self.state, self.row_keys, self.lru_prev, self.lru_next)
        return sum(a.nbytes for a in arrays) + self.index.nbytes + self._sketch.nbytes

    # ----------------------------------------------------------------------------- operations
    def probe(self, keys: np.ndarray) -> np.ndarray:
        """Row numbers (i32, -1 = absent) of already checked uint64 ``keys``; changes nothing."""
        rows = np.empty(keys.shape[0], dtype=np.int32)
        K.probe_kernel(self.index, self._shift, self.row_keys, keys, rows)
        return rows

    def recheck(self, keys: np.ndarray, rows: np.ndarray, low: int = 0) -> np.ndarray:
        """Rows of checked ``keys`` (i32, -1 = absent from RAM) given where they were
        (``rows``, e.g. a lookup's before evictions moved some): a row that still holds its key
        is kept, the others are probed again. Rows below ``low`` are known to hold theirs
        (:meth:`rows_kept_below`) and are kept unread."""
        out = np.empty(keys.shape[0], dtype=np.int32)
        K.recheck_rows_kernel(
            self.index, self._shift, self.row_keys, self.rows, keys, rows, out, low
        )  # fmt: skip
        return out

    @property
    def clock(self) -> int:
        """The stamp the next touched row gets (stamped LRU)."""
        return int(self.meta[K.M_CLOCK])

    def rows_kept_below(self, evictions: int, layout: int, clock: int) -> int:
        """A row bound for a training lookup's rows: every row below it still holds the key it
        held when the lookup left the table at ``evictions`` and ``layout``, given that the
        lookup stamped its rows ``clock`` or later (0: nothing known). Known when every eviction
        since was a stamped spill (:meth:`_spill_rows`, logged) of rows stamped before
        ``clock`` (so none of the lookup's rows left): a spill moves no row, and the filling of
        the holes it leaves (:meth:`_fill_holes`, logged) only rows from the top, at or above
        the rows it leaves."""
        now = self.evictions
        if layout != self.layout or now < evictions:
            return 0
        if now == evictions:
            return self._top
        low = self._top
        for before, after, left, newest in reversed(self._spill_log):
            if after != now or newest >= clock:
                return 0
            low = min(low, left)
            now = before
            if now <= evictions:
                return low if now == evictions else 0
        return 0  # the log does not reach back to the lookup

    def lookup(self, keys: Any, training: bool) -> np.ndarray:
        """Rows of ``keys`` as ``f32[n, dim]``.

        Training: found keys become the newest (in batch order), then missing keys are created if
        admitted (in batch order; at capacity each evicts the oldest row). Evaluation: nothing
        changes; absent keys read zeros. Not admitted keys read zeros too.
        """
        keys = check_keys(keys)
        if training:
            return self.train_lookup_probed(keys)
        return self.eval_lookup(keys)[0]

    def eval_lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Evaluation lookup of checked ``keys``: ``(out f32[n, dim], rows i32[n], missing)``."""
        out = np.empty((keys.shape[0], self.dim), dtype=np.float32)
        rows = np.empty(keys.shape[0], dtype=np.int32)
        missing = int(
            K.lookup_eval_kernel(self.index, self._shift, self.row_keys, self._kv, keys, rows, out)
        )
        self.meta[K.M_MISSES] += missing
        if missing and self.tier is not None and self.tier.rows:
            absent = np.flatnonzero(rows < 0)
            recs = self.tier.find(keys[absent])
            on = recs >= 0
            if on.any():
                out[absent[on]] = decode_rows(self.tier.read(recs[on])[0])
        return out, rows, missing

    def train_lookup(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Training lookup of checked ``keys`` whose rows ``probe`` just gave (the shard checks
        the misses between the two calls). ``rows`` is used as scratch."""
        if self.tier is not None and self._tier_before_train(keys):
            rows = self.probe(keys)  # spilling moved rows
        out = np.empty((keys.shape[0], self.dim), dtype=np.float32)
        self.flush_lru()
        K.train_hits_kernel(self._kv, rows, out, self.lru_prev, self.lru_next, self.meta)
        self._train_misses(keys, rows, out)
        return out

    def train_lookup_probed(self, keys: np.ndarray) -> np.ndarray:
        """See :meth:`train_lookup_rows`; the values only."""
        return self.train_lookup_rows(keys)[0]

    def train_lookup_rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Training lookup of checked ``keys``, probing and refreshing the hits in one kernel
        (for a table whose misses need no check against other dims: same result as ``probe``
        then ``train_lookup``). When the arrays have room for every key and admission admits
        every key, missing keys get their rows and index slots in that same kernel, while their
        probe chains are cached, and are linked (in batch order, after the hits) just after.

        Returns ``(values f32[n, dim], rows)``: ``rows`` (i32[n]) is the row of every key when
        that path ran and the keys were distinct, else None."""
        if self.tier is None:
            return self._train_lookup_rows(keys, False)
        # a spill may leave holes: the new rows fill them, and the last rows the holes left
        # (rows are dense again before anything else runs, whatever happens)
        holes = False
        try:
            tiered = not self._use_sketch and self._tier_room(keys.shape[0])
            if not tiered:
                self._tier_before_train(keys)
            holes = bool(self.meta[K.M_HOLES])
            out, rows = self._train_lookup_rows(keys, tiered)
        finally:
            if self.meta[K.M_HOLES]:
                self._fill_holes()
        if holes and rows is not None:
            moved = np.flatnonzero(rows >= self._top)
            if moved.size:
                rows[moved] = self.probe(keys[moved])
        return out, rows

    def _train_lookup_rows(
        self, keys: np.ndarray, tiered: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`train_lookup_rows` after the tier made room (``tiered``: made with the
        fast path in mind; the made rows' keys held on disk come back from it)."""
        n = keys.shape[0]
        out = np.empty((n, self.dim), dtype=np.float32)
        rows = np.empty(n, dtype=np.int32)
        if not self._use_sketch and self.rows + n <= self.values.shape[0]:
            # room for every key and every key admitted: create rows while probing (and stamp
            # the rows touched: the LRU in its stamped form)
            self._stamp_lru()
            made = np.empty(n, dtype=np.int32)
            missing = K.train_probe_create_kernel(
                self.index, self._shift, self.row_keys, self._kv, self.state, keys, rows, made,
                out, self.lru_ts, self.meta, self._holes,
            )  # fmt: skip
            if missing:
                K.train_link_new_kernel(
                    keys, rows, made, self.index, self._shift, self.row_keys, self.lru_ts,
                    self.meta,
                )  # fmt: skip
                # the made rows whose keys are on disk get their rows from it (and count as
                # hits: the init below skips them)
                restored, bad = self._tier_restore(keys, made, rows, out) if tiered else (None, 0)
                kind, a, b = self._init_args
                K.train_init_kernel(
                    keys, rows, made, out, self._kv, self.state, self._init_state, kind, a, b,
                    np.uint64(self.seed),
                )  # fmt: skip
                if bad:  # (their rows initialised, like every made row: the table stays whole)
                    self._disk().check_bad(bad)
                # every key now has a row: a hit's, or the one made for it (-2: a repeat of a
                # key made earlier in this call, whose row is the earlier one's)
                if K.merge_made_rows_kernel(rows, made):
                    if restored is not None:  # the repeats of restored keys read them too
                        rep = np.flatnonzero(rows < 0)
                        rep_rows = self.probe(keys[rep])
                        back = np.isin(rep_rows, restored)
                        out[rep[back]] = decode_rows(self.values[rep_rows[back]])
                    return out, None
            return out, rows
        self.flush_lru()
        missing = K.train_probe_hits_kernel(
            self.index, self._shift, self.row_keys, self._kv, keys, rows, out, self.lru_prev,
            self.lru_next, self.meta,
        )  # fmt: skip
        if missing:
            self._train_misses(keys, rows, out)
        return out, None

    @property
    def evictions(self) -> int:
        """Rows evicted so far: the only event that moves a key to another row (or out)."""
        return int(self.meta[K.M_EVICTIONS])

    def _train_misses(self, keys: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """Create the admitted keys with ``rows[i] == -1`` (in order) and write ``out`` of every
        absent key (its initial vector, or zeros when not admitted)."""
        kind, a, b = self._init_args
        adm = self.admission
        seed = np.uint64(self.seed)
        made = np.empty(keys.shape[0], dtype=np.int32)
        start = 0
        n = keys.shape[0]
        while True:
            start = K.train_misses_kernel(
                keys, rows, made, start, self.index, self._shift, self.row_keys, self.lru_prev,
                self.lru_next, self.meta, self.capacity, seed, float(adm.probability),
                int(adm.min_count), self._sketch, self._use_sketch,
            )  # fmt: skip
            if start >= n:
                break
            self._grow()
        K.train_init_kernel(
            keys, rows, made, out, self._kv, self.state, self._init_state, kind, a, b, seed
        )

    def apply_gradients(self, keys: Any, grads: Any) -> np.ndarray:
        """Apply ``grads[i]`` to the row of ``keys[i]`` with the optimizer (absent keys and
        non-finite gradient rows are skipped and counted; nothing is created or refreshed).

        Returns:
            int64 ``[applied, skipped_absent, skipped_nonfinite]``.
        """
        keys = check_keys(keys)
        grads = check_grads(grads, keys.shape[0], self.dim)
        return self.apply_rows(self.probe(keys), grads, keys)

    def apply_rows(
        self, rows: np.ndarray, grads: np.ndarray, keys: np.ndarray | None = None
    ) -> np.ndarray:
        """``apply_gradients`` for already probed rows and checked ``grads`` (``keys``: theirs,
        for the rows absent from RAM that a disk tier may hold)."""
        if self.row_dtype == "float32":
            counts = self.optimizer.apply(self.values, self.state, rows, grads, self.weight_bound)
        else:
            counts = self._apply_half(rows, grads)
        counts = np.asarray(counts, dtype=np.int64)
        if counts[1] and keys is not None and self.tier is not None and self.tier.rows:
            counts = counts + self._apply_on_disk(keys, rows, grads)
        self.applied += int(counts[0])
        self.skipped_absent += int(counts[1])
        self.skipped_nonfinite += int(counts[2])
        return counts

    def _apply_half(self, rows: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """The update of half rows: the distinct rows widened into a float32 block, the
        optimizer's float32 update on it (in order: a row listed twice is updated twice), and the
        block rounded back into the rows (persia.store.kernels.half)."""
        n = rows.shape[0]
        if rows.dtype != np.int32 or rows.ndim != 1:
            raise StoreError(f"rows must be a 1-D int32 array, got {rows.dtype} {rows.shape}")
        if n and (int(rows.max()) >= self.rows or int(rows.min()) < -1):
            raise StoreError(f"rows must be in [-1, {self.rows}), got {rows.min()}..{rows.max()}")
        local = np.empty(n, dtype=np.int32)
        uniq = np.empty(n, dtype=np.int32)
        block = np.empty((n, self.dim), dtype=np.float32)
        sblock = np.empty((n, self.state_width), dtype=np.float32)
        values = self._kv
        k = int(H.gather_rows_kernel(values, self.state, rows, local, uniq, block, sblock))
        block, sblock, uniq = block[:k], sblock[:k], uniq[:k]
        counts = self.optimizer.apply(block, sblock, local, grads, self.weight_bound)
        self._updates += 1
        seed = (self.seed * 0xD6E8FEB86659FD93 + self._updates * 0x9E3779B97F4A7C15) & (2**64 - 1)
        stochastic = self.rounding == "stochastic"
        H.scatter_rows_kernel(block, sblock, uniq, values, self.state, stochastic, np.uint64(seed))
        return counts

    def export_rows(self) -> dict[str, np.ndarray]:
        """Copies of the live rows, oldest first: ``keys u64[n]``, ``values [n, dim]`` in the
        stored dtype (``f32`` unless ``row_dtype`` says otherwise; :func:`decode_rows` widens
        them), ``state f32[n, W]``."""
        return self.rows_from_snapshot(self.snapshot())

    def snapshot(self) -> dict[str, np.ndarray]:
        """Raw copies of the live rows in row order with their LRU links.

        Rows are kept dense (``0 .. rows - 1``), so these are sequential copies: the fast part of
        an export, the one to do under a lock. :meth:`rows_from_snapshot` then puts the rows in
        LRU order without touching the table.
        """
        n = self.rows
        meta = np.zeros_like(self.meta)
        meta[K.M_HEAD] = self.meta[K.M_HEAD]
        snap = {
            "keys": self.row_keys[:n].copy(),
            "meta": meta,
            "values": self.values[:n].copy(),
            "state": self.state[:n].copy(),
        }
        if self.meta[K.M_STAMPED]:
            snap["ts"] = self.lru_ts[:n].copy()
        else:
            snap["next"] = self.lru_next[:n].copy()
        if self.tier is not None and self.tier.rows:
            snap["disk_keys"], snap["disk_values"], snap["disk_state"] = self.tier.export()
        return snap

    @staticmethod
    def rows_from_snapshot(snap: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of a :meth:`snapshot`, oldest first (as :meth:`export_rows` returns them)."""
        if "ts" in snap:  # the LRU in its stamped form: oldest first is by stamp
            order = np.argsort(snap["ts"], kind="stable")
        else:
            order = np.empty(snap["keys"].shape[0], dtype=np.int32)
            k = K.lru_order_kernel(snap["next"], snap["meta"], order)
            order = order[:k]
        rows = {
            "keys": snap["keys"][order],
            "values": snap["values"][order],
            "state": snap["state"][order],
        }
        if "disk_keys" in snap:  # the disk rows are older than every RAM row
            for name in ("keys", "values", "state"):
                rows[name] = np.concatenate([snap["disk_" + name], rows[name]])
        return rows

    def import_rows(self, keys: Any, values: Any, state: Any | None = None) -> None:
        """Insert or overwrite rows in order, each becoming the newest (so importing an export
        restores its LRU order). ``state`` None means the optimizer's initial state. Past capacity
        the oldest rows are evicted. No admission, no miss counting."""
        keys = check_keys(keys)
        n = keys.shape[0]
        values = self._import_values(values, n)
        if state is None:
            state = np.broadcast_to(self._init_state, (n, self.state_width))
        state = check_grads(state, n, self.state_width, field="state")
        if self.tier is not None:
            self._tier_import(keys, values, state)
            return
        self.flush_lru()
        start = 0
        while True:
            start = K.import_kernel(
                keys, values, state, start, self.index, self._shift, self.row_keys, self._kv,
                self.state, self.lru_prev, self.lru_next, self.meta, self.capacity,
            )  # fmt: skip
            if start >= n:
                return
            self._grow()

    def _import_values(self, values: Any, n: int) -> np.ndarray:
        """Rows to import in this table's storage: its own dtype as they are (bit for bit),
        float32 rounded to nearest even, another half dtype widened then rounded (with a
        warning: a checkpoint of another row dtype loads converted); all finite."""
        if isinstance(values, np.ndarray) and values.dtype in (np.float16, np.uint16):
            if values.ndim != 2 or values.shape != (n, self.dim):
                raise StoreError(
                    f"values must have shape ({n}, {self.dim}) (keys x dim), got {values.shape}"
                )
            given = row_dtype_of(values)
            if given == self.row_dtype:
                out = np.ascontiguousarray(values)
                if not np.isfinite(decode_rows(out)).all():
                    raise StoreError("values must be finite, got NaN or Inf")
                return _kernel_view(out)
            warn_once(
                _log,
                f"row_dtype {given}->{self.row_dtype}",
                f"rows stored as {given} imported into a {self.row_dtype} table (dim {self.dim}):"
                " converted (widened exactly; narrowed to nearest even)",
            )
            values = decode_rows(values)
        values = check_grads(values, n, self.dim, field="values")
        if not np.isfinite(values).all():
            raise StoreError("values must be finite, got NaN or Inf")
        return _kernel_view(encode_rows(values, self.row_dtype))

    def remove_keys(self, keys: Any) -> int:
        """Delete the rows of ``keys`` (absent keys are ignored); rows stay dense and the LRU
        order of the others is kept. Counts as no eviction. Returns how many rows were deleted.

        The rows are moved to the oldest end of the LRU list and evicted from there (the
        eviction kernel keeps the index and the rows dense)."""
        keys = check_keys(keys)
        if keys.size == 0 or self.rows == 0:
            return 0
        found = self.probe(keys)
        rows = np.unique(found[found >= 0])
        count = int(rows.size)
        if count == 0:
            return 0
        self.flush_lru()  # the linked form (the fast training lookups may have left stamps)
        meta = self.meta
        prev, nxt = self.lru_prev, self.lru_next
        if count * 8 < self.rows:  # a few: relink one by one
            for r in rows.tolist():
                p, n = int(prev[r]), int(nxt[r])
                if p >= 0:
                    nxt[p] = n
                else:
                    meta[K.M_HEAD] = n
                if n >= 0:
                    prev[n] = p
                else:
                    meta[K.M_TAIL] = p
                head = int(meta[K.M_HEAD])
                prev[r] = -1
                nxt[r] = head
                if head >= 0:
                    prev[head] = r
                else:
                    meta[K.M_TAIL] = r
                meta[K.M_HEAD] = r
        else:  # many: rebuild the whole list, the removed rows first
            order = np.empty(self.rows, dtype=np.int32)
            k = K.lru_order_kernel(nxt[: self.rows].copy(), meta.copy(), order)
            order = order[:k]
            gone = np.zeros(self.rows, dtype=bool)
            gone[rows] = True
            order = np.concatenate([rows.astype(np.int32), order[~gone[order]]])
            prev[order[1:]] = order[:-1]
            nxt[order[:-1]] = order[1:]
            prev[order[0]] = -1
            nxt[order[-1]] = -1
            meta[K.M_HEAD] = order[0]
            meta[K.M_TAIL] = order[-1]
        evictions = int(meta[K.M_EVICTIONS])
        K.evict_oldest_kernel(
            count, self.index, self._shift, self.row_keys, self._kv, self.state,
            self.lru_prev, self.lru_next, meta,
        )  # fmt: skip
        meta[K.M_EVICTIONS] = evictions
        self.layout += 1  # rows moved, and no eviction counted
        return count

    def stats(self) -> dict[str, int]:
        """Counters: rows, capacity, evictions, misses, admissions, rejections, applied,
        skipped_absent, skipped_nonfinite, bytes_used."""
        m = self.meta
        return {
            "rows": self.rows,
            "capacity": self.capacity,
            "evictions": int(m[K.M_EVICTIONS]),
            "misses": int(m[K.M_MISSES]),
            "admissions": int(m[K.M_ADMISSIONS]),
            "rejections": int(m[K.M_REJECTIONS]),
            "applied": self.applied,
            "skipped_absent": self.skipped_absent,
            "skipped_nonfinite": self.skipped_nonfinite,
            "bytes_used": self.bytes_used,
            **(self.tier.stats() if self.tier is not None else {}),
        }

    # ----------------------------------------------------------------------------- disk tier
    def attach_tier(self, tier: DiskTier) -> None:
        """Keep rows evicted from RAM in ``tier`` (its layout must be this table's: dim, value
        and state dtypes, state width) instead of dropping them."""
        want = (self.dim, self.values.dtype, self.state_width, self.state.dtype)
        got = (tier.dim, tier.value_dtype, tier.state_width, tier.state_dtype)
        if got != want:
            raise StoreError(
                f"disk tier layout (dim, dtype, state width, state dtype) {got} != {want}"
            )
        self.tier = tier
        #: the stamps sampled by a spill (which rows spill, not their values: seeded for runs
        #: that repeat)
        self._spill_rng = np.random.default_rng(self.seed)
        #: rows chosen to spill next, oldest first, from ``_spill_pos`` on; valid while their
        #: stamp is at most ``_spill_cut`` (see ``_spill_stamped``)
        self._spill_cut = -1
        self._drop_spill_queue()

    def _disk(self) -> DiskTier:
        """The disk tier, for the methods that only run with one."""
        if self.tier is None:
            raise StoreError("this table has no disk tier (attach_tier)")
        return self.tier

    def _spill(self, count: int, keep: np.ndarray, held: np.ndarray | None = None) -> int:
        """Move the ``count`` oldest RAM rows whose keys are not in ``keep`` to the disk tier
        (fewer when RAM holds fewer); returns how many moved. Counted as evictions. ``held``:
        the rows of ``keep`` when the caller just probed them."""
        tier = self._disk()
        self.flush_lru()
        count = min(count, self.rows)
        if count <= 0:
            return 0
        victims = np.empty(count, dtype=np.int32)
        if keep.size:
            if held is None:
                held = self.probe(keep)
            mark = np.zeros(self.rows, dtype=np.bool_)
            mark[held[held >= 0]] = True
            passed = np.empty(min(self.rows, keep.shape[0]), dtype=np.int32)
            nv, npass = K.spill_victims_kernel(self.lru_next, self.meta, mark, victims, passed)
            victims = victims[:nv]
            if npass:
                # the rows of ``keep`` older than the victims first become the newest (its
                # lookup makes them so anyway): the victims are then the oldest rows, evicted
                # from the head in one pass, and the other rows' order is unchanged
                K.touch_rows_kernel(passed[:npass], self.lru_prev, self.lru_next, self.meta)
        else:
            victims = victims[: K.lru_order_kernel(self.lru_next, self.meta, victims)]
        if victims.size == 0:
            return 0
        tier.put_rows(self.row_keys, victims, self.values, self.state)
        evictions = int(self.meta[K.M_EVICTIONS])
        K.evict_oldest_kernel(
            victims.size, self.index, self._shift, self.row_keys, self._kv, self.state,
            self.lru_prev, self.lru_next, self.meta,
        )  # fmt: skip
        self.meta[K.M_EVICTIONS] = evictions + victims.size
        return int(victims.size)

    def _tier_room(self, n: int) -> bool:
        """Before a training lookup of ``n`` keys with a disk tier: room for ``n`` new rows
        without eviction (what the fast lookup needs, which then brings its missing keys back
        from disk, :meth:`_tier_restore`): the arrays grow up to the capacity, and past it the
        oldest rows go to disk (:meth:`_spill_stamped`: chosen 1/16 of the capacity at a time,
        so that a pass over the RAM rows' stamps is paid once for many batches, and spilled as
        the batches need room; a row spilled early just comes back from disk if used). False
        (nothing done) when a batch needs more than half the capacity, or when the disk has no
        room for ``n`` more records: this room is for every key of the batch, hits included,
        made before the lookup knows which keys are on disk, so with the disk (nearly) full it
        would drop the oldest disk rows for room the batch's own disk rows are about to free
        (the exact path, :meth:`_tier_before_train`, takes them off first)."""
        tier = self._disk()
        if n > self.capacity // 2 or tier.rows + n > tier.capacity:
            return False
        while self.rows + n > self.values.shape[0] and self.values.shape[0] < self.capacity:
            self._grow()
        short = self.rows + n - self.values.shape[0]
        if short > 0:
            count = max(short, self.capacity // 16)
            if self.meta[K.M_STAMPED]:
                self._spill_stamped(short, count)
            else:
                self._spill(count, np.zeros(0, dtype=np.uint64))
        if self.rows + n <= self.values.shape[0]:
            return True
        if self.meta[K.M_HOLES]:  # the fast lookup will not fill them
            self._fill_holes()
        return False

    def _spill_stamped(self, least: int, count: int) -> None:
        """Move at least ``least`` of the oldest RAM rows to the disk tier, oldest first, with
        the LRU in its stamped form (no walk of the list, which the stamps would need to become
        and back). The oldest ``count`` rows are chosen together (:meth:`_choose_victims`) and
        queued, and each call spills just the rows it needs from the queue: the cost of the
        choice is paid once for many batches, and the writes spread over the lookups instead
        of stalling one of them for a whole chunk (measured: the NN worker then waited 15-30 ms
        for the batch after each chunk). A queued row touched since it was chosen (its stamp
        now past the queue's cut) stays in RAM; one that moved into an evicted row's place is
        left for the next choice."""
        need = min(least, self.rows)
        while need > 0:
            queue = self._spill_queue
            if self._spill_pos >= queue.size:
                self._choose_victims(max(need, count))
                if self._spill_queue.size == 0:
                    return
                continue
            victims = np.empty(need, dtype=np.int32)  # (a hole's stamp is past any cut)
            k, pos = K.spill_queue_kernel(
                queue, self._spill_pos, need, self._top, self.lru_ts, self._spill_cut, victims
            )
            self._spill_pos = int(pos)
            if k:
                self._spill_rows(victims[:k])
                need -= k

    def _choose_victims(self, count: int) -> None:
        """Queue the ``count`` oldest RAM rows, oldest first, for :meth:`_spill_stamped`: a
        sample of the stamps sets a threshold, one pass collects the rows below it (exactly the
        oldest ones; a partial sort finds them when the sample set it too low)."""
        rows = self._top  # holes included: their stamps are past any threshold
        count = min(count, self.rows)
        self._spill_pos = 0
        if count <= 0:
            self._spill_queue = np.zeros(0, dtype=np.int32)
            return
        ts = self.lru_ts[:rows]
        sample = ts[self._spill_rng.integers(0, rows, size=min(rows, 4096))]
        threshold = int(np.quantile(sample, min(1.0, 1.25 * count / rows), method="higher"))
        out = np.empty(min(rows, 2 * count + 1024), dtype=np.int32)
        out_ts = np.empty(out.shape[0], dtype=np.int64)
        k = int(K.stamps_below_kernel(ts, rows, threshold + 1, out, out_ts))
        if count <= k:
            victims, stamps = out[:k], out_ts[:k]
        else:  # the sample missed: the exact oldest ``count``
            victims = np.argpartition(np.asarray(ts), count - 1)[:count].astype(np.int32)
            stamps = ts[victims]
        # oldest first (rows of one stamp in any order: numpy's default sort, 4x the stable
        # one's speed on these int64 stamps)
        order = np.argsort(stamps)[:count]
        self._spill_queue = victims[order]
        self._spill_cut = int(stamps[order[-1]])

    def _spill_rows(self, victims: np.ndarray) -> None:
        """Move RAM rows ``victims`` (distinct; written to disk in this order) to the disk tier,
        with the LRU in its stamped form, leaving holes where they were (no row moves: the
        lookup that spilled makes its new rows there, then :meth:`_fill_holes`). Logged for
        :meth:`rows_kept_below`."""
        self._disk().put_rows(self.row_keys, victims, self.values, self.state)
        held = int(self.meta[K.M_HOLES])
        if self._holes.size < held + victims.size:
            holes = np.empty(max(held + victims.size, 2 * self._holes.size), dtype=np.int32)
            holes[:held] = self._holes[:held]
            self._holes = holes
        before = self.evictions
        newest = K.evict_rows_hole_kernel(
            victims, self.index, self._shift, self.row_keys, self.lru_ts, self.meta, self._holes
        )  # fmt: skip
        self._spill_log.append((before, self.evictions, self._top, int(newest)))

    def _fill_holes(self) -> None:
        """Rows dense again after :meth:`_spill_rows`: the last rows move into the holes the
        new rows left (logged for :meth:`rows_kept_below`)."""
        evictions = self.evictions
        moved = K.fill_holes_kernel(
            self._holes, self.index, self._shift, self.row_keys, self._kv, self.state,
            self.lru_ts, self.meta,
        )  # fmt: skip
        if moved:
            self._spill_log.append((evictions, evictions, self._top, -1))

    def _drop_spill_queue(self) -> None:
        """Forget the queued victims (their stamps are about to be renumbered)."""
        self._spill_queue = np.zeros(0, dtype=np.int32)
        self._spill_pos = 0

    def _tier_restore(
        self, keys: np.ndarray, made: np.ndarray, rows: np.ndarray, out: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """After the fast training lookup made rows for its missing keys: the made rows whose
        keys the disk tier holds get their values and state from disk (the records leave the
        disk), ``rows`` their rows and ``out`` their values; they count as hits, not misses.
        Returns those rows, and how many records failed their check (left on disk)."""
        tier = self._disk()
        taken, bad = tier.take_into(keys, made, self.values, self.state)
        if taken.size == 0:
            return np.zeros(0, dtype=np.int32), bad
        back = made[taken]
        rows[taken] = back
        out[taken] = decode_rows(self.values[back])
        self.meta[K.M_MISSES] -= back.size
        self.meta[K.M_ADMISSIONS] -= back.size
        return back, bad

    def _make_room(self, keys: np.ndarray) -> None:
        """Spill so that every key of ``keys`` absent from RAM fits."""
        held = self.probe(keys)
        absent = np.unique(keys[held < 0])
        excess = self.rows + absent.size - self.capacity
        if excess > 0:
            self._spill(excess, keys, held)

    def _tier_before_train(self, keys: np.ndarray) -> bool:
        """Before a training lookup: make room, then bring the keys held on disk back into RAM
        (as the newest rows; the lookup then orders them as hits). Returns whether any key's row
        changed (a row spilled, moved or brought back)."""
        tier = self._disk()
        if not tier.rows and self.rows + keys.shape[0] <= self.capacity:
            return False
        before = self.evictions
        # the disk rows are taken off first: the rows spilled next must not push them out
        held, absent, recs = self._absent_on_disk(keys)
        on = recs >= 0
        values, state = self._take_off_disk(recs[on])
        excess = self.rows + absent.size - self.capacity
        if excess > 0 and self._spill(excess, keys, held) < excess:
            warn_once(
                get_default_logger("persia.store"),
                "disk tier: batch above capacity",
                f"a training lookup asks for more distinct keys ({absent.size} new to RAM) than "
                f"the table's RAM capacity ({self.capacity} rows) leaves room for: rows past it "
                "are evicted without going to disk; raise the capacity",
            )
        if on.any():
            self._put_rows(absent[on], values, state)
        return bool(on.any()) or self.evictions != before

    def _absent_on_disk(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows of ``keys`` in RAM (``held``), the distinct keys RAM lacks (``absent``) and
        their disk records (-1: not on disk)."""
        tier = self._disk()
        held = self.probe(keys)
        absent = np.unique(keys[held < 0])
        return held, absent, tier.find(absent)

    def _take_off_disk(self, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The values and state of disk records ``recs`` (all >= 0), which leave the disk."""
        tier = self._disk()
        values, state = tier.read(recs)
        if recs.size:
            tier.remove(recs)
        return values, state

    def _put_rows(self, keys: np.ndarray, values: np.ndarray, state: np.ndarray) -> None:
        """``import_rows`` of checked rows in the table's dtypes (no tier, no checks)."""
        self.flush_lru()
        values = _kernel_view(values)
        start = 0
        while True:
            start = K.import_kernel(
                keys, values, state, start, self.index, self._shift, self.row_keys, self._kv,
                self.state, self.lru_prev, self.lru_next, self.meta, self.capacity,
            )  # fmt: skip
            if start >= keys.shape[0]:
                return
            self._grow()

    def _tier_import(self, keys: np.ndarray, values: np.ndarray, state: np.ndarray) -> None:
        """``import_rows`` with a disk tier: the imported rows replace their disk copies; past
        capacity the oldest rows go to disk (in chunks of half the capacity)."""
        tier = self._disk()
        tier.remove_keys(keys)
        step = max(1, self.capacity // 2)
        for i in range(0, keys.shape[0], step):
            part = keys[i : i + step]
            self._make_room(part)
            self._put_rows(part, values[i : i + step], state[i : i + step])

    def _apply_on_disk(self, keys: np.ndarray, rows: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Apply the gradients of keys absent from RAM to their disk rows (read, update, write
        back); returns the change of ``[applied, skipped_absent, skipped_nonfinite]``."""
        tier = self._disk()
        miss = np.flatnonzero(rows < 0)
        recs = tier.find(keys[miss])
        on = recs >= 0
        if not on.any():
            return np.zeros(3, dtype=np.int64)
        uniq, inv = np.unique(recs[on], return_inverse=True)
        stored, state = tier.read(uniq)
        # half rows: updated in float32 and rounded back to nearest even (stochastic rounding
        # is the RAM rows' only: rows on disk are rare and cold)
        values = np.array(decode_rows(stored), dtype=np.float32)
        counts = np.asarray(
            self.optimizer.apply(
                values, state, inv.astype(np.int32), np.ascontiguousarray(grads[miss[on]]),
                self.weight_bound,
            ),
            dtype=np.int64,
        )  # fmt: skip
        tier.put(tier.keys[uniq].copy(), encode_rows(values, self.row_dtype), state)
        return np.array([counts[0], -int(on.sum()), counts[2]], dtype=np.int64)

    def prefetch(self, keys: np.ndarray) -> int:
        """Bring the rows of ``keys`` held on disk into RAM now (the oldest RAM rows not among
        ``keys`` make room), so that their training lookup finds them in RAM. Rows in RAM are
        not refreshed. Returns how many came back."""
        if self.tier is None or not self.tier.rows:
            return 0
        held, absent, recs = self._absent_on_disk(keys)
        on = recs >= 0
        count = int(on.sum())
        if count == 0:
            return 0
        if self.meta[K.M_STAMPED] and not self._use_sketch and count <= self.capacity // 2:
            # the LRU as the fast lookup keeps it: a training lookup of just the keys on disk
            # brings them back (made rows, restored from disk: no counter moves) without
            # turning the LRU into a list and back
            self.train_lookup_rows(absent[on])
            return count
        values, state = self._take_off_disk(recs[on])
        excess = self.rows + count - self.capacity
        if excess > 0:
            self._spill(excess, keys, held)
        self._put_rows(absent[on], values, state)
        return count

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Whether each key has a row, in RAM or on disk."""
        held = self.probe(keys) >= 0
        if self.tier is not None and self.tier.rows and not held.all():
            out = ~held
            held[out] = self.tier.find(keys[out]) >= 0
        return held
