"""numba kernels of the disk tier (``persia.store.disk.DiskTier``): fixed-size records in one
memory-mapped slab file, an in-RAM key index, an LRU list of the records (oldest spilled first)
and a free list.

State (plain arrays):

* ``slab u8[C, rec]``: the slab file, record ``i`` at byte ``i * rec``. A record is
  ``key u64 | seq u64 | check u32 | value bytes | state bytes | padding`` (little endian);
  ``seq == 0`` marks a free record. ``check`` is :func:`record_check` of the key, the seq and the
  payload, so a record torn by a kill is found on the next open.
* ``keys u64[C]``: the key of every live record (what the index compares).
* ``index u64[S]``, ``shift``: the table's open-addressing index (``persia.store.kernels.table``:
  same entries, same probe hash), here over record numbers.
* ``prev / nxt i32[C]``: the LRU list of live records, oldest (``meta[M_HEAD]``) to newest; a
  free record's ``nxt`` links the free list (``meta[D_FREE]``).
* ``filt u64[W]``: a blocked Bloom filter of the live records' keys (two bits of one 64-bit
  word per key, from the probe hash), so that the lookup of a key never spilled, the common case,
  is answered without touching the (large) index. A key's bits are set when its record is
  written; freeing a record leaves them (``meta[D_STALE]`` counts those), and
  :func:`filter_build_kernel` rebuilds the filter from the index.
* ``meta i64[D_META_LEN]``: live count, head, tail (the table's ``M_*`` slots, so the table's
  list helpers work on it), records dropped past capacity, the free list, the high-water mark,
  the last seq, writes, reads, records freed since the filter was built.
"""

import numpy as np
from numba import njit

from persia.embedding.kernels import prefetch, prefetch_at
from persia.store.kernels.table import (
    GOLDEN,
    GROUP,
    M_HEAD,
    M_NROWS,
    PROBE_SALT,
    _insert_hashed,
    _insert_slot,
    _push_tail,
    _slot_of_row,
    _unlink,
    delete_slot,
    entry_row,
    find_row,
    find_slot,
    fmix64,
    mix_sm,
    prefetch_followers,
    scan_tag,
)

#: meta layout (the first three as the table's)
D_DROPPED = 3  # live records dropped past capacity (the oldest)
D_FREE = 4  # head of the free list (-1: none)
D_HWM = 5  # records ever used (the slab's used prefix)
D_SEQ = 6  # last seq written
D_WRITES = 7
D_READS = 8
D_STALE = 9  # records freed since the filter was built (their bits stay set)
D_META_LEN = 10

#: header bytes of a record: key, seq, check
HEAD_BYTES = 20

_FNV = np.uint64(0x100000001B3)
_U8 = np.uint64(8)
_U32 = np.uint64(32)
_B = np.uint64(0xFF)
_LO32 = np.uint64(0xFFFFFFFF)
_U6 = np.uint64(6)
_U12 = np.uint64(12)
_B63 = np.uint64(63)
_ONE = np.uint64(1)
#: how many rows ahead ``put_kernel`` prefetches
_AHEAD = 16


@njit(nogil=True, cache=True, inline="always")
def _get_u64(slab, r, off):
    v = np.uint64(0)
    for b in range(8):
        v |= np.uint64(slab[r, off + b]) << np.uint64(8 * b)
    return v


@njit(nogil=True, cache=True, inline="always")
def _put_u64(slab, r, off, v):
    for b in range(8):
        slab[r, off + b] = np.uint8((v >> np.uint64(8 * b)) & _B)


@njit(nogil=True, cache=True, inline="always")
def _put_u32(slab, r, off, v):
    for b in range(4):
        slab[r, off + b] = np.uint8((v >> np.uint64(8 * b)) & _B)


@njit(nogil=True, cache=True, inline="always")
def _get_u32(slab, r, off):
    v = np.uint64(0)
    for b in range(4):
        v |= np.uint64(slab[r, off + b]) << np.uint64(8 * b)
    return v


@njit(nogil=True, cache=True)
def record_check(slab, r, payload):
    """The check value (u32) of record ``r``: FNV-1a over its payload's 32-bit little-endian
    words (then its last bytes, when the payload is not a multiple of 4), seeded with the key and
    the seq, finished with SplitMix64's finaliser. (Words, not bytes: a quarter of the serial
    multiplies; format version 2.)"""
    h = mix_sm(_get_u64(slab, r, 0) ^ (_get_u64(slab, r, 8) * GOLDEN))
    words = payload // 4
    for w in range(words):
        h = (h ^ _get_u32(slab, r, HEAD_BYTES + 4 * w)) * _FNV
    for b in range(HEAD_BYTES + 4 * words, HEAD_BYTES + payload):
        h = (h ^ np.uint64(slab[r, b])) * _FNV
    return mix_sm(h) & _LO32


@njit(nogil=True, cache=True, inline="always")
def _filter_bits(h):
    return (_ONE << (h & _B63)) | (_ONE << ((h >> _U6) & _B63))


@njit(nogil=True, cache=True, inline="always")
def _filter_add(filt, h):
    """Set the bits of the key whose probe hash is ``h``."""
    w = np.int64((h >> _U12) & np.uint64(filt.shape[0] - 1))
    filt[w] |= _filter_bits(h)


@njit(nogil=True, cache=True, inline="always")
def _filter_has(filt, h):
    bits = _filter_bits(h)
    return filt[np.int64((h >> _U12) & np.uint64(filt.shape[0] - 1))] & bits == bits


@njit(nogil=True, cache=True, inline="always")
def _find_filtered(index, mask, shift, keys, filt, key):
    """The record of ``key`` or -1; a key the filter rules out is not looked for in the index."""
    h = fmix64(key ^ PROBE_SALT)
    if not _filter_has(filt, h):
        return np.int32(-1)
    return entry_row(index[find_slot(index, mask, np.int64(h >> shift), h << _U32, keys, key)])


@njit(nogil=True, cache=True)
def filter_test_kernel(in_keys, filt, out):
    """``out[i]``: whether the filter passes ``in_keys[i]`` (False: surely not on disk)."""
    for i in range(in_keys.shape[0]):
        out[i] = _filter_has(filt, fmix64(in_keys[i] ^ PROBE_SALT))


@njit(nogil=True, cache=True)
def filter_build_kernel(filt, index, keys):
    """Fill an all-zero ``filt`` with the keys of the records ``index`` holds."""
    for s in range(index.shape[0]):
        r = entry_row(index[s])
        if r >= 0:
            _filter_add(filt, fmix64(keys[r] ^ PROBE_SALT))


@njit(nogil=True, cache=True)
def reindex_kernel(old, index, shift, keys, filt):
    """Index (in the empty ``index``) and filter (the all-zero ``filt``) the records ``old``
    indexes. One pass over ``old`` in slot order: its entries come in the order of their keys'
    probe hashes, so the new index fills nearly in order too (no walk of the LRU list, whose
    links are one dependent cache miss per record)."""
    mask = index.shape[0] - 1
    for s in range(old.shape[0]):
        r = entry_row(old[s])
        if r >= 0:
            h = fmix64(keys[r] ^ PROBE_SALT)
            _insert_hashed(index, mask, shift, h, r)
            _filter_add(filt, h)


@njit(nogil=True, cache=True, inline="always")
def _free_record(slab, index, shift, keys, prev, nxt, meta, r):
    """Unindex, unlink and free live record ``r`` (its seq on disk becomes 0)."""
    mask = index.shape[0] - 1
    delete_slot(index, shift, keys, _slot_of_row(index, mask, shift, keys, r))
    _unlink(prev, nxt, meta, r)
    _put_u64(slab, r, 8, np.uint64(0))
    nxt[r] = meta[D_FREE]
    prev[r] = -1
    meta[D_FREE] = r
    meta[M_NROWS] -= 1
    meta[D_STALE] += 1


@njit(nogil=True, cache=True)
def put_kernel(
    in_keys, src, in_vals, in_state, slab, index, shift, keys, prev, nxt, meta, capacity, filt
):
    """Write rows ``src[i]`` of ``in_keys`` / ``in_vals u8[R, vb]`` / ``in_state u8[R, sb]``
    (their raw bytes) in the order of ``src``, each the newest record; a key already held is
    overwritten in place. Past ``capacity`` live records the oldest is dropped (counted in
    ``meta[D_DROPPED]``). (``src`` lets a table spill its rows straight from its arrays.)"""
    mask = index.shape[0] - 1
    vb = in_vals.shape[1]
    sb = in_state.shape[1]
    payload = vb + sb
    n = src.shape[0]
    fmask = np.uint64(filt.shape[0] - 1)
    for i in range(n):
        # hints: the key of a row further on, then its index slot, filter word and payload
        if i + 2 * _AHEAD < n:
            prefetch(in_keys, src[i + 2 * _AHEAD])
        if i + _AHEAD < n:
            a = src[i + _AHEAD]
            ha = fmix64(in_keys[a] ^ PROBE_SALT)
            prefetch(index, np.int64(ha >> shift))
            prefetch(filt, np.int64((ha >> _U12) & fmask))
            prefetch(in_vals, a)
            prefetch(in_state, a)
        j = src[i]
        key = in_keys[j]
        h = fmix64(key ^ PROBE_SALT)  # once for the index, the insert and the filter
        r = entry_row(index[find_slot(index, mask, np.int64(h >> shift), h << _U32, keys, key)])
        if r >= 0:
            _unlink(prev, nxt, meta, r)
        else:
            if meta[M_NROWS] >= capacity:
                _free_record(slab, index, shift, keys, prev, nxt, meta, np.int32(meta[M_HEAD]))
                meta[D_DROPPED] += 1
            if meta[D_FREE] >= 0:
                r = np.int32(meta[D_FREE])
                f = nxt[r]
                meta[D_FREE] = f
                if f >= 0:  # the record the next new key takes (freed anywhere)
                    for b in range(0, slab.shape[1], 64):
                        prefetch_at(slab, f, b)
                    prefetch(nxt, f)
            else:
                r = np.int32(meta[D_HWM])
                meta[D_HWM] += 1
            keys[r] = key
            _insert_hashed(index, mask, shift, h, r)
            _filter_add(filt, h)
            meta[M_NROWS] += 1
        _put_u64(slab, r, 8, np.uint64(0))  # free while torn: a kill now leaves no bad record
        for b in range(vb):
            slab[r, HEAD_BYTES + b] = in_vals[j, b]
        for b in range(sb):
            slab[r, HEAD_BYTES + vb + b] = in_state[j, b]
        _put_u64(slab, r, 0, key)
        meta[D_SEQ] += 1
        _put_u64(slab, r, 8, np.uint64(meta[D_SEQ]))
        _put_u32(slab, r, 16, record_check(slab, r, payload))
        _push_tail(prev, nxt, meta, r)
        meta[D_WRITES] += 1


@njit(nogil=True, cache=True)
def find_kernel(in_keys, index, shift, keys, out, filt):
    """``out[i]`` = record of ``in_keys[i]`` or -1; returns how many were found. A key the
    filter rules out is not looked for in the index."""
    mask = index.shape[0] - 1
    found = 0
    for i in range(in_keys.shape[0]):
        r = _find_filtered(index, mask, shift, keys, filt, in_keys[i])
        out[i] = r
        if r >= 0:
            found += 1
    return found


@njit(nogil=True, cache=True, inline="always")
def _copy_out(slab, r, out_vals, out_state, d, meta):
    """Copy record ``r``'s payload into row ``d`` of ``out_vals`` / ``out_state`` if it passes
    its check; returns whether it did."""
    vb = out_vals.shape[1]
    sb = out_state.shape[1]
    if record_check(slab, r, vb + sb) != _get_u32(slab, r, 16):
        return False
    for b in range(vb):
        out_vals[d, b] = slab[r, HEAD_BYTES + b]
    for b in range(sb):
        out_state[d, b] = slab[r, HEAD_BYTES + vb + b]
    meta[D_READS] += 1
    return True


@njit(nogil=True, cache=True)
def read_kernel(recs, slab, out_vals, out_state, meta):
    """Copy the payload of records ``recs[i] >= 0`` into ``out_vals[i]`` / ``out_state[i]`` (raw
    bytes). Returns how many records failed their check (their rows are left unwritten)."""
    bad = 0
    for i in range(recs.shape[0]):
        r = recs[i]
        if r >= 0 and not _copy_out(slab, r, out_vals, out_state, i, meta):
            bad += 1
    return bad


@njit(nogil=True, cache=True)
def take_kernel(
    in_keys, dst, out_vals, out_state, slab, index, shift, keys, prev, nxt, meta, filt, taken
):
    """For every ``i`` with ``dst[i] >= 0`` whose key is on disk: copy its record's payload into
    row ``dst[i]`` of ``out_vals u8[R, vb]`` / ``out_state u8[R, sb]`` (raw bytes), free the
    record and note ``i`` in ``taken``. Returns ``(taken, bad)``: how many, and how many records
    failed their check (left on disk, their rows unwritten).

    By groups of the keys the filter passes, so that their cache misses overlap: prefetch the
    home slots; scan them for the tags and prefetch the candidate records' keys; confirm the keys
    and prefetch the records and their links; then copy and free."""
    mask = index.shape[0] - 1
    n = in_keys.shape[0]
    rec = slab.shape[1]
    cand = np.empty(GROUP, dtype=np.int64)
    slots = np.empty(GROUP, dtype=np.int64)
    tags = np.empty(GROUP, dtype=np.uint64)
    recs = np.empty(GROUP, dtype=np.int32)
    k = 0
    bad = 0
    i = 0
    while i < n:
        c = 0
        while i < n and c < GROUP:
            if dst[i] >= 0:
                h = fmix64(in_keys[i] ^ PROBE_SALT)
                if _filter_has(filt, h):
                    s = np.int64(h >> shift)
                    cand[c] = i
                    slots[c] = s
                    tags[c] = h << _U32
                    prefetch(index, s)
                    c += 1
            i += 1
        for j in range(c):
            prefetch(keys, max(entry_row(index[scan_tag(index, mask, slots[j], tags[j])]), 0))
        for j in range(c):
            s = find_slot(index, mask, slots[j], tags[j], keys, in_keys[cand[j]])
            r = entry_row(index[s])
            recs[j] = r
            if r >= 0:
                for b in range(0, rec, 64):
                    prefetch_at(slab, r, b)
                prefetch(prev, r)
                prefetch(nxt, r)
                prefetch_followers(index, mask, keys, s)
        for j in range(c):  # what freeing the records reads: their neighbours' links
            r = recs[j]
            if r >= 0:
                prefetch(nxt, max(prev[r], 0))
                prefetch(prev, max(nxt[r], 0))
        for j in range(c):
            r = recs[j]
            if r < 0 or _get_u64(slab, r, 8) == np.uint64(0):  # (a repeat freed it already)
                continue
            if not _copy_out(slab, r, out_vals, out_state, dst[cand[j]], meta):
                bad += 1
                continue
            _free_record(slab, index, shift, keys, prev, nxt, meta, r)
            taken[k] = cand[j]
            k += 1
    return k, bad


@njit(nogil=True, cache=True)
def remove_kernel(recs, slab, index, shift, keys, prev, nxt, meta):
    """Free the live records ``recs[i] >= 0`` (repeats are ignored); returns how many."""
    done = 0
    for i in range(recs.shape[0]):
        r = recs[i]
        if r < 0 or _get_u64(slab, r, 8) == np.uint64(0):
            continue
        _free_record(slab, index, shift, keys, prev, nxt, meta, np.int32(r))
        done += 1
    return done


@njit(nogil=True, cache=True)
def scan_kernel(slab, nrec, payload, seqs, ok):
    """Open: ``seqs[r]`` = the seq of each of the first ``nrec`` records, ``ok[r]`` whether it
    is live and passes its check. Returns how many live records failed it."""
    bad = 0
    for r in range(nrec):
        s = _get_u64(slab, r, 8)
        seqs[r] = s
        if s == np.uint64(0):
            ok[r] = False
        elif record_check(slab, r, payload) == _get_u32(slab, r, 16):
            ok[r] = True
        else:
            ok[r] = False
            bad += 1
    return bad


@njit(nogil=True, cache=True)
def rebuild_kernel(order, slab, index, shift, keys, prev, nxt, meta):
    """Open: index and link the valid records ``order`` (oldest seq first); a key met twice
    keeps its newest record (the older one is freed). Returns the records freed so."""
    mask = index.shape[0] - 1
    dup = 0
    for j in range(order.shape[0]):
        r = np.int32(order[j])
        key = _get_u64(slab, r, 0)
        old = find_row(index, mask, shift, keys, key)
        if old >= 0:
            _free_record(slab, index, shift, keys, prev, nxt, meta, old)
            dup += 1
        keys[r] = key
        _insert_slot(index, mask, shift, key, r)
        _push_tail(prev, nxt, meta, r)
        meta[M_NROWS] += 1
    return dup


@njit(nogil=True, cache=True)
def free_list_kernel(slab, hwm, nxt, meta):
    """Open: chain every record below ``hwm`` whose seq is 0 into the free list."""
    for r in range(hwm - 1, -1, -1):
        if _get_u64(slab, r, 8) == np.uint64(0):
            nxt[r] = meta[D_FREE]
            meta[D_FREE] = r


@njit(nogil=True, cache=True)
def mark_free_kernel(recs, slab):
    """Set the seq of records ``recs`` to 0 (bad records found on open)."""
    for i in range(recs.shape[0]):
        _put_u64(slab, recs[i], 8, np.uint64(0))
