"""The job-level checkpoint: embeddings with optimizer state, dense model and optimizer, data
position and resolved config, in one verified generation.

Layout: one generation of :mod:`persia.store.checkpoint` (``CURRENT`` pointer, ``gen-NNNNNN``
folders, ``manifest.json`` with a CRC-32 and size per file) of kind ``"persia-job"``::

    dst/CURRENT, dst/gen-000003/
      s{shard}.d{dim}.keys.npy / .values.npy / .state.npy   every row (oldest first) with its
                                                            optimizer state (Adam step included);
                                                            values in the table's row dtype: f4,
                                                            f2, or u2 (bfloat16 bit patterns)
      dense_model.npy, dense_optimizer.npy                 uint8: torch.save of the state dicts
      dense_jit_model.npy                                  uint8: the dense model as TorchScript
                                                           (torch.jit.save bytes; only when the
                                                           dump was asked for it)
      manifest.json   meta: {"job_format": 1, "num_shards", "dims", "optimizer", "init", "seed",
                      "weight_bound", "capacity", "rows", "position", "config", "delta_seq",
                      "row_dtypes": {dim: "float32" | "float16" | "bfloat16"},
                      "dense": {"model": bool, "optimizer": bool, "jit": bool},
                      "embedding_spec": {...} | null, "persia_version"}

``embedding_spec`` is the job's embedding layer (:func:`persia.embedding.spec.spec_to_dict`: every
slot with its dim, pooling, group and key prefix, ``feature_index_prefix_bit``, the feature groups,
capacity and shards), so that a checkpoint is served (``persia.ctx.InferCtx``,
``persia.serving.open_model``) without the training job's YAML files. Both it and the TorchScript
model are inside the generation: a reader always gets the embeddings, the dense model and the
layout of one and the same dump. Readers of checkpoints without them (older ones) get None.

**Writing while training continues** (:func:`dump`): the dense state dicts are serialised first
(in the caller's thread, so they match the dense step that came last); then shard after shard,
the shard's rows are copied under that shard's lock, the lock is released and the copy is written
and fsynced before the next shard is copied. The longest pause any lookup or gradient sees is
therefore one shard's copy (reported as ``longest_shard_pause_s``), and memory holds one shard's
copy at a time. Each shard is consistent at its own moment; for a snapshot of one instant, stop
feeding batches and flush first (what ``TrainCtx.dump_checkpoint`` does with ``blocking=True``).
A crash at any point leaves the previous generation current and loadable.

**Loading** (:func:`read`, :func:`restore_store`): every file is verified before anything is
changed; the rows are re-sharded to the store's shard count with the fixed
:func:`persia.store.shard_of` hash, so N shards load into M with identical lookups.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persia.checkpoint._generation import GenerationWriter
from persia.errors import CheckpointError
from persia.store.checkpoint import current_generation, read_current
from persia.store.delta import DeltaReader
from persia.store.table import row_dtype_of

#: the dtypes a checkpoint's rows may be stored in (float32, float16, bfloat16 bit patterns)
_ROW_STORAGE = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))

__all__ = [
    "KIND",
    "JOB_FORMAT",
    "DumpReport",
    "JobCheckpoint",
    "dump",
    "is_job_checkpoint",
    "read",
    "read_meta",
    "restore_store",
]

KIND = "persia-job"
#: Version of the meta layout above; readers refuse other versions.
JOB_FORMAT = 1


@dataclass
class DumpReport:
    """What a dump wrote and how long it held each shard.

    Attributes:
        path: the new generation's folder.
        rows: embedding rows written.
        bytes: bytes of every file written (headers included).
        seconds: wall time of the whole dump.
        shard_pauses_s: per shard, how long its lock was held for the copy.
    """

    path: Path
    rows: int
    bytes: int
    seconds: float
    shard_pauses_s: list[float] = field(default_factory=list)

    @property
    def longest_shard_pause_s(self) -> float:
        """The longest time any one shard was locked by the dump."""
        return max(self.shard_pauses_s, default=0.0)


@dataclass
class JobCheckpoint:
    """A verified job checkpoint in memory (see :func:`read`)."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def position(self) -> dict[str, Any]:
        """The data position saved with it (e.g. ``{"epoch", "batch", "samples"}``), or ``{}``."""
        pos = self.meta.get("position")
        return dict(pos) if isinstance(pos, dict) else {}

    @property
    def config(self) -> dict[str, Any] | None:
        """The resolved job config saved with it, if any."""
        cfg = self.meta.get("config")
        return dict(cfg) if isinstance(cfg, dict) else None

    def _torch_state(self, name: str, map_location: Any) -> Any:
        import torch

        arr = self.arrays.get(name)
        if arr is None:
            raise CheckpointError(f"{self.path}: the checkpoint holds no {name.replace('_', ' ')}")
        try:
            return torch.load(
                io.BytesIO(arr.tobytes()), map_location=map_location, weights_only=True
            )
        except Exception as exc:
            raise CheckpointError(f"{self.path}: {name} cannot be read by torch: {exc}") from exc

    def dense_model_state(self, map_location: Any = None) -> dict[str, Any]:
        """The dense model's state dict."""
        return self._torch_state("dense_model", map_location)  # type: ignore[no-any-return]

    def embedding_spec(self) -> Any:
        """The job's :class:`~persia.embedding.spec.EmbeddingSpec` recorded at dump time (None:
        the checkpoint records none: written by an older persia, or without a known spec).

        Raises:
            CheckpointError: the recorded spec is malformed.
        """
        from persia.embedding.spec import spec_from_dict
        from persia.errors import ConfigError

        raw = self.meta.get("embedding_spec")
        if raw is None:
            return None
        try:
            return spec_from_dict(raw, source=f"{self.path}: embedding_spec")
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None

    def jit_model(self, map_location: Any = None) -> Any:
        """The TorchScript dense model saved with the dump (``with_jit_model=True``), in eval
        mode; None when the checkpoint holds none.

        Raises:
            CheckpointError: the bytes are not a TorchScript model torch can load.
        """
        import warnings

        import torch

        arr = self.arrays.get("dense_jit_model")
        if arr is None:
            return None
        try:
            with warnings.catch_warnings():  # TorchScript is marked deprecated by torch
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(io.BytesIO(arr.tobytes()), map_location=map_location)
        except Exception as exc:
            raise CheckpointError(
                f"{self.path}: the TorchScript model cannot be loaded: {exc}"
            ) from exc
        model.eval()
        return model

    def dense_optimizer_state(self, map_location: Any = None) -> dict[str, Any] | None:
        """The dense optimizer's state dict (None when none was saved)."""
        if "dense_optimizer" not in self.arrays:
            return None
        return self._torch_state("dense_optimizer", map_location)  # type: ignore[no-any-return]


def _torch_bytes(obj: Any) -> np.ndarray:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return np.frombuffer(buf.getbuffer(), dtype=np.uint8).copy()


def dump(
    directory: str | os.PathLike[str],
    store: Any,
    *,
    model_state: Mapping[str, Any] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    position: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    delta_seq: int | None = None,
    keep: int = 2,
    lock: threading.Lock | None = None,
    jit_model: bytes | None = None,
    embedding_spec: Mapping[str, Any] | None = None,
) -> DumpReport:
    """Write a job checkpoint of ``store`` (a :class:`~persia.store.ShardedStore`) shard by shard.

    Args:
        directory: the checkpoint directory (generations and ``CURRENT`` inside).
        store: the embedding store; its ``shards`` are copied one at a time.
        model_state, optimizer_state: dense state dicts (serialised at once, before any shard).
        position: JSON dict of the data position (``{"epoch": e, "batch": b, ...}``).
        config: the resolved job config (JSON dict).
        delta_seq: the last incremental delta completed before this dump started (restores
            apply the deltas after it).
        keep: old generations kept beside the new one.
        lock: held around each shard's copy besides the shard's own lock (tests, benchmarks).
        jit_model: the dense model as TorchScript (``torch.jit.save`` bytes), for serving.
        embedding_spec: the job's embedding layer (:func:`persia.embedding.spec.spec_to_dict`).

    Returns:
        A :class:`DumpReport`.

    Raises:
        CheckpointError: a meta value that is not JSON; OSError from the file system (the
            previous generation stays current).
    """
    start = time.perf_counter()
    dense = {}
    if model_state is not None:
        dense["dense_model"] = _torch_bytes(dict(model_state))
    if optimizer_state is not None:
        dense["dense_optimizer"] = _torch_bytes(dict(optimizer_state))
    if jit_model is not None:
        dense["dense_jit_model"] = np.frombuffer(bytes(jit_model), dtype=np.uint8).copy()
    pauses: list[float] = []
    rows = 0
    dims: set[int] = set()
    row_dtypes: dict[str, str] = {}
    shards = list(store.shards)
    with GenerationWriter(directory, kind=KIND, keep=keep) as writer:
        for name, arr in dense.items():
            writer.add(name, arr)
        for i, shard in enumerate(shards):
            t0 = time.perf_counter()
            if lock is not None:
                with lock:
                    parts = shard.export_rows()
            else:
                parts = shard.export_rows()
            pauses.append(time.perf_counter() - t0)
            for dim, part in parts.items():
                dims.add(int(dim))
                row_dtypes[str(int(dim))] = row_dtype_of(part["values"])
                rows += int(part["keys"].shape[0])
                for what in ("keys", "values", "state"):
                    writer.add(f"s{i}.d{dim}.{what}", part[what])
            del parts
        from persia import __version__ as version

        meta = {
            "job_format": JOB_FORMAT,
            "num_shards": len(shards),
            "dims": sorted(dims),
            "optimizer": store.optimizer.to_dict(),
            "init": store.init.to_dict(),
            "seed": int(store.seed),
            "weight_bound": float(store.weight_bound),
            "capacity": int(store.capacity),
            "rows": rows,
            "row_dtypes": row_dtypes,
            "position": dict(position) if position is not None else {},
            "config": dict(config) if config is not None else None,
            "delta_seq": None if delta_seq is None else int(delta_seq),
            "dense": {
                "model": model_state is not None,
                "optimizer": optimizer_state is not None,
                "jit": jit_model is not None,
            },
            "embedding_spec": None if embedding_spec is None else dict(embedding_spec),
            "persia_version": str(version),
        }
        path = writer.commit(meta)
        written = writer.bytes_written
    return DumpReport(path, rows, written, time.perf_counter() - start, pauses)


def is_job_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` has a ``CURRENT`` pointer (of any kind; :func:`read` checks it)."""
    try:
        current_generation(directory)
    except CheckpointError:
        return False
    return True


def read(directory: str | os.PathLike[str]) -> JobCheckpoint:
    """Load and verify the current job checkpoint in ``directory``.

    Raises:
        CheckpointError: missing, truncated or tampered files, another kind or format, or a
            manifest whose arrays do not match its meta (shard count, dims).
    """
    arrays, meta = read_current(directory, kind=KIND)
    path = current_generation(directory)
    where = str(path)
    if meta.get("job_format") != JOB_FORMAT:
        raise CheckpointError(
            f"{where}: job_format must be {JOB_FORMAT}, got {meta.get('job_format')!r}"
        )
    n = meta.get("num_shards")
    dims = meta.get("dims")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{where}: num_shards must be an int >= 1, got {n!r}")
    if not isinstance(dims, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        raise CheckpointError(f"{where}: dims must be a list of ints > 0, got {dims!r}")
    if not isinstance(meta.get("optimizer"), dict):
        raise CheckpointError(f"{where}: optimizer must be a dict, got {meta.get('optimizer')!r}")
    rows = 0
    for name in arrays:
        if name.startswith("dense_"):
            continue
        parts = name.split(".")
        ok = (
            len(parts) == 3
            and parts[0][:1] == "s"
            and parts[0][1:].isdigit()
            and int(parts[0][1:]) < n
            and parts[1][:1] == "d"
            and parts[1][1:].isdigit()
            and int(parts[1][1:]) in dims
            and parts[2] in ("keys", "values", "state")
        )
        if not ok:
            raise CheckpointError(f"{where}: unexpected array {name!r} (shards {n}, dims {dims})")
        dim = int(parts[1][1:])
        keys = arrays.get(f"{parts[0]}.{parts[1]}.keys")
        values = arrays.get(f"{parts[0]}.{parts[1]}.values")
        state = arrays.get(f"{parts[0]}.{parts[1]}.state")
        if keys is None or values is None or state is None:
            raise CheckpointError(f"{where}: {parts[0]}.{parts[1]} lacks keys, values or state")
        count = keys.shape[0]
        if (
            keys.dtype != np.uint64
            or keys.ndim != 1
            or values.dtype not in _ROW_STORAGE
            or values.shape != (count, dim)
            or state.dtype != np.float32
            or state.ndim != 2
            or state.shape[0] != count
        ):
            raise CheckpointError(
                f"{where}: {parts[0]}.{parts[1]}: expected keys u64[n], values f32/f16/u16[n, {dim}], "
                f"state f32[n, W]; got {keys.dtype}{list(keys.shape)}, "
                f"{values.dtype}{list(values.shape)}, {state.dtype}{list(state.shape)}"
            )
        if parts[2] == "keys":
            rows += count
    if meta.get("rows") != rows:
        raise CheckpointError(f"{where}: the manifest says {meta.get('rows')!r} rows, found {rows}")
    return JobCheckpoint(path, meta, arrays)


def read_meta(directory: str | os.PathLike[str]) -> JobCheckpoint:
    """The current job checkpoint's manifest only (no array read or verified; ``arrays`` is
    empty): its embedding spec, delta_seq, shard count, cheaply.

    Raises:
        CheckpointError: no checkpoint, another kind, or another format.
    """
    from persia.store.checkpoint import current_meta

    path, meta = current_meta(directory, kind=KIND)
    if meta.get("job_format") != JOB_FORMAT:
        raise CheckpointError(
            f"{path}: job_format must be {JOB_FORMAT}, got {meta.get('job_format')!r}"
        )
    return JobCheckpoint(path, meta, {})


def restore_store(store: Any, ckpt: JobCheckpoint) -> None:
    """Replace every row of ``store`` by the checkpoint's, re-sharding N -> ``store.num_shards``.

    The checkpoint's optimizer must keep as many state columns per row as the store's (its
    hyper-parameters may differ); a store with ``adopt_optimizer`` takes the checkpoint's. The
    store is unchanged when this raises.

    Raises:
        CheckpointError: another optimizer state width, a dim the store does not declare, or rows
            the store refuses.
    """
    store.replace_rows(ckpt.arrays, ckpt.meta, str(ckpt.path))


def restore_with_deltas(
    store: Any,
    checkpoint_dir: str | os.PathLike[str] | None,
    delta_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Load the full job checkpoint (if given) into ``store``, then every complete delta after it.

    Returns:
        ``{"applied": [seq, ...], "last_seq": int, "lost_window_s": float | None}``: the
        lost-update window is the time since the newest applied delta was flushed (the changes
        after it are what a crash lost).
    """
    after = 0
    if checkpoint_dir is not None:
        ckpt = read(checkpoint_dir)
        restore_store(store, ckpt)
        after = int(ckpt.meta.get("delta_seq") or 0)
    reader = DeltaReader(delta_dir, after_seq=after)
    applied = reader.apply_pending(store)
    lost = None
    if reader.last_flushed_unix_s is not None:
        lost = max(0.0, time.time() - reader.last_flushed_unix_s)
    return {"applied": applied, "last_seq": reader.last_seq, "lost_window_s": lost}
