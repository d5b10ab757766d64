"""PERSIA's context classes: :class:`DataCtx` (a data loader's sender), :class:`EmbeddingCtx`
(lookups and the dense forward pass; evaluation through :func:`eval_ctx`) and :class:`TrainCtx`
(training), with :class:`PreprocessMode`."""

from __future__ import annotations

import math
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persia import _settings, env, telemetry
from persia.checkpoint.follow import ServingRuntime
from persia.ctx._checkpoint import CheckpointService
from persia.ctx._device import DeviceTransfer, split_slots
from persia.ctx._serving import serving_runtime
from persia.ctx._stack import (
    BaseCtx,
    close_last_runtime,
    cnt_ctx,
    last_runtime,
    set_last_runtime,
)
from persia.ctx._threads import AUTO, KEEP, ThreadTuner, parse_nn_threads
from persia.embedding import EmbeddingConfig, get_default_embedding_config
from persia.embedding.data import PersiaBatch
from persia.embedding.optim import EmbeddingOptimizer
from persia.errors import BackendError, BatchError, ConfigError, PersiaError
from persia.logger import get_default_logger, warn_once
from persia.runtime import registry
from persia.runtime.distributed import DistributedBaseOption, wrap_ddp
from persia.runtime.pipeline import RuntimeProtocol, TrainingBatch

_logger = get_default_logger()


class PreprocessMode(Enum):
    """What ``prepare_features`` returns: TRAIN (embeddings require grad), EVAL, INFERENCE
    (no labels needed)."""

    TRAIN = 1
    EVAL = 2
    INFERENCE = 3


class DataCtx(BaseCtx):
    """Sends batches from a data-loader process to the NN workers (PERSIA's API)::

        with DataCtx() as ctx:
            for batch in my_batches():
                ctx.send_data(batch)

    Needs the cluster backend: the process joins the Ray cluster named by ``RAY_ADDRESS`` (or
    the one this process is already connected to) and serves the NN workers iterating
    ``StreamingDataset`` (see :mod:`persia.backends.ray.stream`); ``REPLICA_INDEX`` /
    ``REPLICA_SIZE`` say which of the data loaders this is. Leaving the context tells the NN
    workers this loader is done. In one process, feed a ``DataLoader`` from an
    ``IterableDataset`` instead.

    Args:
        replica_index, replica_size, channel, consumers, bind_host, timeout_s: see
            :class:`persia.backends.ray.stream.StreamSender` (persia extensions).
    """

    def __init__(
        self,
        *args: Any,
        replica_index: int | None = None,
        replica_size: int | None = None,
        channel: str | None = None,
        consumers: int | None = None,
        bind_host: str | None = None,
        timeout_s: float = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._sender_kwargs: dict[str, Any] = {
            "replica_index": replica_index,
            "replica_size": replica_size,
            "channel": channel,
            "consumers": consumers,
            "bind_host": bind_host,
            "timeout_s": timeout_s,
        }
        self._sender: Any = None

    def _enter(self) -> None:
        if self._sender is None:
            from persia.embedding.config import load_global_config

            # PERSIA's metrics_config of $PERSIA_GLOBAL_CONFIG: this loader's own metrics
            glob = load_global_config(None)
            index = self._sender_kwargs["replica_index"]
            telemetry.enable_from_config(
                glob.common_config.metrics_config,
                telemetry.LOADER,
                env.get_replica_index() if index is None else index,
            )
            try:
                self._sender = registry.backend("ray").stream_sender(**self._sender_kwargs)
            except ImportError as exc:
                raise BackendError(
                    f"DataCtx needs the cluster backend (pip install persia[ray]): {exc}",
                    role="data-loader",
                ) from exc

    def _exit(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
            telemetry.push_now()  # the last push: this loader is done

    def send_data(self, data: Any, blocking: bool = True) -> None:
        """Sends one :class:`PersiaBatch` to the next NN worker that asks for one."""
        if self._sender is None:
            raise PersiaError("enter the context first (`with DataCtx() as ctx:`)")
        self._sender.send(data)


class EmbeddingCtx(CheckpointService, BaseCtx):
    """Embedding lookups and the dense model's forward pass (PERSIA's API).

    Args:
        preprocess_mode: TRAIN, EVAL or INFERENCE.
        model: the dense model, called as ``model(non_id_tensors, embedding_tensors)``.
        embedding_config: initialisation range, admission probability and weight bound of
            new embedding rows.
        embedding_config_file: path of PERSIA's ``embedding_config.yml`` (persia extension;
            default: ``$PERSIA_EMBEDDING_CONFIG``).
        global_config_file: path of PERSIA's ``global_config.yml`` (persia extension; default:
            ``$PERSIA_GLOBAL_CONFIG``, else built-in defaults).
        backend: ``"local"`` (every role in this process) or ``"ray"`` (parameter servers as
            Ray actors, see docs/cluster.md); default ``$PERSIA_BACKEND``, else ``"local"``.
        cluster: a :class:`persia.backends.ray.backend.ClusterConfig` (ray backend only).
    """

    def __init__(
        self,
        preprocess_mode: PreprocessMode,
        model: torch.nn.Module | None = None,
        embedding_config: EmbeddingConfig | None = None,
        *args: Any,
        embedding_config_file: str | os.PathLike | None = None,
        global_config_file: str | os.PathLike | None = None,
        backend: str | None = None,
        cluster: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend or _settings.backend()
        if self.backend not in registry.names():
            allowed = " or ".join(repr(n) for n in registry.names())
            raise PersiaError(f"backend must be {allowed}, got {self.backend!r}")
        if cluster is not None and self.backend != "ray":
            raise PersiaError("cluster= needs backend='ray'")
        self.cluster = cluster
        self.preprocess_mode = preprocess_mode
        self.model = model
        self.embedding_config = embedding_config or get_default_embedding_config()
        self.embedding_config_file = embedding_config_file
        self.global_config_file = global_config_file
        self.current_batch: TrainingBatch | None = None
        self._owns_runtime = False
        self._direct_lookups = 0
        # a CUDA dense model gets its inputs through pinned buffers and a side stream; on the
        # CPU the tensors share the lookups' memory and nothing is copied
        self._transfer: DeviceTransfer | None = (
            DeviceTransfer(self.device) if self.device.type == "cuda" else None
        )

    def _enter(self) -> None:
        if self.preprocess_mode != PreprocessMode.TRAIN:
            serving = self._inference_runtime()
            if serving is not None:
                self._runtime = serving
                self._saved_training_allowed = False
                return
        current = cnt_ctx()
        last = last_runtime()
        if current is not None and current._runtime is not None:
            self._runtime = current._runtime
        elif last is not None and not last.closed:
            self._runtime = last
        else:
            self._runtime = self._build_runtime(None)
            self._owns_runtime = True
            set_last_runtime(self._runtime)
        self._saved_training_allowed = self._runtime.training_allowed
        if self.preprocess_mode != PreprocessMode.TRAIN:
            self._runtime.flush()
            self._runtime.training_allowed = False

    def _exit(self) -> None:
        if self._runtime is not None:
            self._runtime.training_allowed = self._saved_training_allowed

    def _inference_runtime(self) -> RuntimeProtocol | None:
        """Under ``job_type: Infer`` (``global_config.yml``), the inference-mode parameter
        servers, as PERSIA's start them: the checkpoint ``infer_config.embedding_checkpoint``
        names, read-only, following ``incremental_dir`` when ``enable_incremental_update`` is
        on (:func:`persia.ctx._serving.serving_runtime`). The servers outlive the context, as
        PERSIA's do: the next context on the same checkpoint uses them again. None under
        ``job_type: Train``."""
        from persia.embedding.config import GlobalConfig, load_global_config

        source = self.global_config_file
        glob = source if isinstance(source, GlobalConfig) else load_global_config(source)
        if glob.common_config.job_type != "infer":
            return None
        last = last_runtime()
        if self.backend != "local":
            runtime = registry.inference_backend(self.backend).build_inference_runtime(
                self.embedding_config_file,
                glob,
                self.embedding_config,
                self.cluster,
                reuse=last,
            )
            set_last_runtime(runtime)
            return runtime
        infer = glob.common_config.infer_config
        wanted = None if infer is None else infer.embedding_checkpoint
        if (
            isinstance(last, ServingRuntime)
            and not last.closed
            and wanted is not None
            and last.checkpoint_dir.resolve() == Path(wanted).resolve()
        ):
            return last
        runtime = serving_runtime(self.embedding_config_file, glob, self.embedding_config)
        set_last_runtime(runtime)
        return runtime

    def _build_runtime(
        self, optimizer: EmbeddingOptimizer | None, backward_buffer_size: int = 10
    ) -> RuntimeProtocol:
        """The runtime of this context, built by its backend (:mod:`persia.runtime.registry`)."""
        return registry.backend(self.backend).build_runtime(
            embedding_config=self.embedding_config,
            optimizer=optimizer,
            embedding_config_file=self.embedding_config_file,
            global_config_file=self.global_config_file,
            backward_buffer_size=backward_buffer_size,
            cluster=self.cluster,
        )

    @property
    def runtime(self) -> RuntimeProtocol:
        if self._runtime is None:
            raise PersiaError("enter the context first (`with ... as ctx:`)")
        return self._runtime

    def get_embedding_from_data(
        self, persia_batch: PersiaBatch, device_id: int | None = None
    ) -> TrainingBatch:
        """Looks one batch up now, in this thread (PERSIA's API); :meth:`forward` takes the
        result. A ``DataLoader`` does the same ahead of time on its lookup thread.

        The batch trains (creates rows, expects :meth:`TrainCtx.backward`) when it
        ``requires_grad`` and this context trains; it takes no staleness permit, as nothing runs
        ahead of it.

        Args:
            persia_batch: the batch.
            device_id: PERSIA's CUDA device of the result; persia places the tensors on the
                context's device at :meth:`forward`, so it must be None or that device.

        Raises:
            BatchError: ``persia_batch`` is not a :class:`PersiaBatch`.
            PersiaError: outside the context, or another ``device_id``.
        """
        if not isinstance(persia_batch, PersiaBatch):
            raise BatchError(
                f"get_embedding_from_data expects a PersiaBatch, got {type(persia_batch).__name__}"
            )
        if device_id is not None and device_id != self.device_id:
            raise PersiaError(
                f"get_embedding_from_data(device_id={device_id}): this context's device is "
                f"{self.device}; create the context with device_id={device_id}"
            )
        runtime = self.runtime
        training = (
            self.preprocess_mode == PreprocessMode.TRAIN
            and persia_batch.requires_grad
            and runtime.training_allowed
        )
        index = self._direct_lookups
        self._direct_lookups += 1
        return runtime.lookup(persia_batch, training, index, None)

    # --------------------------------------------------------------- forward
    def forward(self, batch: TrainingBatch) -> tuple[Any, list[torch.Tensor] | None]:
        """``prepare_features`` then the model's forward pass; returns (output, labels)."""
        if self.model is None:
            raise PersiaError("no model: create the context with model=...")
        non_id, embeddings, labels = self.prepare_features(batch)
        autocast = self._autocast()
        if autocast is None:
            return self.model(non_id, embeddings), labels
        with autocast:
            out = self.model(non_id, embeddings)
        # the loss is computed outside autocast, in float32, as with mixed precision off
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float()
        return out, labels

    def _autocast(self) -> Any:
        """The autocast context of the model's forward pass (None: none)."""
        return None

    def _batch_arrays(self, batch: TrainingBatch) -> dict[str, np.ndarray]:
        """The arrays of ``batch`` that :meth:`prepare_features` turns into tensors."""
        pb = batch.batch
        arrays = {f"non_id:{i}": f.data for i, f in enumerate(pb.non_id_type_features)}
        if self.preprocess_mode != PreprocessMode.INFERENCE:
            arrays.update({f"label:{i}": lb.data for i, lb in enumerate(pb.labels)})
        arrays["summed"] = batch.lookup.summed
        arrays.update({f"raw:{i}": a for i, a in batch.lookup.raw.items()})
        return arrays

    def _stage_ahead(self, batch: TrainingBatch) -> None:
        """Starts copying ``batch`` to the device (the DataLoader calls it for the next batch
        while the current one computes); a no-op once started, or without a transfer."""
        if self._transfer is not None and batch.staged is None:
            batch.staged = self._transfer.stage(self._batch_arrays(batch))

    def prepare_features(
        self, batch: TrainingBatch
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        """Turns a looked-up batch into tensors: (non-ID features, embeddings, labels).

        Summed slots give ``(batch, dim)``; raw slots ``(batch, sample_fixed_size, dim + 1)``
        with the 0/1 padding mask as the last channel. While training, the summed slots'
        tensors are column views of one buffer made by one autograd function, so that their
        backward costs each slot its own width; torch refuses to modify them in place
        (``RuntimeError: ... is a view and is being modified inplace``): use out-of-place
        operations on them (persia differs from PERSIA here).
        """
        if not isinstance(batch, TrainingBatch):
            raise PersiaError(
                f"forward expects a batch from persia.data.DataLoader, got {type(batch).__name__}"
            )
        previous = self.current_batch
        if previous is not None and previous is not batch:
            previous.discard()  # forward without backward: that batch will bring no gradient
        self.current_batch = batch
        requires_grad = self.preprocess_mode == PreprocessMode.TRAIN and batch.training
        pb = batch.batch
        lookup = batch.lookup
        if self._transfer is not None:
            self._stage_ahead(batch)
            on_device = batch.staged.tensors()
            batch.staged = None
        else:  # the CPU: the tensors share the arrays' memory
            on_device = {k: torch.from_numpy(a) for k, a in self._batch_arrays(batch).items()}
        non_id = [on_device[f"non_id:{i}"] for i in range(len(pb.non_id_type_features))]
        labels = None
        if self.preprocess_mode != PreprocessMode.INFERENCE:
            labels = [on_device[f"label:{i}"] for i in range(len(pb.labels))]
        summed = on_device["summed"].requires_grad_(requires_grad)
        raw = {i: on_device[f"raw:{i}"].requires_grad_(requires_grad) for i in lookup.raw}
        # the summed slots: views of ``summed`` whose backward costs each slot its own width
        sums = [(where, dim) for kind, where, dim in lookup.layout if kind == "sum"]
        slots = iter(split_slots(summed, sums))
        embeddings = [
            next(slots) if kind == "sum" else raw[where] for kind, where, _ in lookup.layout
        ]
        batch._tensors = (summed, raw)  # type: ignore[attr-defined]
        return non_id, embeddings, labels


class TrainCtx(EmbeddingCtx):
    """Training: forward, then ``backward(loss)`` updates the dense model synchronously and
    queues the embedding gradients for asynchronous application (PERSIA's API).

    Args:
        embedding_optimizer: optimizer of the embedding rows (``persia.embedding.optim``).
        dense_optimizer: torch optimizer of the dense model.
        grad_scalar_update_factor: with mixed precision, when a check of the embedding
            gradients (see :meth:`backward`) finds a NaN or infinity, the loss scale is divided
            by this factor (PERSIA's meaning; > 0, default 4).
        backward_buffer_size: gradient batches that may wait to be applied.
        backward_workers_size: PERSIA's gradient-sender threads; persia applies gradients on
            one thread (values other than the default warn once: no effect).
        grad_update_buffer_size: PERSIA internal; no effect (warns once when changed).
        lookup_emb_directly: PERSIA internal; no effect (warns once when changed).
        mixed_precision: on CUDA, :meth:`forward` runs the model under
            ``torch.autocast("cuda", torch.float16)`` (its floating-point output comes back as
            float32) and :meth:`backward` scales the loss with a ``torch.amp.GradScaler``
            (``ctx.grad_scaler``). The embedding gradients are unscaled (divided by the scale,
            in float32) before they leave for the parameter servers, and a step whose
            gradients the scaler (or a check, see :meth:`backward`) finds non-finite applies
            neither the dense nor the embedding gradients. On the CPU a no-op (PERSIA refused
            it there) unless ``cpu_mixed_precision``.
        cpu_mixed_precision: persia extension: with ``mixed_precision`` on the CPU, the same
            with ``torch.autocast("cpu", torch.bfloat16)`` and a CPU ``GradScaler`` (default
            False: the CPU computes in float32).
        nn_threads: persia extension: torch's threads for the dense step of a CPU model,
            ``"auto"`` (default; ``PERSIA_NN_THREADS`` when set), ``"keep"`` or an int >= 1.
            ``"auto"`` measures the first training steps and keeps one thread fewer than torch's
            count when that is faster: the case where the embedding path, which shares the
            cores, sets the pace (see ``persia.ctx._threads``). The choice is logged and read
            from :attr:`nn_threads_chosen`; torch's count is restored when the context exits.
            torch's results can differ in the last bits between thread counts: set an int for
            runs that must repeat bit for bit.
        distributed_option: a :class:`persia.distributed.DDPOption` (default
            :func:`persia.distributed.get_default_distributed_option`: gloo on CPU, NCCL on
            GPU); with ``WORLD_SIZE > 1`` the model is wrapped in ``DistributedDataParallel``. ``WORLD_SIZE > 1``
            needs the cluster backend (``backend="ray"``), where the ranks share one set of
            parameter servers; with the local backend each rank would train its own embedding
            table, so ``TrainCtx`` refuses it with :class:`PersiaError`.
        model, embedding_config, device_id: see :class:`EmbeddingCtx`.
    """

    def __init__(
        self,
        embedding_optimizer: EmbeddingOptimizer,
        dense_optimizer: torch.optim.Optimizer,
        grad_scalar_update_factor: float = 4,
        backward_buffer_size: int = 10,
        backward_workers_size: int = 8,
        grad_update_buffer_size: int = 60,
        lookup_emb_directly: bool = True,
        mixed_precision: bool = True,
        distributed_option: Any = None,
        *args: Any,
        model: torch.nn.Module | None = None,
        embedding_config: EmbeddingConfig | None = None,
        device_id: int | None = None,
        cpu_mixed_precision: bool = False,
        nn_threads: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            PreprocessMode.TRAIN,
            model,
            embedding_config,
            *args,
            device_id=device_id,
            **kwargs,
        )
        problems = []
        if not isinstance(embedding_optimizer, EmbeddingOptimizer):
            problems.append(
                "embedding_optimizer must be a persia.embedding.optim optimizer, "
                f"got {type(embedding_optimizer).__name__}"
            )
        if not isinstance(dense_optimizer, torch.optim.Optimizer):
            problems.append(
                f"dense_optimizer must be a torch.optim.Optimizer, got {type(dense_optimizer).__name__}"
            )
        if model is None:
            problems.append("model is required (TrainCtx(..., model=model))")
        factor = grad_scalar_update_factor
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not math.isfinite(factor)
            or not factor > 0
        ):
            problems.append(f"grad_scalar_update_factor must be a number > 0, got {factor!r}")
        if (
            isinstance(backward_buffer_size, bool)
            or not isinstance(backward_buffer_size, int)
            or backward_buffer_size < 1
        ):
            problems.append(
                f"backward_buffer_size must be an int >= 1, got {backward_buffer_size!r}"
            )
        if distributed_option is not None and not isinstance(
            distributed_option, DistributedBaseOption
        ):
            problems.append(
                "distributed_option must be a persia.distributed.DDPOption, "
                f"got {type(distributed_option).__name__}"
            )
        try:
            self.nn_threads = (
                parse_nn_threads(_settings.nn_threads(), _settings.PERSIA_NN_THREADS)
                if nn_threads is None
                else parse_nn_threads(nn_threads)
            )
        except PersiaError as exc:
            problems.append(str(exc))
        if problems:
            raise PersiaError("TrainCtx: " + "; ".join(problems))
        #: torch's thread count kept by ``nn_threads="auto"`` (None until chosen, or when
        #: nothing is chosen: a CUDA model, a single thread, or an explicit setting)
        self.nn_threads_chosen: int | None = None
        self._tuner: ThreadTuner | None = None
        self._saved_threads: int | None = None
        self._step_end = 0.0
        for name, value, default in (
            ("backward_workers_size", backward_workers_size, 8),
            ("grad_update_buffer_size", grad_update_buffer_size, 60),
            ("lookup_emb_directly", lookup_emb_directly, True),
        ):
            if value != default:
                warn_once(
                    _logger, f"TrainCtx.{name}", f"TrainCtx({name}=...) has no effect in persia"
                )
        self.embedding_optimizer = embedding_optimizer
        self.dense_optimizer = dense_optimizer
        self.backward_buffer_size = backward_buffer_size
        cuda = self.device.type == "cuda"
        self.mixed_precision = bool(mixed_precision) and (cuda or bool(cpu_mixed_precision))
        #: the autocast dtype of the model's forward pass under mixed precision
        self.amp_dtype = torch.float16 if cuda else torch.bfloat16
        if self.mixed_precision and cuda:
            warn_once(
                _logger,
                "TrainCtx.mixed_precision.autocast",
                "TrainCtx(mixed_precision=True) on CUDA: persia runs the model's forward under "
                "torch.autocast('cuda', torch.float16) as well as scaling the loss (PERSIA only "
                "scaled the loss); pass mixed_precision=False to train in float32",
            )
        self.grad_scalar_update_factor = grad_scalar_update_factor
        self.grad_scaler: Any = (
            torch.amp.GradScaler(self.device.type) if self.mixed_precision else None
        )
        #: backward() calls so far (the embedding gradients are checked when this is a multiple
        #: of ``embedding_gradient_check_frequency``)
        self.update_times = 0
        #: checks that found a NaN or infinity in the embedding gradients
        self.nonfinite_gradient_checks = 0
        #: steps (with a grad scaler) that applied neither dense nor embedding gradients
        #: because they were not finite
        self.skipped_steps = 0
        self.world_size = env.get_world_size()
        self.rank = env.get_rank()
        if self.world_size > 1 and self.backend == "local":
            raise PersiaError(
                f"TrainCtx: {_settings.WORLD_SIZE}={self.world_size} (rank {self.rank}, e.g. "
                "under torchrun) with the local backend: every rank would train its own "
                "embedding table. Share one set of parameter servers with the cluster backend: "
                'TrainCtx(backend="ray") or PERSIA_BACKEND=ray (persia-launcher nn-worker sets '
                "it), or persia train --backend ray --num-nn-workers N"
            )
        if self.world_size > 1:
            self.model = wrap_ddp(self.model, distributed_option, self.device)

    def _autocast(self) -> Any:
        if not self.mixed_precision:
            return None
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _enter(self) -> None:
        from persia.embedding.config import GlobalConfig, load_global_config

        source = self.global_config_file
        glob = source if isinstance(source, GlobalConfig) else load_global_config(source)
        if glob.common_config.job_type == "infer":
            raise ConfigError(
                "common_config.job_type: Infer makes the parameter servers read-only; TrainCtx "
                "needs job_type: Train (serve with persia.ctx.InferCtx)",
                source=glob.source,
            )
        # PERSIA's metrics_config: collect (and push to PERSIA_METRICS_GATEWAY_ADDR) before the
        # runtime is built, so that its roles (and the actors it starts) report
        telemetry.enable_from_config(glob.common_config.metrics_config, telemetry.NN, self.rank)
        close_last_runtime("TrainCtx")
        self._runtime = self._build_runtime(self.embedding_optimizer, self.backward_buffer_size)
        self._owns_runtime = True
        set_last_runtime(self._runtime)
        self._saved_training_allowed = True
        self._start_incremental_update()
        self._start_threads()

    def _start_threads(self) -> None:
        """Applies ``nn_threads`` to a CPU model (see the class docstring)."""
        if self.device.type != "cpu" or self.nn_threads == KEEP:
            return
        self._saved_threads = torch.get_num_threads()
        if self.nn_threads == AUTO:
            if self._saved_threads >= 2:
                self._tuner = ThreadTuner(self._saved_threads, torch.set_num_threads)
        else:
            torch.set_num_threads(int(self.nn_threads))
        self._step_end = 0.0

    def _stop_threads(self) -> None:
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        self._tuner = None

    def _tune_threads(self, tuner: ThreadTuner) -> None:
        """After a training step: the tuner's measurement, and its choice once made."""
        now = time.perf_counter()
        if self._step_end > 0.0:
            tuner.step(now - self._step_end)
            if tuner.decided is not None:
                self._tuner = None
                self.nn_threads_chosen = tuner.decided
                _logger.info(
                    f"TrainCtx: the dense step runs on {tuner.decided} torch thread(s) "
                    f'(nn_threads="auto": {tuner.reason}; set nn_threads or '
                    f"{_settings.PERSIA_NN_THREADS} to choose)"
                )
        self._step_end = now

    def wait_servers_ready(self) -> None:
        """Returns once every parameter-server shard answers (PERSIA's API). The context
        already waited for them when it was entered; this asks each shard again.

        Raises:
            PersiaError: outside the context.
            BackendError: a shard of the cluster backend is dead or silent past the timeout.
        """
        self.runtime.store.shard_stats()

    def _start_incremental_update(self) -> None:
        """With ``enable_incremental_update`` in ``global_config.yml``, write deltas of the
        changed rows (``incremental_buffer_size`` rows each) under ``incremental_dir``."""
        from persia.embedding.config import GlobalConfig, load_global_config

        source = self.global_config_file
        glob = source if isinstance(source, GlobalConfig) else load_global_config(source)
        ps = glob.embedding_parameter_server_config
        self._delta_writer = None
        if ps.enable_incremental_update:
            from persia.store.delta import DeltaWriter

            self._delta_writer = DeltaWriter(
                self.runtime.store,
                ps.incremental_dir,
                max_rows=ps.incremental_buffer_size,
                interval_s=self.runtime.delta_interval_s,
            ).start()
            # the Ray backend's shard recovery reads these deltas
            self.runtime.attach_delta_writer(self._delta_writer)

    def _exit(self) -> None:
        self._stop_threads()
        if self.current_batch is not None:
            self.current_batch.discard()
            self.current_batch = None
        if self._runtime is not None:
            self._runtime.flush()
        writer = getattr(self, "_delta_writer", None)
        if writer is not None:
            self._delta_writer = None
            writer.close()
        if self._runtime is not None:
            # the actors of the Ray backend push theirs too: they may outlive this process's
            # last push only to be killed with it, before their next periodic push
            self._runtime.push_metrics()
        telemetry.push_now()  # the values at the job's end (PERSIA's last push)

    def backward(
        self, loss: torch.Tensor, embedding_gradient_check_frequency: int = 20
    ) -> torch.Tensor:
        """Backpropagates ``loss``: steps the dense optimizer (all-reduced under DDP) and
        queues the embedding gradients of the current batch. Returns the (scaled) loss.

        Every ``embedding_gradient_check_frequency``-th call (the 1st, the ``f + 1``-th, ...;
        PERSIA's setting, an int >= 1) checks the batch's embedding gradients for NaN or
        infinity. When one is found, a warning says so (the parameter servers skip every
        gradient row that is not finite) and, with mixed precision, the loss scale is divided
        by ``grad_scalar_update_factor`` (PERSIA's rule) instead of the scaler's own update.

        With a grad scaler (mixed precision), the embedding gradients are divided by the
        loss scale (in float32) before they are sent, and a step is applied whole or not at
        all: when the scaler skips the dense step (its check of the dense gradients found a
        NaN or infinity) or a check of the embedding gradients fails, neither the dense nor
        the embedding gradients are applied (:attr:`skipped_steps` counts them).
        """
        f = embedding_gradient_check_frequency
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise PersiaError(f"embedding_gradient_check_frequency must be an int >= 1, got {f!r}")
        batch = self.current_batch
        if batch is None or not hasattr(batch, "_tensors"):
            raise PersiaError("backward() needs a batch: call ctx.forward(batch) first")
        scaler = self.grad_scaler
        if scaler is not None:
            loss = scaler.scale(loss)
            scale = float(scaler.get_scale())
        else:
            scale = 1.0
        loss.backward()
        summed, raw = batch._tensors
        del batch._tensors
        self.current_batch = None
        summed_grad = None if summed.grad is None else summed.grad.detach()
        raw_grads = {i: t.grad.detach() for i, t in raw.items() if t.grad is not None}
        grads = [g for g in (summed_grad, *raw_grads.values()) if g is not None]
        if scale != 1.0:
            for g in grads:  # unscaled where they are, in float32, before they leave
                g.div_(scale)
        finite = True
        checked = self.update_times % f == 0
        if checked and grads:
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if checked and scaler is not None and self.world_size > 1:
            # the ranks skip their dense steps together (or their models would drift apart)
            finite = _all_ranks(finite, self.device)
        if not finite:
            self.nonfinite_gradient_checks += 1
            _logger.warning(
                f"backward() call {self.update_times}: the embedding gradients hold NaN or "
                + (
                    "infinity (on this rank or another); the step is skipped (dense and "
                    "embedding gradients) and the loss scale drops by "
                    f"{self.grad_scalar_update_factor}x"
                    if scaler is not None
                    else "infinity; the parameter servers skip those rows"
                )
            )
        self.update_times += 1
        if scaler is None:
            if batch.training:
                self._send_gradients(batch, summed_grad, raw_grads)
            self.dense_optimizer.step()
        else:
            if finite:
                scaler.step(self.dense_optimizer)
                scaler.update()
                # the scale drops exactly when the scaler found the dense gradients non-finite
                # and skipped the dense step
                applied = not float(scaler.get_scale()) < scale
            else:
                scaler.update(scale / self.grad_scalar_update_factor)
                applied = False
            if not applied:
                self.skipped_steps += 1
                batch.discard()
                rec = telemetry.current()
                if rec.on and batch.training:
                    rec.grads_skipped(f.name for f in batch.batch.id_type_features)
            elif batch.training:
                self._send_gradients(batch, summed_grad, raw_grads)
        self.dense_optimizer.zero_grad()
        if self._tuner is not None:  # nn_threads="auto" still measuring
            self._tune_threads(self._tuner)
        return loss

    def _send_gradients(
        self,
        batch: TrainingBatch,
        summed_grad: torch.Tensor | None,
        raw_grads: dict[int, torch.Tensor],
    ) -> None:
        """Hands the batch's embedding gradients to the runtime: from a CUDA device through
        pinned buffers (the applier waits for the copies), from the CPU as they are."""
        grads = [g for g in (summed_grad, *raw_grads.values()) if g is not None]
        if self._transfer is not None:
            arrays, batch.grads_ready, batch.grads_done = self._transfer.to_host(grads)
        else:
            arrays = [g.numpy() for g in grads]
        it = iter(arrays)
        summed_np = None if summed_grad is None else next(it)
        raw_np = {i: next(it) for i in raw_grads}
        self.runtime.submit(batch, summed_np, raw_np)
        rec = telemetry.current()
        if rec.on:
            rec.trained(batch.batch.batch_size)

    def dump_checkpoint(  # type: ignore[override]
        self,
        dst_dir: str | os.PathLike,
        dense_model_filename: str = "dense.pt",
        jit_dense_model_filename: str = "jit_dense.pt",
        opt_filename: str = "opt.pt",
        blocking: bool = True,
        with_jit_model: bool = False,
        *,
        position: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Any:
        """Saves the dense model, the dense optimizer and every embedding row (see
        :meth:`EmbeddingCtx.dump_checkpoint`; the file name arguments are PERSIA's and kept for
        compatibility: everything lives in one verified generation)."""
        return self._dump_job(
            dst_dir,
            self.dense_optimizer.state_dict(),
            jit_dense_model_filename if with_jit_model else None,
            blocking,
            position,
            config,
        )

    def load_checkpoint(  # type: ignore[override]
        self,
        src_dir: str | os.PathLike,
        map_location: str | None = None,
        dense_model_filename: str = "dense.pt",
        opt_filename: str = "opt.pt",
        blocking: bool = True,
        *,
        embeddings: bool = True,
    ) -> Any:
        """Loads what :meth:`dump_checkpoint` saved, the dense optimizer's state included
        (``embeddings=False``: everything but the embedding rows). The file name arguments are
        PERSIA's and kept for compatibility (see :meth:`EmbeddingCtx.load_checkpoint`)."""
        ckpt = super().load_checkpoint(
            src_dir,
            map_location=map_location,
            dense_filename=dense_model_filename,
            blocking=blocking,
            embeddings=embeddings,
        )
        opt_state = ckpt.dense_optimizer_state(map_location)
        if opt_state is not None:
            self.dense_optimizer.load_state_dict(opt_state)
        return ckpt


def _all_ranks(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank of the initialised process group (this rank's
    value when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def eval_ctx(*args: Any, **kwargs: Any) -> EmbeddingCtx:
    """An :class:`EmbeddingCtx` in EVAL mode: lookups create nothing, no gradients."""
    return EmbeddingCtx(PreprocessMode.EVAL, *args, **kwargs)
