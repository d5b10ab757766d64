"""numba kernels of one embedding table: hashing, open-addressing index, LRU, init, admission.

State is plain arrays (see ``persia.store.table.EmbeddingTable``):

* ``values f32[R, dim]``, ``state f32[R, W]``, ``row_keys u64[R]``: the rows, dense, rows
  ``0 .. nrows-1`` live (but ``meta[M_HOLES]`` holes a stamped spill leaves, from then until
  the training lookup that spilled ends: ``evict_rows_hole_kernel``).
* ``lru_prev / lru_next i32[R]``: a doubly linked list of live rows, oldest (``head``) to newest
  (``tail``); -1 ends it.
* ``index u64[S]``: open addressing with linear probing, ``S`` a power of two, ``EMPTY`` (all ones)
  = empty slot. A slot holds an entry ``tag << 32 | row``: the row number (int32) and a 32-bit tag,
  the low half of the key's probe hash. A probe compares tags first and reads
  ``row_keys[row]`` only to confirm a tag match (a wrong match has probability 2**-32 per slot
  passed), so the row's key and values are fetched at the same time instead of one after the other.
  Keys are compared through ``row_keys[row]``, so every uint64 is a valid key (there is no reserved
  key value). Deletion is backward-shift deletion (no tombstones).
* ``meta i64[META_LEN]``: ``nrows, head, tail`` and the counters (see the ``M_*`` constants).
* ``lru_ts i64[R]``: the LRU in its *stamped* form (``meta[M_STAMPED] == 1``): the same 8
  bytes of each record as ``lru_prev`` and ``lru_next``, read as one int64 clock value, the
  time of the row's last touch (``meta[M_CLOCK]`` is the next). The fast training lookup (room
  for every key: nothing is evicted) stamps the rows it touches instead of relinking them: the
  stamp goes into the record line the probe has just read, where a relink wrote the lines of
  both neighbours and the tail (most of a training lookup's time, on hot keys). The list is the
  rows in stamp order (``lru_link_kernel`` builds it; ``lru_stamp_kernel`` turns a list back
  into stamps), the list relinking at every touch gives. Everything else (eviction, import, the
  other training paths) works on the linked form; ``EmbeddingTable`` converts first.

Hashes (all documented, all fixed forever: checkpoints and shard routing depend on them):

* probe hash: ``h = fmix64(key ^ PROBE_SALT)`` (MurmurHash3's finaliser); the home slot is its high
  ``log2(S)`` bits (``h >> (64 - log2 S)``), the tag its low 32 bits (disjoint bits: ``S <= 2**32``).
* shard routing (``shard_of``): ``h = mix_sm(key ^ SHARD_SALT)`` (SplitMix64's finaliser, another
  mixer and another salt than the probe hash); ``shard = ((h >> 32) * N) >> 32`` (multiply-shift
  range reduction on the high 32 bits). Keys of one shard therefore still spread over all of that
  shard's index slots.
* init / admission streams: ``base = mix_sm(mix_sm(key ^ salt) ^ (seed * GOLDEN))``, element ``j``
  is ``mix_sm(base + (j + 1) * GOLDEN)`` (a SplitMix64 stream); a uniform double is its top 53 bits
  times 2**-53.

Kernels validate nothing, allocate (almost) nothing and release the GIL. Their plain-Python twins
are in ``tests/naive.py``. Row copies index with unsigned integers: numba wraps negative signed
indices, and that branch keeps LLVM from copying a row with vector instructions.
"""

import math

import numpy as np
from numba import njit

# the prefetch hint lives with the optimizer kernels (the layer below), which use it too
from persia.embedding.kernels import prefetch, prefetch_at
from persia.store.kernels.half import round_row, store_row, widen

PROBE_SALT = np.uint64(0x9E3779B97F4A7C15)
SHARD_SALT = np.uint64(0xD1B54A32D192ED03)
INIT_SALT = np.uint64(0x2545F4914F6CDD1D)
ADMIT_SALT = np.uint64(0xA0761D6478BD642F)
SKETCH_SALT = np.uint64(0xE7037ED1A0B428DB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S1 = np.uint64(0xBF58476D1CE4E5B9)
_S2 = np.uint64(0x94D049BB133111EB)
_U33 = np.uint64(33)
_U30 = np.uint64(30)
_U27 = np.uint64(27)
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_U11 = np.uint64(11)
_ONE = np.uint64(1)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53

#: meta layout
M_NROWS = 0
M_HEAD = 1
M_TAIL = 2
M_EVICTIONS = 3
M_MISSES = 4
M_ADMISSIONS = 5
M_REJECTIONS = 6
M_SCRATCH = 7  # sink of prefetch loads (keeps them from being optimised away)
M_STAMPED = 8  # 1: the LRU is held as stamps (lru_ts), 0: as the linked list
M_CLOCK = 9  # the next stamp
#: rows evicted without a row moving into their place yet (``evict_rows_hole_kernel``)
M_HOLES = 10
META_LEN = 11

#: the stamp of a hole: newer than any row (never chosen to spill)
HOLE_TS = np.int64(2**63 - 1)
#: the stamp of a row made by the running ``train_probe_create_kernel`` (until it is linked)
MADE_TS = np.int64(-1)

#: init kinds
INIT_UNIFORM = 0
INIT_NORMAL = 1


@njit(nogil=True, cache=True, inline="always")
def fmix64(k):
    """MurmurHash3's 64-bit finaliser (the probe hash's mixer)."""
    k ^= k >> _U33
    k *= _M1
    k ^= k >> _U33
    k *= _M2
    k ^= k >> _U33
    return k


@njit(nogil=True, cache=True, inline="always")
def mix_sm(z):
    """SplitMix64's finaliser (the mixer of shard routing, init and admission)."""
    z = (z ^ (z >> _U30)) * _S1
    z = (z ^ (z >> _U27)) * _S2
    return z ^ (z >> _U31)


@njit(nogil=True, cache=True, inline="always")
def home_slot(key, shift):
    return np.int64(fmix64(key ^ PROBE_SALT) >> shift)


@njit(nogil=True, cache=True, inline="always")
def stream_base(key, seed, salt):
    return mix_sm(mix_sm(key ^ salt) ^ (seed * GOLDEN))


@njit(nogil=True, cache=True, inline="always")
def stream_uniform(base, j):
    """Uniform double in [0, 1) from element ``j`` of the stream ``base``."""
    h = mix_sm(base + (np.uint64(j) + _ONE) * GOLDEN)
    return np.float64(h >> _U11) * _INV53


@njit(nogil=True, cache=True)
def shard_of_kernel(keys, num_shards, out):
    """``out[i] = shard of keys[i]`` among ``num_shards`` (see the module docstring)."""
    n = np.uint64(num_shards)
    for i in range(keys.shape[0]):
        h = mix_sm(keys[i] ^ SHARD_SALT)
        out[i] = np.int32(((h >> _U32) * n) >> _U32)


_LO32 = np.uint64(0xFFFFFFFF)
_HI32 = np.uint64(0xFFFFFFFF00000000)
#: an empty index slot (its row field reads as -1)
EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(nogil=True, cache=True, inline="always")
def entry_row(e):
    """Row number of index entry ``e`` (-1 for ``EMPTY``)."""
    return np.int32(e & _LO32)


@njit(nogil=True, cache=True, inline="always")
def make_entry(h, r):
    """The index entry of a key with probe hash ``h`` held in row ``r``."""
    return (h << _U32) | np.uint64(r)


@njit(nogil=True, cache=True, inline="always")
def scan_tag(index, mask, s, tag):
    """First slot from ``s`` on that is empty or holds an entry with ``tag`` (``h << 32``)."""
    while True:
        e = index[s]
        if e == EMPTY or (e ^ tag) <= _LO32:
            return s
        s = (s + 1) & mask


@njit(nogil=True, cache=True, inline="always")
def find_slot(index, mask, s, tag, row_keys, key):
    """From slot ``s`` on: the slot holding ``key`` (tag ``tag``), or the empty slot ending its
    probe (where it would be inserted)."""
    while True:
        s = scan_tag(index, mask, s, tag)
        r = entry_row(index[s])
        if r < 0 or row_keys[r] == key:
            return s
        s = (s + 1) & mask


@njit(nogil=True, cache=True, inline="always")
def find_row(index, mask, shift, row_keys, key):
    """Row of ``key`` or -1."""
    h = fmix64(key ^ PROBE_SALT)
    return entry_row(index[find_slot(index, mask, np.int64(h >> shift), h << _U32, row_keys, key)])


#: keys per group of the software-pipelined loops: each pass over a group issues independent
#: cache misses (index slots, then row keys and rows, then links), which the CPU overlaps; one long
#: loop body per key would leave only one or two keys in flight.
GROUP = 128


@njit(nogil=True, cache=True, inline="always")
def _hash_group(index, shift, keys, g0, g1, slots, tags):
    """Pass 1 of a group: home slots and tags of ``keys[g0:g1]``; prefetch the slots."""
    for i in range(g0, g1):
        h = fmix64(keys[i] ^ PROBE_SALT)
        s = np.int64(h >> shift)
        slots[i - g0] = s
        tags[i - g0] = h << _U32
        prefetch(index, s)
        prefetch(index, (s + 1) & (index.shape[0] - 1))


@njit(nogil=True, cache=True)
def _probe_on(index, mask, s, tag, row_keys, key):
    """Row of ``key`` (tag ``tag``) probing on from slot ``s`` (after a tag collision: rare)."""
    return entry_row(index[find_slot(index, mask, s, tag, row_keys, key)])


@njit(nogil=True, cache=True)
def recheck_rows_kernel(index, shift, row_keys, nrows, keys, rows, out, low):
    """``out[i]`` = the row of ``keys[i]`` (or -1), given ``rows[i]``, where it was: kept
    where that row still holds the key (one compare; none below ``low``, rows known to hold
    theirs), probed again where not (it moved or left). Returns how many were probed again."""
    mask = index.shape[0] - 1
    again = 0
    for i in range(keys.shape[0]):
        r = rows[i]
        if 0 <= r < low or (0 <= r < nrows and row_keys[r] == keys[i]):
            out[i] = r
        else:
            out[i] = find_row(index, mask, shift, row_keys, keys[i])
            again += 1
    return again


@njit(nogil=True, cache=True)
def probe_kernel(index, shift, row_keys, keys, rows):
    """``rows[i] = row of keys[i]`` or -1; returns the number of absent keys.

    Three passes per group of keys: hash and prefetch every home slot; scan the slots for the
    key's tag and prefetch the candidates' keys; confirm the keys."""
    mask = index.shape[0] - 1
    n = keys.shape[0]
    missing = 0
    slots = np.empty(GROUP, dtype=np.int64)
    tags = np.empty(GROUP, dtype=np.uint64)
    for g0 in range(0, n, GROUP):
        g1 = min(n, g0 + GROUP)
        _hash_group(index, shift, keys, g0, g1, slots, tags)
        for i in range(g0, g1):
            s = scan_tag(index, mask, slots[i - g0], tags[i - g0])
            slots[i - g0] = s
            r = entry_row(index[s])
            rows[i] = r
            prefetch(row_keys, max(r, 0))
        for i in range(g0, g1):
            r = rows[i]
            if r >= 0 and row_keys[r] != keys[i]:  # a tag collision: probe on
                s = (slots[i - g0] + 1) & mask
                r = _probe_on(index, mask, s, tags[i - g0], row_keys, keys[i])
            rows[i] = r
            if r < 0:
                missing += 1
    return missing


@njit(nogil=True, cache=True)
def gather_kernel(values, rows, out):
    """``out[i] = values[rows[i]]``, zeros where ``rows[i] == -1``."""
    dim = values.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            for j in range(dim):
                out[np.uint64(i), np.uint64(j)] = widen(values[np.uint64(r), np.uint64(j)])
        else:
            for j in range(dim):
                out[i, j] = 0.0


@njit(nogil=True, cache=True)
def lookup_eval_kernel(index, shift, row_keys, values, keys, rows, out):
    """Evaluation lookup: ``rows[i]`` = row of ``keys[i]`` or -1, ``out[i]`` = its values or
    zeros. Returns the number of absent keys.

    Per group of keys: hash and prefetch the home slots; scan them for the tags and prefetch each
    candidate's key and values together (two cache lines in flight at once, not one after the
    other); confirm the key and gather. Two random cache lines deep per key, not three (measured
    13.2 -> 19.3 M rows/s for 1M keys among 8M here, where probing all keys first and then
    gathering all rows had been the faster of the three-line variants)."""
    mask = index.shape[0] - 1
    dim = values.shape[1]
    n = keys.shape[0]
    missing = 0
    slots = np.empty(GROUP, dtype=np.int64)
    tags = np.empty(GROUP, dtype=np.uint64)
    for g0 in range(0, n, GROUP):
        g1 = min(n, g0 + GROUP)
        _hash_group(index, shift, keys, g0, g1, slots, tags)
        for i in range(g0, g1):
            s = scan_tag(index, mask, slots[i - g0], tags[i - g0])
            slots[i - g0] = s
            r = entry_row(index[s])
            rows[i] = r
            if r >= 0:
                prefetch(row_keys, r)
                prefetch(values, r)
        for i in range(g0, g1):
            r = rows[i]
            if r >= 0 and row_keys[r] != keys[i]:  # a tag collision: probe on
                s = (slots[i - g0] + 1) & mask
                r = _probe_on(index, mask, s, tags[i - g0], row_keys, keys[i])
            rows[i] = r
            if r >= 0:
                for j in range(dim):
                    out[np.uint64(i), np.uint64(j)] = widen(values[np.uint64(r), np.uint64(j)])
            else:
                missing += 1
                for j in range(dim):
                    out[i, j] = 0.0
    return missing


@njit(nogil=True, cache=True, inline="always")
def _unlink(lru_prev, lru_next, meta, r):
    p = lru_prev[r]
    n = lru_next[r]
    if p >= 0:
        lru_next[p] = n
    else:
        meta[M_HEAD] = n
    if n >= 0:
        lru_prev[n] = p
    else:
        meta[M_TAIL] = p


@njit(nogil=True, cache=True, inline="always")
def _push_tail(lru_prev, lru_next, meta, r):
    t = meta[M_TAIL]
    lru_prev[r] = t
    lru_next[r] = -1
    if t >= 0:
        lru_next[t] = r
    else:
        meta[M_HEAD] = r
    meta[M_TAIL] = r


@njit(nogil=True, cache=True, inline="always")
def _touch(lru_prev, lru_next, meta, r):
    if meta[M_TAIL] != r:
        _unlink(lru_prev, lru_next, meta, r)
        _push_tail(lru_prev, lru_next, meta, r)


@njit(nogil=True, cache=True)
def spill_victims_kernel(lru_next, meta, mark, victims, passed):
    """From the LRU's head (linked form): the first ``len(victims)`` rows not ``mark``-ed into
    ``victims``, the marked rows met before the last of them into ``passed`` (up to its length).
    Returns ``(victims found, marked rows passed)``."""
    r = meta[M_HEAD]
    nv = 0
    npass = 0
    while r >= 0 and nv < victims.shape[0]:
        if mark[r]:
            if npass < passed.shape[0]:
                passed[npass] = r
                npass += 1
        else:
            victims[nv] = r
            nv += 1
        r = lru_next[r]
    return nv, npass


@njit(nogil=True, cache=True)
def touch_rows_kernel(rows, lru_prev, lru_next, meta):
    """Make each row of ``rows`` (>= 0; -1 skipped) the newest, in order (linked LRU)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            _touch(lru_prev, lru_next, meta, r)


@njit(nogil=True, cache=True)
def train_hits_kernel(values, rows, out, lru_prev, lru_next, meta):
    """Training lookup, pass 2: gather every found row and make it the newest, in batch order.

    Rows that are -1 (absent) are left for the later passes; their output is not written. Per
    group of keys: prefetch each row's values and links; gather and prefetch its neighbours'
    links; relink in order.
    """
    dim = values.shape[1]
    n = rows.shape[0]
    for g0 in range(0, n, GROUP):
        g1 = min(n, g0 + GROUP)
        for i in range(g0, g1):
            r = rows[i]
            if r >= 0:
                prefetch(values, r)
                prefetch(lru_prev, r)
                prefetch(lru_next, r)
        for i in range(g0, g1):
            r = rows[i]
            if r >= 0:
                for j in range(dim):
                    out[np.uint64(i), np.uint64(j)] = widen(values[np.uint64(r), np.uint64(j)])
                p = lru_prev[r]
                nx = lru_next[r]
                if p >= 0:
                    prefetch(lru_next, p)
                if nx >= 0:
                    prefetch(lru_prev, nx)
        for i in range(g0, g1):
            r = rows[i]
            if r >= 0:
                _touch(lru_prev, lru_next, meta, r)


@njit(nogil=True, cache=True)
def train_probe_hits_kernel(
    index, shift, row_keys, values, keys, rows, out, lru_prev, lru_next, meta
):  # fmt: skip
    """Training lookup, passes 1 and 2 fused (``probe_kernel`` then ``train_hits_kernel``):
    ``rows[i]`` = row of ``keys[i]`` or -1; every found row is gathered into ``out[i]`` and made
    the newest, in batch order (absent keys' output is not written). Returns the number absent.

    Per group of keys: hash and prefetch the home slots; read them and prefetch each home entry's
    key record (which holds its links) and, when its tag is the key's, its values (no branch on
    slot values still in flight); probe by tag and key, and for a hit prefetch its values (if not
    yet) and its LRU neighbours' links; gather and relink in order. A hit costs five random cache lines (slot, record, values, two neighbours). Reading
    the home entry's record first, rather than scanning the tags first as the evaluation lookup
    does, measured faster here: the record is needed for its links anyway."""
    mask = index.shape[0] - 1
    dim = values.shape[1]
    n = keys.shape[0]
    missing = 0
    slots = np.empty(GROUP, dtype=np.int64)
    tags = np.empty(GROUP, dtype=np.uint64)
    for g0 in range(0, n, GROUP):
        g1 = min(n, g0 + GROUP)
        _hash_group(index, shift, keys, g0, g1, slots, tags)
        for i in range(g0, g1):  # no branch on slot values still in flight:
            e = index[slots[i - g0]]
            prefetch(row_keys, max(entry_row(e), 0))  # the home entry's record
            r = entry_row(e) if (e ^ tags[i - g0]) <= _LO32 else np.int32(0)
            prefetch(values, max(r, 0))  # and its values when its tag is the key's
        for i in range(g0, g1):
            s = find_slot(index, mask, slots[i - g0], tags[i - g0], row_keys, keys[i])
            r = entry_row(index[s])
            rows[i] = r
            if r < 0:
                missing += 1
            else:
                prefetch(values, r)
                p = lru_prev[r]
                nx = lru_next[r]
                if p >= 0:
                    prefetch(lru_next, p)
                if nx >= 0:
                    prefetch(lru_prev, nx)
        for i in range(g0, g1):
            r = rows[i]
            if r >= 0:
                for j in range(dim):
                    out[np.uint64(i), np.uint64(j)] = widen(values[np.uint64(r), np.uint64(j)])
                _touch(lru_prev, lru_next, meta, r)
    return missing


@njit(nogil=True, cache=True)
def train_probe_create_kernel(
    index, shift, row_keys, values, state, keys, rows, made, out, lru_ts, meta, holes
):  # fmt: skip
    """``train_probe_hits_kernel`` that also creates the missing keys' rows and index entries
    while their probe chains are in the cache (the table must have room for every key without
    growth or eviction, and admit every key). Created rows are not linked: ``rows[i] = -1`` and
    ``made[i]`` = the new row (or -2: created earlier in this batch; -1 for a hit) for
    ``train_link_new_kernel`` and ``train_init_kernel``, which give the same result as
    ``train_misses_kernel`` would have. Returns the number of keys absent before the batch.

    The LRU must be in its stamped form: each hit gets the next stamp (``lru_ts``), in batch
    order, where the linked form would relink it. A hit's optimizer state is prefetched too:
    the gradients of the batch update it soon (a hint only). New rows fill the holes first
    (``holes[:meta[M_HOLES]]``, the last first), then go after the last row. A repeat of a key
    made earlier in the batch is known by its row: past the rows there were, or, with holes, a
    stamp of ``MADE_TS`` (a new row's until it is linked).

    Its prefetch, hit and gather-and-relink loops repeat ``train_probe_hits_kernel``'s on
    purpose: the same loops as shared ``inline="always"`` helpers measured 8-9% slower in both
    kernels (interleaved A/B in one process, 1M held keys among 8M: 110 -> 121 ms)."""
    mask = index.shape[0] - 1
    dim = values.shape[1]
    n = keys.shape[0]
    first_new = meta[M_NROWS]
    holed = meta[M_HOLES] > 0
    missing = 0
    slots = np.empty(GROUP, dtype=np.int64)
    tags = np.empty(GROUP, dtype=np.uint64)
    for g0 in range(0, n, GROUP):
        g1 = min(n, g0 + GROUP)
        _hash_group(index, shift, keys, g0, g1, slots, tags)
        for i in range(g0, g1):  # no branch on slot values still in flight:
            e = index[slots[i - g0]]
            prefetch(row_keys, max(entry_row(e), 0))  # the home entry's record
            r = entry_row(e) if (e ^ tags[i - g0]) <= _LO32 else np.int32(0)
            prefetch(values, max(r, 0))  # and its values when its tag is the key's
        for i in range(g0, g1):
            key = keys[i]
            tag = tags[i - g0]
            # a full probe from home: an earlier key of this group may have taken a slot
            s = find_slot(index, mask, slots[i - g0], tag, row_keys, key)
            r = entry_row(index[s])
            if r < 0:
                nh = meta[M_HOLES]
                if nh > 0:
                    meta[M_HOLES] = nh - 1
                    r = holes[nh - 1]
                    if nh > 2:  # the hole a later new key takes (anywhere; written soon)
                        f = holes[nh - 3]
                        prefetch(row_keys, f)
                        prefetch(values, f)
                        for c in range(0, state.shape[1], 16):
                            prefetch_at(state, f, c)
                else:
                    r = np.int32(meta[M_NROWS])
                    meta[M_NROWS] = r + 1
                row_keys[r] = key
                if holed:
                    lru_ts[r] = MADE_TS
                index[s] = tag | np.uint64(r)
                meta[M_MISSES] += 1
                meta[M_ADMISSIONS] += 1
                rows[i] = -1
                made[i] = r
                missing += 1
            elif r >= first_new or (holed and lru_ts[r] == MADE_TS):
                rows[i] = -1
                made[i] = -2
                missing += 1
            else:
                rows[i] = r
                made[i] = -1
                prefetch(values, r)
                for c in range(0, state.shape[1], 16):
                    prefetch_at(state, r, c)
        for i in range(g0, g1):
            r = rows[i]
            if r >= 0:
                for j in range(dim):
                    out[np.uint64(i), np.uint64(j)] = widen(values[np.uint64(r), np.uint64(j)])
                lru_ts[r] = meta[M_CLOCK]
                meta[M_CLOCK] += 1
    return missing


@njit(nogil=True, cache=True)
def train_link_new_kernel(keys, rows, made, index, shift, row_keys, lru_ts, meta):
    """After ``train_probe_create_kernel``: in batch order, stamp each created row
    (``made[i] >= 0``) or the row of a key created earlier in the batch (``made[i] == -2``),
    after the hits that kernel stamped (the stamped form of linking them as the newest)."""
    mask = index.shape[0] - 1
    for i in range(keys.shape[0]):
        if rows[i] >= 0:
            continue
        m = made[i]
        if m < 0:
            m = find_row(index, mask, shift, row_keys, keys[i])
        lru_ts[m] = meta[M_CLOCK]
        meta[M_CLOCK] += 1


@njit(nogil=True, cache=True)
def lru_link_kernel(order, lru_prev, lru_next, meta):
    """The linked form of the LRU from ``order`` (the live rows, oldest first: the rows sorted
    by stamp); overwrites the stamps (the same bytes)."""
    n = order.shape[0]
    for j in range(n):
        r = order[j]
        lru_prev[r] = order[j - 1] if j > 0 else -1
        lru_next[r] = order[j + 1] if j + 1 < n else -1
    meta[M_HEAD] = order[0] if n else -1
    meta[M_TAIL] = order[n - 1] if n else -1
    meta[M_STAMPED] = 0
    return n


@njit(nogil=True, cache=True)
def lru_link_stamps_kernel(lru_ts, nrows, clock, lru_prev, lru_next, meta):
    """The linked form of the LRU from the stamps of rows ``0 .. nrows-1`` (unique, each below
    ``clock``), without a sort: one int32 slot per stamp (``clock`` x 4 bytes where an argsort
    takes 16 per row). Overwrites the stamps (the same bytes as the links). Returns the rows."""
    pos = np.full(clock, -1, dtype=np.int32)
    for r in range(nrows):
        pos[lru_ts[r]] = r
    prev = -1
    head = -1
    for t in range(clock):
        r = pos[t]
        if r < 0:
            continue
        lru_prev[r] = prev
        if prev >= 0:
            lru_next[prev] = r
        else:
            head = r
        prev = r
    if prev >= 0:
        lru_next[prev] = -1
    meta[M_HEAD] = head
    meta[M_TAIL] = prev
    meta[M_STAMPED] = 0
    return nrows


@njit(nogil=True, cache=True)
def lru_stamp_kernel(lru_next, lru_ts, meta):
    """The stamped form of a linked LRU: walking from the head, stamps 0, 1, ... (each row's
    ``next`` is read before its stamp overwrites it). Returns the rows stamped."""
    r = meta[M_HEAD]
    k = 0
    while r >= 0:
        nx = lru_next[r]
        lru_ts[r] = k
        k += 1
        r = nx
    meta[M_CLOCK] = k
    meta[M_STAMPED] = 1
    return k


@njit(nogil=True, cache=True)
def merge_made_rows_kernel(rows, made):
    """After ``train_probe_create_kernel`` (and its link and init passes): ``rows[i] = made[i]``
    where the key was made in this call; returns how many keys repeat one made earlier in the
    call (``made[i] == -2``, left at -1)."""
    repeats = 0
    for i in range(rows.shape[0]):
        if rows[i] < 0:
            m = made[i]
            if m >= 0:
                rows[i] = m
            else:
                repeats += 1
    return repeats


@njit(nogil=True, cache=True)
def delete_slot(index, shift, row_keys, slot):
    """Empty ``index[slot]`` by backward-shift deletion (probing stays correct, no tombstones)."""
    mask = index.shape[0] - 1
    hole = slot
    k = slot
    while True:
        k = (k + 1) & mask
        e = index[k]
        if e == EMPTY:
            break
        home = home_slot(row_keys[entry_row(e)], shift)
        # the entry may move back to the hole unless its home lies cyclically in (hole, k]
        if hole <= k:
            stays = hole < home <= k
        else:
            stays = home > hole or home <= k
        if not stays:
            index[hole] = e
            hole = k
    index[hole] = EMPTY


@njit(nogil=True, cache=True, inline="always")
def prefetch_followers(index, mask, row_keys, s):
    """Prefetch the keys of the (up to two) entries after slot ``s``: what a deletion of
    ``s`` reads (each one's home slot), otherwise one dependent cache miss after the other."""
    k = (s + 1) & mask
    e = index[k]
    if e != EMPTY:
        prefetch(row_keys, entry_row(e))
        e = index[(k + 1) & mask]
        if e != EMPTY:
            prefetch(row_keys, entry_row(e))


@njit(nogil=True, cache=True, inline="always")
def _slot_of_row(index, mask, shift, row_keys, r):
    s = home_slot(row_keys[r], shift)
    while entry_row(index[s]) != r:
        s = (s + 1) & mask
    return s


@njit(nogil=True, cache=True, inline="always")
def _insert_slot(index, mask, shift, key, r):
    _insert_hashed(index, mask, shift, fmix64(key ^ PROBE_SALT), r)


@njit(nogil=True, cache=True, inline="always")
def _insert_hashed(index, mask, shift, h, r):
    """Index row ``r`` of the key whose probe hash is ``h`` (not yet indexed)."""
    s = np.int64(h >> shift)
    while index[s] != EMPTY:
        s = (s + 1) & mask
    index[s] = make_entry(h, r)


@njit(nogil=True, cache=True)
def init_row(values, r, key, seed, kind, a, b):
    """Write the deterministic initial vector of ``key`` into ``values[r]``.

    Uniform: ``a + (b - a) * u_j``. Normal: ``a + b * sqrt(-2 ln(1 - u_2j)) * cos(2 pi u_2j+1)``
    (Box-Muller). ``u`` is the init stream of (key, seed).
    """
    base = stream_base(key, np.uint64(seed), INIT_SALT)
    dim = values.shape[1]
    if kind == INIT_UNIFORM:
        for j in range(dim):
            values[r, j] = a + (b - a) * stream_uniform(base, j)
    else:
        for j in range(dim):
            u1 = 1.0 - stream_uniform(base, 2 * j)
            u2 = stream_uniform(base, 2 * j + 1)
            values[r, j] = a + b * (math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))


@njit(nogil=True, cache=True, inline="always")
def _sketch_add(sketch, key):
    """Count one miss of ``key`` in the count-min sketch; returns the new estimate."""
    depth = sketch.shape[0]
    wmask = np.uint64(sketch.shape[1] - 1)
    est = np.int64(1) << 62
    for d in range(depth):
        h = mix_sm(key ^ (SKETCH_SALT + np.uint64(d) * GOLDEN)) & wmask
        c = sketch[d, h]
        if c < np.uint32(0xFFFFFFFF):
            c += np.uint32(1)
            sketch[d, h] = c
        if np.int64(c) < est:
            est = np.int64(c)
    return est


@njit(nogil=True, cache=True)
def sketch_add_kernel(sketch, keys, out):
    """Count a miss of every key in order; ``out[i]`` = estimate after counting key i."""
    for i in range(keys.shape[0]):
        out[i] = _sketch_add(sketch, keys[i])


@njit(nogil=True, cache=True)
def admit_draw(key, seed, count):
    """The admission draw (uniform in [0, 1)) of a key's ``count``-th training miss."""
    return stream_uniform(stream_base(key, np.uint64(seed), ADMIT_SALT), count)


@njit(nogil=True, cache=True, inline="always")
def _take_row(index, mask, shift, row_keys, lru_prev, lru_next, meta, capacity, alloc):
    """A row number for a new key: a fresh one, or the evicted oldest one; -1 = grow first."""
    nrows = meta[M_NROWS]
    if nrows < alloc:
        meta[M_NROWS] = nrows + 1
        return np.int32(nrows)
    if alloc < capacity:
        return np.int32(-1)
    r = np.int32(meta[M_HEAD])
    _unlink(lru_prev, lru_next, meta, r)
    delete_slot(index, shift, row_keys, _slot_of_row(index, mask, shift, row_keys, r))
    meta[M_EVICTIONS] += 1
    return r


@njit(nogil=True, cache=True)
def train_misses_kernel(
    keys, rows, made, start, index, shift, row_keys, lru_prev, lru_next, meta, capacity, seed,
    admit_p, min_count, sketch, use_sketch,
):  # fmt: skip
    """Training lookup, pass 3: for each key with ``rows[i] == -1`` from ``start`` on, in order,
    find it (it may have been created earlier in this batch) or, if admitted, create it: take a
    row (at capacity the oldest row is evicted and its row number reused), index it, link it as the
    newest. Values are written later by ``train_init_kernel``. ``made[i]``: -1 not admitted, -2
    found (created earlier in this batch), else the row created.

    Admission: the key's miss is counted in the sketch (estimate ``c``); it is admitted when
    ``c >= min_count`` and ``admit_draw(key, seed, c) < admit_p``.

    Returns ``n`` when done, or the position ``i`` to resume at after the arrays grew (the table is
    full of its allocation but below capacity).
    """
    mask = index.shape[0] - 1
    alloc = row_keys.shape[0]
    n = keys.shape[0]
    acc = 0
    for g0 in range(start, n, GROUP):
        g1 = min(n, g0 + GROUP)
        evict = meta[M_HEAD]
        full = meta[M_NROWS] == capacity
        for k in range(g0, g1):  # bring this group's home slots into the cache (independent
            if rows[k] < 0:  # prefetches: a dependent probe loop would stall on each miss)
                prefetch(index, home_slot(keys[k], shift))
                if full and evict >= 0:
                    # ... and the index slots of the rows that will be evicted
                    prefetch(index, home_slot(row_keys[evict], shift))
                    evict = lru_next[evict]
        for k in range(g0, g1):  # ... then the keys of the rows those slots hold
            if rows[k] < 0:
                r = entry_row(index[home_slot(keys[k], shift)])
                prefetch(row_keys, max(r, 0))  # no branch on a value still in flight
                acc += r
        meta[M_SCRATCH] = acc
        for i in range(g0, g1):
            if rows[i] >= 0:
                continue
            key = keys[i]
            r = find_row(index, mask, shift, row_keys, key)
            if r >= 0:
                made[i] = -2
                _touch(lru_prev, lru_next, meta, r)
                continue
            if meta[M_NROWS] == alloc and alloc < capacity:
                return i  # grow first: the miss is counted (once) when the key is retried
            meta[M_MISSES] += 1
            if use_sketch:
                c = _sketch_add(sketch, key)
                if not (c >= min_count and admit_draw(key, seed, c) < admit_p):
                    meta[M_REJECTIONS] += 1
                    made[i] = -1
                    continue
            r = _take_row(index, mask, shift, row_keys, lru_prev, lru_next, meta, capacity, alloc)
            meta[M_ADMISSIONS] += 1
            row_keys[r] = key
            _insert_slot(index, mask, shift, key, r)
            _push_tail(lru_prev, lru_next, meta, r)
            made[i] = r
    return n


@njit(nogil=True, cache=True)
def train_init_kernel(
    keys, rows, made, out, values, state, init_state, init_kind, init_a, init_b, seed
):  # fmt: skip
    """Training lookup, pass 4, in batch order: for every key missing before the batch, ``out[i]``
    = its initial vector (a row created in this batch still holds exactly that) or zeros when not
    admitted; created rows get their values and ``init_state`` (in order, so a row created twice
    in one batch ends with its last key's)."""
    dim = out.shape[1]
    width = state.shape[1]
    for i in range(keys.shape[0]):
        if rows[i] >= 0:
            continue
        m = made[i]
        if m == -1:
            for j in range(dim):
                out[i, j] = 0.0
            continue
        init_row(out, i, keys[i], seed, init_kind, init_a, init_b)
        if m == -2:  # a repeat of a key made earlier in this call: the row as stored
            round_row(values, out, i)
        if m >= 0:
            store_row(values, m, out, i)
            for j in range(width):
                state[m, j] = init_state[j]


@njit(nogil=True, cache=True)
def import_kernel(
    keys, in_values, in_state, start, index, shift, row_keys, values, state, lru_prev, lru_next,
    meta, capacity,
):  # fmt: skip
    """Insert or overwrite rows in order, each becoming the newest (no admission, no counters
    except evictions). Returns ``n`` when done or the position to resume at after growth."""
    mask = index.shape[0] - 1
    dim = values.shape[1]
    width = state.shape[1]
    alloc = values.shape[0]
    n = keys.shape[0]
    for i in range(start, n):
        key = keys[i]
        r = find_row(index, mask, shift, row_keys, key)
        if r >= 0:
            _touch(lru_prev, lru_next, meta, r)
        else:
            r = _take_row(index, mask, shift, row_keys, lru_prev, lru_next, meta, capacity, alloc)
            if r < 0:
                return i
            row_keys[r] = key
            _insert_slot(index, mask, shift, key, r)
            _push_tail(lru_prev, lru_next, meta, r)
        for j in range(dim):
            values[r, j] = in_values[i, j]
        for j in range(width):
            state[r, j] = in_state[i, j]
    return n


@njit(nogil=True, cache=True)
def rebuild_index_kernel(index, shift, row_keys, nrows):
    """Fill an all-empty ``index`` with rows ``0 .. nrows-1``."""
    mask = index.shape[0] - 1
    for r in range(nrows):
        _insert_slot(index, mask, shift, row_keys[r], np.int32(r))


@njit(nogil=True, cache=True)
def lru_order_kernel(lru_next, meta, out):
    """``out`` = live rows from oldest to newest; returns how many were written."""
    r = meta[M_HEAD]
    k = 0
    while r >= 0 and k < out.shape[0]:
        out[k] = r
        k += 1
        r = lru_next[r]
    return k


@njit(nogil=True, cache=True, inline="always")
def _move_row(index, mask, shift, row_keys, values, state, src, dst):
    """Move row ``src`` (key, values, state, index entry) into the free row ``dst``."""
    s = _slot_of_row(index, mask, shift, row_keys, src)
    index[s] = (index[s] & _HI32) | np.uint64(dst)
    row_keys[dst] = row_keys[src]
    for j in range(values.shape[1]):
        values[dst, j] = values[src, j]
    for j in range(state.shape[1]):
        state[dst, j] = state[src, j]


@njit(nogil=True, cache=True)
def stamps_below_kernel(lru_ts, nrows, threshold, out, out_ts):
    """The rows (in row order) of a stamped LRU whose stamp is below ``threshold``: the oldest
    ones, into ``out`` and their stamps into ``out_ts``. Returns how many, or -1 when more than
    ``out`` holds."""
    k = 0
    for r in range(nrows):
        t = lru_ts[r]
        if t < threshold:
            if k == out.shape[0]:
                return -1
            out[k] = r
            out_ts[k] = t
            k += 1
    return k


@njit(nogil=True, cache=True)
def spill_queue_kernel(queue, pos, need, top, lru_ts, cut, out):
    """From ``queue[pos]`` on: the first ``need`` rows still to spill (below ``top``, stamp at
    most ``cut``: not touched since they were queued) into ``out``. Returns how many, and the
    position after the last one looked at."""
    k = 0
    n = queue.shape[0]
    while pos < n and k < need:
        if pos + 16 < n:
            prefetch(lru_ts, max(queue[pos + 16], 0))
        r = queue[pos]
        pos += 1
        if r < top and lru_ts[r] <= cut:
            out[k] = r
            k += 1
    return k, pos


#: how many victims ahead ``evict_rows_hole_kernel`` prefetches
_EVICT_AHEAD = 8


@njit(nogil=True, cache=True)
def evict_rows_hole_kernel(victims, index, shift, row_keys, lru_ts, meta, holes):
    """Evict rows ``victims`` (distinct, not holes) of a table whose LRU is stamped, leaving
    holes: their index entries go, their stamps become ``HOLE_TS`` and their numbers are
    appended to ``holes`` (room for them; ``meta[M_HOLES]`` counts). No row moves: the next
    ``train_probe_create_kernel`` makes its rows in the holes, and ``fill_holes_kernel``
    closes the holes left. Returns the newest stamp a victim had (-1: none): what tells which
    rows may have changed (``EmbeddingTable.rows_kept_below``)."""
    mask = index.shape[0] - 1
    n = victims.shape[0]
    newest = np.int64(-1)
    for i in range(n):
        # hints for the victims further on: the key two steps ahead, then its index slot, then
        # the keys a deletion of that slot reads
        if i + 2 * _EVICT_AHEAD < n:
            prefetch(row_keys, victims[i + 2 * _EVICT_AHEAD])
        if i + _EVICT_AHEAD < n:
            prefetch(index, home_slot(row_keys[victims[i + _EVICT_AHEAD]], shift))
        if i + _EVICT_AHEAD // 2 < n:  # (its key and slot are in by now)
            v = victims[i + _EVICT_AHEAD // 2]
            prefetch_followers(index, mask, row_keys, _slot_of_row(index, mask, shift, row_keys, v))
        r = np.int32(victims[i])
        newest = max(newest, lru_ts[r])
        delete_slot(index, shift, row_keys, _slot_of_row(index, mask, shift, row_keys, r))
        lru_ts[r] = HOLE_TS
        holes[meta[M_HOLES]] = r
        meta[M_HOLES] += 1
        meta[M_EVICTIONS] += 1
    return newest


@njit(nogil=True, cache=True)
def fill_holes_kernel(holes, index, shift, row_keys, values, state, lru_ts, meta):
    """Close the holes ``holes[:meta[M_HOLES]]`` (sorted in place): the last rows move into
    the lowest holes (their stamps with them) until rows are dense again. Returns how many
    moved."""
    mask = index.shape[0] - 1
    h = holes[: meta[M_HOLES]]
    h.sort()
    i = 0
    j = h.shape[0] - 1
    moved = 0
    while i <= j:
        last = np.int32(meta[M_NROWS] - 1)
        if last == h[j]:  # the last row is a hole (the highest one left)
            j -= 1
        else:
            _move_row(index, mask, shift, row_keys, values, state, last, h[i])
            lru_ts[h[i]] = lru_ts[last]
            i += 1
            moved += 1
        meta[M_NROWS] = last
    meta[M_HOLES] = 0
    return moved


@njit(nogil=True, cache=True)
def evict_oldest_kernel(count, index, shift, row_keys, values, state, lru_prev, lru_next, meta):
    """Evict the ``count`` oldest rows and keep rows dense (the last row moves into each hole)."""
    mask = index.shape[0] - 1
    for _ in range(count):
        nrows = meta[M_NROWS]
        if nrows == 0:
            break
        r = np.int32(meta[M_HEAD])
        _unlink(lru_prev, lru_next, meta, r)
        delete_slot(index, shift, row_keys, _slot_of_row(index, mask, shift, row_keys, r))
        last = np.int32(nrows - 1)
        if r != last:
            _move_row(index, mask, shift, row_keys, values, state, last, r)
            p = lru_prev[last]
            nx = lru_next[last]
            lru_prev[r] = p
            lru_next[r] = nx
            if p >= 0:
                lru_next[p] = r
            else:
                meta[M_HEAD] = r
            if nx >= 0:
                lru_prev[nx] = r
            else:
                meta[M_TAIL] = r
        meta[M_NROWS] = nrows - 1
        meta[M_EVICTIONS] += 1
