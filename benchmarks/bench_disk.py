"""Disk-tier storage benchmark: persia's memory-mapped slab (``persia.store.disk.DiskTier``)
against embedded key-value stores, and this disk's random-read IOPS.

    python benchmarks/bench_disk.py --quick      # CI: 20k records, a few seconds
    python benchmarks/bench_disk.py              # 2M records per size (~1 GB of files)

For each record size (44 and 80 bytes: key + row bytes) and each store (``slab``; ``lmdb`` and
``rocksdict`` when installed: the ``bench`` extra, else a ``skipped`` line), one JSON line per
metric: ``write_records_per_s`` (``--records`` random keys written in batches of ``--batch``),
``read_records_per_s`` (batches of ``--batch`` keys drawn uniformly from those written, after the
writes: page cache warm), ``cold_read_records_per_s`` (a tenth as many reads after evicting the store's files
from the page cache with ``posix_fadvise(DONTNEED)``; a store that holds its own cache, as
RocksDB's block cache, is not emptied by that). Each is the median of ``--repeats`` runs. Then
``fio_randread_iops``: fio 4 KiB random reads, O_DIRECT, queue depth 1 and 32 (Debian's fio,
``make fio-install``; skipped without it). Every line carries ``loadavg`` (1-minute load).

The slab reads a record with one kernel per batch (index probe + copy); lmdb and rocksdict are
called once per key from Python (their batch APIs are per-key loops too). Single thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))

import numpy as np  # noqa: E402

from persia.store.disk import DiskTier  # noqa: E402


def emit(rec: dict[str, Any]) -> None:
    rec["loadavg"] = round(os.getloadavg()[0], 2)
    print(json.dumps(rec), flush=True)


def drop_cache(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Slab:
    name = "slab"

    def __init__(self, d: Path, n: int, size: int) -> None:
        # the row bytes: size - 8 (the key) = values (u8) + one f32 of state
        self.tier = DiskTier.open(d, n, size - 12, np.uint8, 1, np.float32)

    def write(self, keys: np.ndarray, payload: np.ndarray) -> None:
        self.tier.put(keys, payload[:, :-4], payload[:, -4:].copy().view(np.float32))

    def read(self, keys: np.ndarray) -> int:
        recs = self.tier.find(keys)
        vals, _ = self.tier.read(recs)
        return int(vals[:, 0].sum())

    def cold(self) -> None:
        self.tier.drop_cache()

    def close(self) -> None:
        self.tier.close()


class Lmdb:
    name = "lmdb"

    def __init__(self, d: Path, n: int, size: int) -> None:
        import lmdb

        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        self.env = lmdb.open(str(d), map_size=max(1 << 26, n * size * 4), sync=False,
                             writemap=True, readahead=False, metasync=False)  # fmt: skip

    def write(self, keys: np.ndarray, payload: np.ndarray) -> None:
        kb = keys.astype(">u8").tobytes()
        with self.env.begin(write=True) as txn:
            for i in range(keys.shape[0]):
                txn.put(kb[8 * i : 8 * i + 8], payload[i].tobytes())

    def read(self, keys: np.ndarray) -> int:
        kb = keys.astype(">u8").tobytes()
        s = 0
        with self.env.begin() as txn:
            for i in range(keys.shape[0]):
                s += txn.get(kb[8 * i : 8 * i + 8])[0]
        return s

    def cold(self) -> None:
        self.env.sync(True)
        drop_cache(self.dir)

    def close(self) -> None:
        self.env.close()


class Rocks:
    name = "rocksdict"

    def __init__(self, d: Path, n: int, size: int) -> None:
        from rocksdict import Options, Rdict

        self.dir = d
        opts = Options(raw_mode=True)
        self.db = Rdict(str(d), options=opts)

    def write(self, keys: np.ndarray, payload: np.ndarray) -> None:
        from rocksdict import WriteBatch

        kb = keys.astype(">u8").tobytes()
        wb = WriteBatch(raw_mode=True)
        for i in range(keys.shape[0]):
            wb.put(kb[8 * i : 8 * i + 8], payload[i].tobytes())
        self.db.write(wb)

    def read(self, keys: np.ndarray) -> int:
        kb = keys.astype(">u8").tobytes()
        got = self.db[[kb[8 * i : 8 * i + 8] for i in range(keys.shape[0])]]
        return sum(v[0] for v in got)

    def cold(self) -> None:
        self.db.flush()
        drop_cache(self.dir)

    def close(self) -> None:
        self.db.close()


STORES: dict[str, Callable[[Path, int, int], Any]] = {
    "slab": Slab,
    "lmdb": Lmdb,
    "rocksdict": Rocks,
}
MODULES = {"lmdb": "lmdb", "rocksdict": "rocksdict"}


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_store(name: str, base: Path, size: int, args: argparse.Namespace) -> None:
    common = {"store": name, "record_bytes": size, "records": args.records, "quick": args.quick}
    mod = MODULES.get(name)
    if mod is not None:
        try:
            __import__(mod)
        except ImportError:
            emit({**common, "metric": "skipped", "why": f"{mod} is not installed (bench extra)"})
            return
    d = base / f"{name}-{size}"
    shutil.rmtree(d, ignore_errors=True)
    store = STORES[name](d, args.records, size)
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, args.records, dtype=np.uint64)
    payload = rng.integers(1, 255, (args.records, size - 8), dtype=np.uint8)
    b = args.batch
    store.write(keys[:b], payload[:b])  # warm-up (numba compile)
    t = timed(lambda: [store.write(keys[i : i + b], payload[i : i + b])
                       for i in range(0, args.records, b)])  # fmt: skip
    emit(
        {**common, "metric": "write_records_per_s", "value": round(args.records / t), "unit": "1/s"}
    )
    batches = max(1, args.reads // b)

    def reads(n: int = batches) -> float:
        picks = [keys[rng.integers(0, args.records, b)] for _ in range(n)]
        return timed(lambda: [store.read(p) for p in picks])

    warm = statistics.median(reads() for _ in range(args.repeats))
    emit({**common, "metric": "read_records_per_s", "value": round(batches * b / warm),
          "unit": "1/s", "cache": "warm"})  # fmt: skip
    cold = []
    cold_batches = max(1, batches // 10)  # a cold read waits for the disk: fewer of them
    for _ in range(args.repeats):
        store.cold()
        cold.append(reads(cold_batches))
    emit({**common, "metric": "cold_read_records_per_s",
          "value": round(cold_batches * b / statistics.median(cold)), "unit": "1/s",
          "cache": "posix_fadvise DONTNEED before each run"})  # fmt: skip
    store.close()
    shutil.rmtree(d, ignore_errors=True)


def bench_fio(base: Path, args: argparse.Namespace) -> None:
    if shutil.which("fio") is None:
        emit({"metric": "fio_randread_iops", "skipped": "fio is not installed (make fio-install)"})
        return
    f = base / "fio.dat"
    for depth in (1, 32):
        cmd = [
            "fio", "--name=randread", f"--filename={f}", f"--size={args.fio_size}",
            "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=libaio",
            f"--iodepth={depth}", f"--runtime={args.fio_seconds}", "--time_based",
            "--output-format=json",
        ]  # fmt: skip
        try:
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            emit({"metric": "fio_randread_iops", "iodepth": depth, "skipped": f"fio failed: {exc}"})
            continue
        job = json.loads(out.stdout)["jobs"][0]["read"]
        emit({"metric": "fio_randread_iops", "value": round(job["iops"]), "unit": "1/s",
              "iodepth": depth, "bs": 4096, "size": args.fio_size, "quick": args.quick,
              "lat_p50_us": round(job["clat_ns"]["percentile"]["50.000000"] / 1000, 1)})  # fmt: skip
    f.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--records", type=int, default=None)
    p.add_argument("--reads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stores", default="slab,lmdb,rocksdict")
    p.add_argument("--sizes", default="44,80")
    p.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    p.add_argument("--no-fio", action="store_true")
    args = p.parse_args()
    args.records = args.records or (20_000 if args.quick else 2_000_000)
    args.reads = args.reads or (10_000 if args.quick else 200_000)
    args.fio_size = "64M" if args.quick else "2G"
    args.fio_seconds = 2 if args.quick else 15
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_disk_", dir=args.dir))
    base.mkdir(parents=True, exist_ok=True)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            for name in args.stores.split(","):
                bench_store(name, base, size, args)
        if not args.no_fio:
            bench_fio(base, args)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
