"""The disk tier: rows evicted from a table's RAM kept on disk with their optimizer state.

One :class:`DiskTier` per table (one dim of one shard), in a directory of its own::

    tier.json   header: format, dim, the value and state dtypes and widths, record size, capacity
    tier.slab   fixed-size records, memory-mapped (a sparse file of ``capacity`` records)

A record is ``key u64 | seq u64 | check u32 | values | state`` (the raw bytes of
``values[row]`` and ``state[row]`` in the dtypes the header names; so a table of any value dtype
spills as it is). ``seq`` (0 = free) orders the records by time of spilling; the oldest are
dropped past ``capacity`` (counted: ``dropped``). The key index, a Bloom filter of the keys (a
lookup of a key never spilled skips the index), the LRU links and the free list live in RAM
(about 30 bytes per record) and are rebuilt from the slab when a tier is opened.

The tier is a spill area of a live table, not a durable copy: durability is the checkpoint's
(which copies the disk rows; it never points into these files). A record's seq is zeroed before
its bytes are rewritten and set after, and ``check`` covers the whole record, so a process killed
at any moment leaves records that are either valid or found invalid when the directory is opened
again: :meth:`DiskTier.open` validates every record and keeps the valid ones (a key met twice keeps
its newest), discarding the rest with a warning; a header that does not match the table's layout
(or is unreadable) discards the whole tier with a warning and starts it empty.

Not thread-safe: the table's shard holds the lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import mmap
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from persia._settings import disk_prefault_enabled
from persia.errors import StoreError
from persia.logger import get_default_logger
from persia.store.kernels import disk as D
from persia.store.kernels import table as K

__all__ = ["DiskTier", "DiskTierConfig"]

_FORMAT = "persia-disk-tier"
_VERSION = 2  # 2: the records' check over 32-bit words
_MAX_LOAD = 0.7
#: filter bits per index slot (>= 5.7 per record at the index's load of at most 0.7: 3-10% of the
#: keys not on disk pass it, for 0.6 to 1.2 bytes of RAM per record; 0.5 GiB at 6e8 disk rows)
_FILTER_BITS_PER_SLOT = 4
#: a read of a record slower than this (seconds, the recent average) waited for the device: the
#: page cache does not hold the tier, and a prefetch ahead of the lookups pays off (a page-cache
#: hit takes well under a microsecond; a random read of this disk about 120)
SLOW_READ_S = 5e-6
_READ_EMA = 0.2
_log = get_default_logger("persia.store.disk")
#: new slab pages are faulted in this far ahead of the records written (at least; twice the
#: last write when larger), on a background thread: the first write to a page of the file
#: costs the writer 1-20 us of kernel time on this machine, about 10 us on average
PREFAULT_BYTES = 4 << 20
#: the most slab bytes ``DiskTier.reserve`` faults in (per tier)
RESERVE_FAULT_BYTES = 1 << 30
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


class _Prefaulter:
    """One daemon thread that faults in slab pages ahead of the tiers' writes
    (``madvise(MADV_POPULATE_WRITE)``, the GIL released), so that a spill writes to pages already
    mapped. Off where the call is missing or refused (older kernels): then writes fault the pages
    in themselves, as without it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[DiskTier, int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.enabled = disk_prefault_enabled()
        self._madvise: Any = None
        if self.enabled:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                self._madvise = libc.madvise
                self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self._madvise.restype = ctypes.c_int
            except (OSError, AttributeError):
                self.enabled = False

    def request(self, tier: DiskTier, start: int, length: int) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="persia-disk-prefault", daemon=True
                    )
                    self._thread.start()
        self._queue.put((tier, start, length))

    def _loop(self) -> None:
        while True:
            self.populate(*self._queue.get())

    def populate(self, tier: DiskTier, start: int, length: int) -> None:
        """Fault in bytes ``[start, start + length)`` of ``tier``'s slab now, in this thread."""
        with tier._map_lock:  # the mapping stays while this runs
            if tier._closed or not self.enabled:
                return
            page = mmap.PAGESIZE
            lo = start - start % page
            rc = self._madvise(
                tier.slab.ctypes.data + lo, start + length - lo, _MADV_POPULATE_WRITE
            )
        if rc != 0:
            err = ctypes.get_errno()
            self.enabled = False
            _log.info("disk tier: prefaulting slab pages is off (madvise: %s)", os.strerror(err))

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread is not there (a new one starts on demand)."""
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._start_lock = threading.Lock()


_PREFAULT = _Prefaulter()
os.register_at_fork(after_in_child=_PREFAULT._after_fork)


class DiskTierConfig:
    """Where a shard's disk tier lives and how many rows it holds (all dims together).

    Args:
        directory: the shard's tier directory (created; one subdirectory per dim).
        capacity: the most rows on disk (> 0); past it the oldest are dropped.
    """

    __slots__ = ("directory", "capacity")

    def __init__(self, directory: str | os.PathLike[str], capacity: int) -> None:
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise StoreError(f"disk tier directory must be a non-empty path, got {directory!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise StoreError(f"disk tier capacity must be an int > 0, got {capacity!r}")
        if capacity <= 0 or capacity >= 2**31:
            raise StoreError(f"disk tier capacity must be an int in [1, 2**31), got {capacity}")
        self.directory = Path(directory)
        self.capacity = int(capacity)

    def __repr__(self) -> str:
        return f"DiskTierConfig({str(self.directory)!r}, {self.capacity})"


def _index_size(records: int) -> int:
    need = max(16, int(np.ceil(records / _MAX_LOAD)))
    return 1 << (need - 1).bit_length()


class DiskTier:
    """Rows of one table on disk (see the module docstring). Use :meth:`open`."""

    def __init__(
        self,
        directory: Path,
        capacity: int,
        dim: int,
        value_dtype: np.dtype,
        state_width: int,
        state_dtype: np.dtype,
    ) -> None:
        self.directory = directory
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.value_dtype = np.dtype(value_dtype)
        self.state_width = int(state_width)
        self.state_dtype = np.dtype(state_dtype)
        self.value_bytes = self.dim * self.value_dtype.itemsize
        self.state_bytes = self.state_width * self.state_dtype.itemsize
        payload = D.HEAD_BYTES + self.value_bytes + self.state_bytes
        self.record_size = (payload + 3) // 4 * 4
        self.bad_on_open = 0
        self._closed = True
        #: keys dropped past capacity since the last ``take_dropped`` (None: not recorded)
        self.dropped_keys: list[np.ndarray] | None = None
        #: recent seconds per record read (an average over reads; None before the first)
        self.read_s_per_record: float | None = None
        #: slab bytes asked to be faulted in ahead of the writes (``PREFAULT_BYTES``)
        self._faulted = 0
        self._map_lock = threading.Lock()

    # ----------------------------------------------------------------------------- files
    def _header(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "dim": self.dim,
            "value_dtype": self.value_dtype.str,
            "value_bytes": self.value_bytes,
            "state_width": self.state_width,
            "state_dtype": self.state_dtype.str,
            "state_bytes": self.state_bytes,
            "record_size": self.record_size,
            "capacity": self.capacity,
        }

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        capacity: int,
        dim: int,
        value_dtype: Any,
        state_width: int,
        state_dtype: Any = np.float32,
        wipe: bool = False,
    ) -> DiskTier:
        """The tier in ``directory`` (created if absent; ``wipe``: emptied first).

        An existing tier is validated: its header must match this layout (else it is discarded
        with a warning) and every record its check (bad ones are discarded with a warning).
        """
        tier = cls(Path(directory), capacity, dim, value_dtype, state_width, state_dtype)
        tier._open(wipe)
        return tier

    def _open(self, wipe: bool) -> None:
        d = self.directory
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"disk tier directory {str(d)!r} cannot be used: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise StoreError(
                f"disk tier directory {str(d)!r} is in use by another table (one per table)"
            ) from exc
        header_path, slab_path = d / "tier.json", d / "tier.slab"
        keep = False
        if not wipe and slab_path.exists():
            try:
                old = json.loads(header_path.read_text())
            except (OSError, ValueError) as exc:
                _log.warning("disk tier %s: unreadable header (%s): starting it empty", d, exc)
            else:
                mine = self._header()
                old_cap = old.get("capacity") if isinstance(old, dict) else None
                same = isinstance(old, dict) and all(
                    old.get(k) == v for k, v in mine.items() if k != "capacity"
                )
                if same and isinstance(old_cap, int) and old_cap > 0:
                    keep = True
                else:
                    _log.warning(
                        "disk tier %s: its header %s does not match this table's %s: "
                        "starting it empty",
                        d, old, mine,
                    )  # fmt: skip
        if not keep:
            for p in (header_path, slab_path):
                p.unlink(missing_ok=True)
        tmp = d / "tier.json.tmp"
        tmp.write_text(json.dumps(self._header()))
        os.replace(tmp, header_path)
        fd = os.open(slab_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            old_size = os.fstat(fd).st_size
            old_records = old_size // self.record_size
            size = max(self.capacity, old_records, 1) * self.record_size
            if size != old_size:
                os.ftruncate(fd, size)  # sparse: blocks are taken as records are written
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots = size // self.record_size
        self.slab = np.frombuffer(self._mmap, dtype=np.uint8).reshape(self._slots, self.record_size)
        self.keys = np.zeros(self._slots, dtype=np.uint64)
        # written before they are read (a record's links when it is linked): pages are taken
        # as records are used
        self.prev = np.empty(self._slots, dtype=np.int32)
        self.nxt = np.empty(self._slots, dtype=np.int32)
        self.meta = np.zeros(D.D_META_LEN, dtype=np.int64)
        self.meta[K.M_HEAD] = -1
        self.meta[K.M_TAIL] = -1
        self.meta[D.D_FREE] = -1
        self._set_index(_index_size(min(self._slots, 1 << 16)))
        self._closed = False
        if keep and old_records:
            self._rebuild(old_records)

    def _set_index(self, size: int) -> None:
        self.index = np.full(size, K.EMPTY, dtype=np.uint64)
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        self.filter = np.zeros(max(1, size * _FILTER_BITS_PER_SLOT // 64), dtype=np.uint64)

    def _build_filter(self) -> None:
        """Rebuild the key filter from the index (drops the bits of records freed since)."""
        self.filter.fill(0)
        D.filter_build_kernel(self.filter, self.index, self.keys)
        self.meta[D.D_STALE] = 0

    def _rebuild(self, nrec: int) -> None:
        payload = self.value_bytes + self.state_bytes
        seqs = np.empty(nrec, dtype=np.uint64)
        ok = np.empty(nrec, dtype=np.bool_)
        bad = int(D.scan_kernel(self.slab, nrec, payload, seqs, ok))
        if bad:
            D.mark_free_kernel(np.flatnonzero(~ok & (seqs != 0)).astype(np.int64), self.slab)
        live = np.flatnonzero(ok)
        order = live[np.argsort(seqs[live], kind="stable")]
        if order.size > self.capacity:  # a smaller capacity now: the newest are kept
            D.mark_free_kernel(order[: order.size - self.capacity].astype(np.int64), self.slab)
            order = order[order.size - self.capacity :]
        if order.size > 0.6 * self.index.shape[0]:
            self._set_index(_index_size(order.size))
        dup = int(
            D.rebuild_kernel(
                order.astype(np.int64), self.slab, self.index, self._shift, self.keys,
                self.prev, self.nxt, self.meta,
            )
        )  # fmt: skip
        self._build_filter()
        hwm = int(order.max()) + 1 if order.size else 0
        self.meta[D.D_HWM] = hwm
        self.meta[D.D_SEQ] = int(seqs.max()) if nrec else 0
        D.free_list_kernel(self.slab, hwm, self.nxt, self.meta)
        self.bad_on_open = bad
        if bad:
            _log.warning(
                "disk tier %s: %d torn or corrupt record(s) discarded on open; %d kept",
                self.directory, bad, self.rows,
            )  # fmt: skip
        elif dup:
            _log.info("disk tier %s: %d stale duplicate record(s) freed", self.directory, dup)

    def close(self, remove: bool = False) -> None:
        """Unmap and unlock (``remove``: delete the directory too). Idempotent."""
        if self._closed:
            return
        with self._map_lock:  # no prefault runs on the mapping from now on
            self._closed = True
        self.slab = np.zeros((0, self.record_size), dtype=np.uint8)
        try:
            self._mmap.close()
        except BufferError:  # a view still exported: the mapping goes with the last view
            pass
        os.close(self._lock_fd)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __getstate__(self) -> dict[str, Any]:
        raise StoreError(
            "a table with a disk tier cannot be pickled (its rows live in files); "
            "write a checkpoint instead"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"disk tier {str(self.directory)!r} is closed")

    # ----------------------------------------------------------------------------- rows
    @property
    def rows(self) -> int:
        """Live records."""
        return int(self.meta[K.M_NROWS])

    @property
    def dropped(self) -> int:
        """Records dropped past capacity (the oldest) since the tier was opened."""
        return int(self.meta[D.D_DROPPED])

    @property
    def disk_bytes(self) -> int:
        """Bytes of the records ever used (the slab is sparse beyond them)."""
        return int(self.meta[D.D_HWM]) * self.record_size

    @property
    def ram_bytes(self) -> int:
        """Bytes of the in-RAM index, key filter, keys and links."""
        return (
            self.index.nbytes + self.filter.nbytes + self.keys.nbytes + self.prev.nbytes
            + self.nxt.nbytes
        )  # fmt: skip

    def reserve(self, records: int) -> None:
        """Size the index (and key filter) for ``min(records, capacity)`` records now, so that
        writes up to that many do not rebuild it; and fault in the slab pages of the first of
        those records past the used ones (at most ``RESERVE_FAULT_BYTES``), as a table's reserve
        touches its rows' pages, so that the writes that follow find them mapped."""
        self._check_open()
        records = min(self._slots, max(1, int(records)))
        size = _index_size(records)
        if size > self.index.shape[0]:
            self._reindex(size)
        span = self._fault_span(min(records * self.record_size, RESERVE_FAULT_BYTES))
        if span is not None:
            _PREFAULT.populate(self, *span)

    def _fault_span(self, ahead: int, slack: int = 0) -> tuple[int, int] | None:
        """The slab bytes ``(start, length)`` to fault in so that the ``ahead`` bytes past the
        used records are (marked as asked for), or None: prefaulting off, or at least
        ``ahead - slack`` of them asked for already."""
        if not _PREFAULT.enabled:
            return None
        used = int(self.meta[D.D_HWM]) * self.record_size
        end = min(used + ahead, self.slab.shape[0] * self.record_size)
        if self._faulted - used >= ahead - slack or end <= self._faulted:
            return None
        start = max(self._faulted, used)
        self._faulted = end
        return start, end - start

    def _reindex(self, size: int) -> None:
        old = self.index
        self._set_index(size)
        D.reindex_kernel(old, self.index, self._shift, self.keys, self.filter)
        self.meta[D.D_STALE] = 0

    def _grow_index(self, more: int) -> None:
        need = self.rows + more
        if need > _MAX_LOAD * self.index.shape[0] and self.index.shape[0] < _index_size(
            self._slots
        ):
            self._reindex(_index_size(min(self._slots, max(need, 2 * self.rows))))
        elif self.meta[D.D_STALE] > max(self.rows, 1 << 16):
            # more freed records' bits than live ones': the filter passes too many keys
            self._build_filter()

    def put(self, keys: np.ndarray, values: np.ndarray, state: np.ndarray) -> None:
        """Write rows (``values`` in the value dtype, ``state`` in the state dtype) in order,
        each the newest on disk; past capacity the oldest are dropped."""
        self._check_open()
        n = keys.shape[0]
        if n == 0:
            return
        vals = np.ascontiguousarray(values, dtype=self.value_dtype).reshape(n, self.dim)
        st = np.ascontiguousarray(state, dtype=self.state_dtype).reshape(n, self.state_width)
        self._put(keys, np.arange(n, dtype=np.int64), vals, st)

    def put_rows(
        self, keys: np.ndarray, rows: np.ndarray, values: np.ndarray, state: np.ndarray
    ) -> None:
        """:meth:`put` of rows ``rows`` (distinct, in that order) of a table's arrays: ``keys``
        (u64), ``values`` and ``state`` (2-D, C order, in the tier's dtypes), without copies."""
        self._check_open()
        self._check_dtypes("put_rows", values, state)
        if rows.shape[0]:
            self._put(keys, rows, values, state)

    def _put(
        self, keys: np.ndarray, src: np.ndarray, values: np.ndarray, state: np.ndarray
    ) -> None:
        n = src.shape[0]
        self._grow_index(n)
        if self.dropped_keys is not None:  # the oldest records this write will drop
            new = int((self.find(np.unique(keys[src])) < 0).sum())
            drop = min(self.rows, self.rows + new - self.capacity)
            if drop > 0:  # (a superset: a key of this write may be dropped and written again)
                out = np.empty(drop, dtype=np.int32)
                out = out[: K.lru_order_kernel(self.nxt, self.meta, out)]
                self.dropped_keys.append(self.keys[out].copy())
        D.put_kernel(
            keys, src, values.view(np.uint8).reshape(values.shape[0], self.value_bytes),
            state.view(np.uint8).reshape(state.shape[0], self.state_bytes), self.slab,
            self.index, self._shift, self.keys, self.prev, self.nxt, self.meta, self.capacity,
            self.filter,
        )  # fmt: skip
        self._prefault(n)

    def _prefault(self, n: int) -> None:
        """After a write of ``n`` records: have the pages past the used records faulted in ahead
        of the next writes, on the prefault thread (asked again once half of them are used)."""
        ahead = max(PREFAULT_BYTES, 2 * n * self.record_size)
        span = self._fault_span(ahead, slack=ahead - ahead // 2)
        if span is not None:
            _PREFAULT.request(self, *span)

    def take_dropped(self) -> np.ndarray:
        """The keys dropped past capacity since the last call (possibly some written again
        since: check), and start recording them if not yet."""
        parts, self.dropped_keys = self.dropped_keys, []
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return np.unique(np.concatenate(parts))

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The record of every key (i32, -1 = not on disk)."""
        self._check_open()
        out = np.empty(keys.shape[0], dtype=np.int32)
        if self.rows:
            D.find_kernel(keys, self.index, self._shift, self.keys, out, self.filter)
        else:
            out.fill(-1)
        return out

    def might_hold(self, keys: np.ndarray) -> np.ndarray:
        """The key filter's answer for every key (bool): False = surely not on disk; True = on
        disk, or (a few percent of the others) not."""
        self._check_open()
        out = np.empty(keys.shape[0], dtype=np.bool_)
        D.filter_test_kernel(keys, self.filter, out)
        return out

    def read(self, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(values, state)`` of records ``recs`` (-1: zeros), in the header's dtypes."""
        self._check_open()
        n = recs.shape[0]
        vals = np.zeros((n, self.dim), dtype=self.value_dtype)
        st = np.zeros((n, self.state_width), dtype=self.state_dtype)
        t0 = time.perf_counter()
        bad = D.read_kernel(
            recs, self.slab, vals.view(np.uint8).reshape(n, self.value_bytes),
            st.view(np.uint8).reshape(n, self.state_bytes), self.meta,
        )  # fmt: skip
        if n:
            self._note_read_time((time.perf_counter() - t0) / n)
        self.check_bad(bad)
        return vals, st

    def take_into(
        self, keys: np.ndarray, dst: np.ndarray, values: np.ndarray, state: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """Move the rows of ``keys`` held on disk into RAM arrays: for every ``i`` with
        ``dst[i] >= 0`` whose key is on disk, ``values[dst[i]]`` and ``state[dst[i]]`` (2-D, C
        order, in the header's dtypes) get its row, and the record leaves the disk. Returns
        those ``i`` (ascending), and how many records failed their check: ``(taken, bad)``.
        One pass: find, read and free together. A record that fails its check is left on disk
        and its row unwritten; the caller raises (:meth:`check_bad`) once its own work on the
        rows is done."""
        self._check_open()
        n = keys.shape[0]
        if n == 0 or not self.rows:
            return np.zeros(0, dtype=np.int64), 0
        self._check_dtypes("take_into", values, state)
        taken = np.empty(n, dtype=np.int64)
        t0 = time.perf_counter()
        k, bad = D.take_kernel(
            keys, dst, values.view(np.uint8).reshape(values.shape[0], self.value_bytes),
            state.view(np.uint8).reshape(state.shape[0], self.state_bytes), self.slab,
            self.index, self._shift, self.keys, self.prev, self.nxt, self.meta, self.filter,
            taken,
        )  # fmt: skip
        if k:
            self._note_read_time((time.perf_counter() - t0) / k)
        return taken[:k], int(bad)

    def _check_dtypes(self, what: str, values: np.ndarray, state: np.ndarray) -> None:
        if values.dtype != self.value_dtype or state.dtype != self.state_dtype:
            raise StoreError(
                f"{what}: arrays of {values.dtype}/{state.dtype}, the tier holds "
                f"{self.value_dtype}/{self.state_dtype}"
            )

    def check_bad(self, bad: int) -> None:
        """Raise the ``StoreError`` of ``bad`` records that failed their check (none: nothing)."""
        if bad:
            raise StoreError(
                f"disk tier {str(self.directory)!r}: {bad} record(s) fail their check "
                "(the file was changed under the running table)"
            )

    def _note_read_time(self, per: float) -> None:
        last = self.read_s_per_record
        self.read_s_per_record = per if last is None else last + _READ_EMA * (per - last)

    def remove(self, recs: np.ndarray) -> int:
        """Free records ``recs`` (-1 and repeats ignored); returns how many."""
        self._check_open()
        return int(
            D.remove_kernel(
                recs, self.slab, self.index, self._shift, self.keys, self.prev, self.nxt,
                self.meta,
            )
        )  # fmt: skip

    def remove_keys(self, keys: np.ndarray) -> int:
        """Free the records of ``keys`` held on disk; returns how many."""
        if not self.rows or keys.size == 0:
            return 0
        return self.remove(self.find(keys))

    def order(self) -> np.ndarray:
        """Live records, oldest first."""
        out = np.empty(self.rows, dtype=np.int32)
        k = K.lru_order_kernel(self.nxt, self.meta, out)
        return out[:k]

    def export(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of every disk row, oldest first: ``(keys, values, state)``."""
        recs = self.order()
        vals, st = self.read(recs)
        return self.keys[recs].copy(), vals, st

    def clear(self) -> None:
        """Drop every record."""
        if self.rows:
            self.remove(self.order())

    @property
    def reads_wait(self) -> bool:
        """Whether reads of this tier wait for the device (their recent average is slower than
        ``SLOW_READ_S`` per record), or nothing was read yet: then a prefetch pays off; when the
        page cache holds the records, the lookup reads them as fast as a prefetch would."""
        per = self.read_s_per_record
        return per is None or per > SLOW_READ_S

    def drop_cache(self) -> None:
        """Evict the slab's pages from the page cache (for cold-cache measurements)."""
        self._mmap.flush()  # dirty pages are not dropped
        self._mmap.madvise(mmap.MADV_DONTNEED)  # nor pages this process still maps
        fd = os.open(self.directory / "tier.slab", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def stats(self) -> dict[str, int]:
        return {
            "disk_rows": self.rows,
            "disk_capacity": self.capacity,
            "disk_dropped": self.dropped,
            "disk_writes": int(self.meta[D.D_WRITES]),
            "disk_reads": int(self.meta[D.D_READS]),
            "disk_bytes": self.disk_bytes,
            "disk_ram_bytes": self.ram_bytes,
        }
