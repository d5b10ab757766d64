"""The checkpoint service of :class:`persia.ctx.EmbeddingCtx`: dump, load and wait of the dense
state and the embeddings (the files are :mod:`persia.checkpoint`'s)."""

from __future__ import annotations

import copy
import functools
import io
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from persia import telemetry
from persia.errors import CheckpointError, PersiaError
from persia.logger import get_default_logger

if TYPE_CHECKING:
    from persia.runtime.pipeline import RuntimeProtocol

_logger = get_default_logger()


class CheckpointService:
    """The checkpoint methods of a context with a dense ``model`` and a ``runtime`` (a mixin of
    :class:`persia.ctx.EmbeddingCtx`)."""

    if TYPE_CHECKING:
        model: torch.nn.Module | None

        @property
        def runtime(self) -> RuntimeProtocol: ...

    # ------------------------------------------------------------ checkpoints
    def dump_checkpoint(
        self,
        dst_dir: str | os.PathLike,
        dense_filename: str = "dense.pt",
        jit_dense_filename: str = "jit_dense.pt",
        blocking: bool = True,
        with_jit_model: bool = False,
        *,
        position: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Any:
        """Saves the dense model and every embedding row (with optimizer state) to ``dst_dir``.

        The checkpoint is one verified generation of :mod:`persia.checkpoint` (a crash at any
        moment leaves the previous one loadable). ``dense_filename`` is kept for PERSIA's
        signature; the dense state lives inside the generation. ``blocking=False`` returns at
        once and writes on a background thread while training continues (shard by shard; see
        :func:`persia.checkpoint.dump`); :meth:`wait_for_dump_embedding` waits for it.
        ``position`` and ``config`` (persia extensions) are JSON dicts saved in the manifest.

        Returns:
            The :class:`persia.checkpoint.DumpReport` (None when not blocking).
        """
        return self._dump_job(
            dst_dir,
            None,
            jit_dense_filename if with_jit_model else None,
            blocking,
            position,
            config,
        )

    def _writable(self, what: str) -> None:
        """Raises when the runtime is a read-only serving runtime (``job_type: Infer``)."""
        if self.runtime.read_only:
            raise PersiaError(
                f"{what}: the parameter servers are read-only (job_type: Infer); they follow "
                "their checkpoint and its deltas"
            )

    def _spec_record(self, serving: bool) -> dict[str, Any] | None:
        """The runtime's embedding spec as the checkpoint records it (None: not known)."""
        from persia.embedding.spec import spec_to_dict

        spec = self.runtime.spec
        if spec is None:
            if serving:
                _logger.warning(
                    "dump_checkpoint(with_jit_model=True): this runtime does not know its "
                    "embedding spec, so the checkpoint records none; serving it will need the "
                    "training job's embedding_config.yml"
                )
            return None
        return spec_to_dict(spec)

    def unwrapped_model(self) -> Any:
        """The model without its ``DistributedDataParallel`` wrapper (several NN workers; a
        persia extension): what checkpoints save and exports script, so that the files are the
        same whatever the number of workers."""
        model = self.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.module
        return model

    def _dump_job(
        self,
        dst_dir: str | os.PathLike,
        optimizer_state: dict[str, Any] | None,
        jit_filename: str | None,
        blocking: bool,
        position: dict[str, Any] | None,
        config: dict[str, Any] | None,
    ) -> Any:
        from persia import checkpoint

        if self.model is None:
            raise PersiaError("no model: create the context with model=...")
        self.wait_for_dump_embedding()
        dst = Path(dst_dir)
        dst.mkdir(parents=True, exist_ok=True)
        jit_bytes = None
        if jit_filename is not None:
            # TorchScript inside the generation (served with the embeddings of the same dump) and
            # beside it, where PERSIA's TorchServe handler loads it
            buf = io.BytesIO()
            torch.jit.save(torch.jit.script(self.unwrapped_model()), buf)
            jit_bytes = buf.getvalue()
            tmp = dst / (jit_filename + ".tmp")
            tmp.write_bytes(jit_bytes)
            os.replace(tmp, dst / jit_filename)
        spec = self._spec_record(serving=jit_filename is not None)
        self.runtime.flush()
        store = self.runtime.store
        model_state = self.unwrapped_model().state_dict()
        delta = getattr(self, "_delta_writer", None)
        delta_seq = delta.last_seq if delta is not None else None
        if not blocking:
            # copies now, so that training may change the model while the thread writes
            model_state = {k: v.detach().clone() for k, v in model_state.items()}
            optimizer_state = copy.deepcopy(optimizer_state)
        write_checkpoint = functools.partial(
            checkpoint.dump,
            dst,
            store,
            model_state=model_state,
            optimizer_state=optimizer_state,
            position=position,
            config=config,
            delta_seq=delta_seq,
            jit_model=jit_bytes,
            embedding_spec=spec,
        )

        def dump() -> Any:
            t0 = time.perf_counter()
            out = write_checkpoint()
            rec = telemetry.current()
            if rec.on:
                rec.checkpoint(time.perf_counter() - t0)
            return out

        if blocking:
            return dump()
        self._dump_error: BaseException | None = None

        def write() -> None:
            try:
                dump()
            except BaseException as exc:  # handed to wait_for_dump_embedding
                self._dump_error = exc

        thread = threading.Thread(target=write, name="persia-dump", daemon=True)
        thread.start()
        self._dump_thread: threading.Thread | None = thread
        return None

    def load_checkpoint(
        self,
        src_dir: str | os.PathLike,
        map_location: str | None = None,
        dense_filename: str = "dense.pt",
        blocking: bool = True,
        *,
        embeddings: bool = True,
    ) -> Any:
        """Loads the dense model and the embeddings saved by :meth:`dump_checkpoint`.

        ``embeddings=False`` (a persia extension) loads the dense part only: with several NN
        workers sharing the parameter servers, one of them restores the rows.

        Every file is verified (sizes, CRC-32, format version, dims, optimizer state width)
        before anything changes; rows re-shard to this job's shard count. ``dense_filename`` and
        ``blocking`` are kept for PERSIA's signature (loads are blocking).

        Returns:
            The :class:`persia.checkpoint.JobCheckpoint` (its ``position``, ``config``).

        Raises:
            CheckpointError: missing, truncated, tampered or mismatching checkpoint.
        """
        from persia import checkpoint

        if self.model is None:
            raise PersiaError("no model: create the context with model=...")
        if embeddings:
            self._writable("load_checkpoint")
        src = Path(src_dir)
        if not src.is_dir():
            raise CheckpointError(f"checkpoint directory {str(src)!r} does not exist")
        ckpt = checkpoint.read(src)
        state = ckpt.dense_model_state(map_location)
        self.runtime.flush()
        if embeddings:
            checkpoint.restore_store(self.runtime.store, ckpt)
        try:
            self.unwrapped_model().load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{ckpt.path}: the dense model does not match: {exc}") from exc
        return ckpt

    def dump_embedding(self, dst_dir: str | os.PathLike, blocking: bool = True) -> None:
        """Saves every embedding row with its optimizer state to ``dst_dir``.

        ``dst_dir`` becomes a job checkpoint (:func:`persia.checkpoint.dump`) without dense
        state: :meth:`load_embedding` reads it back into any shard count. The write is blocking
        whatever ``blocking`` says (kept for PERSIA's signature).
        """
        from persia import checkpoint

        spec = self._spec_record(serving=False)
        self.runtime.flush()
        delta = getattr(self, "_delta_writer", None)
        checkpoint.dump(
            dst_dir,
            self.runtime.store,
            delta_seq=delta.last_seq if delta is not None else None,
            embedding_spec=spec,
        )

    def load_embedding(self, src_dir: str | os.PathLike, blocking: bool = True) -> None:
        """Replaces every embedding row by those of the job checkpoint in ``src_dir``.

        ``src_dir`` is what :meth:`dump_embedding` or :meth:`dump_checkpoint` wrote; only the
        rows are loaded (the dense state, if any, is left alone). Verified like
        :meth:`load_checkpoint`: the store is unchanged when this raises.

        Raises:
            CheckpointError: missing, truncated, tampered or mismatching checkpoint.
        """
        from persia import checkpoint

        self._writable("load_embedding")
        ckpt = checkpoint.read(src_dir)
        self.runtime.flush()
        checkpoint.restore_store(self.runtime.store, ckpt)

    def wait_for_dump_embedding(self) -> None:
        """Waits for a ``dump_checkpoint(..., blocking=False)`` and raises its error, if any."""
        thread = getattr(self, "_dump_thread", None)
        if thread is not None:
            thread.join()
            self._dump_thread = None
            error, self._dump_error = self._dump_error, None
            if error is not None:
                raise error

    def wait_for_load_embedding(self) -> None:
        """Loads are blocking in persia; kept for PERSIA compatibility."""

    def get_embedding_size(self) -> list[int]:
        """Number of embedding rows held by each parameter-server shard."""
        self.runtime.flush()
        return [int(s["rows"]) for s in self.runtime.store.shard_stats()]

    def clear_embeddings(self) -> None:
        """Removes every embedding row from every shard."""
        self._writable("clear_embeddings")
        self.runtime.flush()
        self.runtime.store.clear()
