"""A streaming writer of one :mod:`persia.store.checkpoint` generation.

:func:`persia.store.checkpoint.write_generation` takes every array at once; a job checkpoint
snapshots one shard at a time and writes it before taking the next, so that only one shard's copy
is in memory and each shard's lock is held only for its copy. This writer produces exactly the
same on-disk layout (``.tmp-`` folder, one verified ``.npy`` per array, manifest last, rename, then
the atomic ``CURRENT`` switch), so :func:`~persia.store.checkpoint.read_current` reads and verifies
it; it reuses the store module's file helpers rather than a second copy of the protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from persia.errors import CheckpointError
from persia.store import checkpoint as ck

__all__ = ["GenerationWriter"]


class GenerationWriter:
    """Write arrays one by one into a new generation of ``directory``; :meth:`commit` publishes it.

    Use as a context manager; leaving it without :meth:`commit` (an error) removes the partial
    folder, and a crash leaves only a ``.tmp-`` folder that the next writer removes. The
    directory's writer lock is held from entry to exit.

    Args:
        directory: the checkpoint directory (created if missing).
        kind: the manifest's kind (readers must ask for the same).
        keep: old generations kept beside the new one after the commit.
    """

    def __init__(self, directory: str | os.PathLike[str], *, kind: str, keep: int = 2) -> None:
        if not isinstance(kind, str) or not kind:
            raise CheckpointError(f"kind must be a non-empty str, got {kind!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise CheckpointError(f"keep must be an int >= 0, got {keep!r}")
        self.root = Path(directory)
        self.kind = kind
        self.keep = keep
        self.entries: dict[str, dict[str, Any]] = {}
        self.bytes_written = 0
        self.number = 0
        self.tmp: Path | None = None
        self._stack = contextlib.ExitStack()
        self._committed: Path | None = None

    def __enter__(self) -> GenerationWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(ck._writer_lock(self.root))
        try:
            ck._remove_temporaries(self.root)
            existing = ck.list_generations(self.root)
            self.number = ck._gen_number(existing[-1]) + 1 if existing else 1
            self.tmp = self.root / f"{ck.TMP_PREFIX}{ck._gen_name(self.number)}-{os.getpid()}"
            self.tmp.mkdir()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._committed is None and self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._stack.close()

    def add(self, name: str, arr: np.ndarray) -> None:
        """Write one array now (its memory may be reused or freed afterwards)."""
        if self.tmp is None or self._committed is not None:
            raise CheckpointError("GenerationWriter.add: use inside `with`, before commit()")
        checked = ck._check_arrays({name: arr})
        folded = {n.lower() for n in self.entries}
        if name.lower() in folded:
            raise CheckpointError(f"array {name!r} was already added to this generation")
        entry = ck._write_array(self.tmp / f"{name}.npy", checked[name])
        self.entries[name] = entry
        self.bytes_written += int(entry["bytes"])

    def commit(self, meta: dict[str, Any]) -> Path:
        """Write the manifest, publish the generation and switch ``CURRENT`` to it."""
        if self.tmp is None or self._committed is not None:
            raise CheckpointError("GenerationWriter.commit: use inside `with`, once")
        meta = ck._check_meta(meta)
        manifest = {
            "format_version": ck.FORMAT_VERSION,
            "kind": self.kind,
            "generation": self.number,
            "created_unix_s": time.time(),
            "meta": meta,
            "arrays": self.entries,
        }
        fd = os.open(self.tmp / ck.MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            ck._write_all(fd, json.dumps(manifest, indent=1, allow_nan=False).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        ck._fsync_dir(self.tmp)
        name = ck._gen_name(self.number)
        final = self.root / name
        os.rename(self.tmp, final)
        self._committed = final
        ck._fsync_dir(self.root)
        ck._switch_pointer(self.root, name)
        old = [p for p in ck.list_generations(self.root) if p.name != name]
        for path in old[: max(0, len(old) - self.keep)]:
            ck._remove_tree(self.root, path)
        return final
