"""Runs a validated job: reader -> DataLoader (bounded staleness) -> TrainCtx, with evaluation,
checkpoints, progress and a JSON result.

The training loop is the one of ``examples/adult_income/train_local.py``; what the job file adds
is built here: the slots and parameter-server settings (:func:`embedding_configs`), the optimizers,
the model (:mod:`persia.job.models`) and the reader (:mod:`persia.job.readers`).

Evaluation and checkpoints in the middle of training happen at *pause points*: after yielding a
batch that ends an interval, the training dataset waits until the NN worker has trained that batch
and finished the evaluation or checkpoint. So no lookup of a later training batch runs during the
evaluation (the embedding worker has one lookup thread's scratch state) and every gradient of the
batches before it has been applied (the runtime is flushed first).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

import persia
from persia import env, telemetry
from persia.ctx import TrainCtx
from persia.data import DataLoader, IterableDataset
from persia.embedding import EmbeddingConfig
from persia.embedding.config import EmbeddingFileConfig, GlobalConfig, persia_configs
from persia.embedding.data import PersiaBatch
from persia.embedding.optim import EmbeddingOptimizer
from persia.errors import BatchError, CheckpointError, ConfigError
from persia.job.config import JobConfig, Source
from persia.job.models import batch_size_problem, build_model, uses_batch_norm
from persia.job.readers import JobReader
from persia.logger import get_default_logger
from persia.metrics import log_loss, roc_auc
from persia.runtime import registry
from persia.store.build import store_optimizer
from persia.utils import setup_seed

__all__ = [
    "embedding_configs",
    "embedding_optimizer",
    "job_hyper",
    "dense_optimizer",
    "evaluate",
    "job_to_dict",
    "Position",
    "run_job",
    "train_loop",
]

_logger = get_default_logger()


def embedding_configs(
    job: JobConfig, incremental_dir: str | None = None
) -> tuple[EmbeddingFileConfig, GlobalConfig]:
    """The job's slots and server settings as PERSIA's two configs (with incremental updates
    written to ``incremental_dir`` when given: what parameter-server recovery reads)."""
    spec = job.embedding
    if incremental_dir is not None:
        spec = replace(spec, incremental=True, incremental_dir=incremental_dir)
    emb_file, global_file = persia_configs(spec, source=job.source)
    if job.metrics.enable_metrics:  # the job file's metrics section is PERSIA's metrics_config
        common = replace(global_file.common_config, metrics_config=job.metrics)
        global_file = replace(global_file, common_config=common)
    return emb_file, global_file


def embedding_optimizer(job: JobConfig) -> EmbeddingOptimizer:
    """The embedding optimizer named by ``embedding.optimizer``."""
    return store_optimizer(job.embedding)


def job_hyper(job: JobConfig) -> EmbeddingConfig:
    """The initialisation range, admission probability and weight bound of new rows."""
    low, high = job.embedding.init
    return EmbeddingConfig(
        emb_initialization=(low, high),
        admit_probability=job.embedding.admit_probability,
        weight_bound=job.embedding.weight_bound,
    )


def _rank_strided(batches: Iterator[PersiaBatch], rank: int, world: int) -> Iterator[PersiaBatch]:
    """Batch ``i`` of ``batches`` when ``i % world == rank``; a trailing group of fewer than
    ``world`` batches is dropped, so that every NN worker trains as many batches (DDP)."""
    group: list[PersiaBatch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == world:
            yield group[rank]
            group = []


def dense_optimizer(job: JobConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The torch optimizer named by ``training.dense_optimizer``."""
    classes = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
    }
    cls = classes[job.training.dense_optimizer]
    return cls(model.parameters(), **dict(job.training.dense_optimizer_args))


class _Pauses:
    """Lets the NN worker stop the training dataset after given batches (see module doc)."""

    def __init__(self, every: list[int]) -> None:
        self.every = [e for e in every if e > 0]
        self.cond = threading.Condition()
        self.released = 0
        self.closed = False

    def due(self, count: int) -> bool:
        return any(count % e == 0 for e in self.every)

    def wait(self, count: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or self.released >= count)

    def release(self, count: int) -> None:
        with self.cond:
            self.released = max(self.released, count)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


@dataclass(frozen=True)
class Position:
    """Where training stands in the data, as saved with a checkpoint.

    ``batches`` / ``samples`` count every training batch / sample since the job started;
    ``epoch`` is the current epoch, ``batch`` / ``epoch_samples`` the batches / samples of it
    already trained. A resumed job skips exactly those batches of that epoch (the reader's
    order is a function of the seed and the epoch) and continues with the next one.
    """

    epoch: int = 0
    batch: int = 0
    batches: int = 0
    samples: int = 0
    epoch_samples: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON form (what ``dump_checkpoint(position=...)`` stores)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "batches": self.batches,
            "samples": self.samples,
            "epoch_samples": self.epoch_samples,
        }

    @staticmethod
    def from_dict(d: dict[str, Any], where: str) -> Position:
        """The position saved in checkpoint ``where``.

        Raises:
            CheckpointError: a field that is missing or not a non-negative integer.
        """
        values: dict[str, int] = {}
        problems = []
        for name in ("epoch", "batch", "batches", "samples", "epoch_samples"):
            v = d.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"position.{name} must be an integer >= 0, got {v!r}")
            else:
                values[name] = v
        if problems:
            raise CheckpointError(
                f"{where}: cannot resume (a checkpoint written by persia train holds the data "
                f"position): {'; '.join(problems)}"
            )
        return Position(**values)


class _TrainDataset(IterableDataset):
    def __init__(
        self,
        reader: JobReader,
        job: JobConfig,
        pauses: _Pauses,
        start: Position | None = None,
        stream: Callable[[], Iterable[PersiaBatch]] | None = None,
    ) -> None:
        super().__init__(buffer_size=job.training.forward_buffer_size)
        self.reader, self.job, self.pauses = reader, job, pauses
        # the batches come from the backend's data loaders (persia.backends.ray.loaders)
        self.stream = stream
        self.start = start or Position()
        # the position after each batch that ends a pause interval (read by the NN worker)
        self.positions: dict[int, Position] = {}
        self.last = self.start  # after the last batch yielded
        self._lock = threading.Lock()

    def position_after(self, count: int) -> Position | None:
        """The position after global batch ``count`` (recorded for pause points only)."""
        with self._lock:
            return self.positions.pop(count, None)

    def _reached(self, count: int, here: Position) -> None:
        """Global batch ``count`` is about to be yielded, ``here`` the position after it."""
        with self._lock:
            self.last = here
            if self.pauses.due(count):
                self.positions[count] = here

    def _stop_after(self, count: int) -> bool:
        """After yielding batch ``count``: wait there if it is a pause point; True to stop."""
        if self.pauses.due(count):
            self.pauses.wait(count)
        return self.pauses.closed

    def _streamed(self, stream: Callable[[], Iterable[PersiaBatch]]) -> Iterator[PersiaBatch]:
        """The batches of the job's data loaders (every epoch, already rank-strided)."""
        produced = count = 0
        for batch in stream():
            produced += batch.batch_size
            count += 1
            self._reached(count, Position(0, count, count, produced, produced))
            yield batch
            if self._stop_after(count):
                return

    def __iter__(self) -> Iterator[PersiaBatch]:
        if self.stream is not None:
            yield from self._streamed(self.stream)
            return
        t = self.job.training
        start = self.start
        produced = start.samples
        count = start.batches
        for epoch in range(start.epoch, t.epochs):
            resumed = epoch == start.epoch
            skip = start.batch if resumed else 0
            in_epoch = 0
            epoch_samples = 0
            # the samples before this epoch, as in the run that wrote the checkpoint, so that
            # the reader is asked for the very same batches (max_samples included)
            before = produced - start.epoch_samples if resumed else produced
            left = None if t.max_samples is None else t.max_samples - before
            if left is not None and left <= 0:
                return
            source: Iterator[PersiaBatch] = self.reader.batches(
                self.job.data.train,
                t.batch_size,
                training=True,
                seed=t.seed + epoch,
                max_samples=left,
            )
            world = env.get_world_size()
            if world > 1:  # one of several NN workers (persia.backends.ray.ddp): its batches
                source = _rank_strided(source, env.get_rank(), world)
            for batch in source:
                in_epoch += 1
                epoch_samples += batch.batch_size
                if in_epoch <= skip:
                    continue
                produced += batch.batch_size
                count += 1
                self._reached(count, Position(epoch, in_epoch, count, produced, epoch_samples))
                yield batch
                if self._stop_after(count):
                    return


def evaluate(
    ctx: TrainCtx,
    reader: JobReader,
    source: Source,
    batch_size: int,
    max_samples: int | None,
    logits: bool,
) -> dict[str, Any]:
    """Test AUC and log loss of the current model (lookups create no rows)."""
    model = ctx.model
    if model is None:
        raise ConfigError("evaluate: the context has no model")
    model.eval()
    preds, labels = [], []
    try:
        with torch.no_grad():
            for i, pb in enumerate(
                reader.batches(source, batch_size, training=False, max_samples=max_samples)
            ):
                item = ctx.runtime.lookup(pb, False, i, None)
                output, label = ctx.forward(item)
                if logits:
                    output = torch.sigmoid(output)
                preds.append(output.detach().cpu().numpy().reshape(-1))
                labels.append(label[0].cpu().numpy().reshape(-1))  # type: ignore[index]
    finally:
        ctx.current_batch = None
        model.train()
    if not preds:
        return {"test_auc": None, "test_logloss": None, "test_samples": 0}
    y, p = np.concatenate(labels), np.concatenate(preds).astype(np.float64)
    both = 0 < y.sum() < y.size
    return {
        "test_auc": roc_auc(y, p) if both else None,
        "test_logloss": log_loss(y, p),
        "test_samples": int(y.size),
    }


class _Progress:
    """What the user sees while training runs: a tqdm bar on a terminal (with a total and an
    ETA when the number of training samples is known), else log lines every ``every`` batches,
    or nothing; evaluations and notes are logged in every mode but ``none``'s bar. With
    ``metrics_file`` the loss and throughput of every interval and each evaluation are also
    written there as JSON lines.

    Throughput has one definition, used by the log lines, the bar and the job's summary:
    samples trained in this run divided by :attr:`train_s`, the seconds since training began
    (:meth:`begin`) less the pauses for evaluations and checkpoints (:meth:`paused`).
    """

    def __init__(
        self,
        mode: str,
        every: int,
        total: int | None,
        stream: TextIO,
        *,
        metrics_file: str | Path | None = None,
        worker: str = "",
        tensorboard: str | Path | None = None,
    ) -> None:
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode, self.every, self.worker = mode, every, worker
        self.total, self.stream = total, stream
        self.bar: Any = None
        self.metrics = open(metrics_file, "a", encoding="utf-8") if metrics_file else None  # noqa: SIM115
        self.start = time.perf_counter()
        self.paused_s = 0.0
        self.samples = 0
        self.loss_sum = 0.0
        self.loss_n = 0
        self.stale_sum = 0
        self.stale_n = 0
        self.tb: Any = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard))

    def begin(self, initial: int = 0) -> None:
        """Training starts now (the clock of :attr:`train_s`), ``initial`` samples already
        trained (a resumed job); the bar, if any, appears."""
        if self.mode == "bar" and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=initial,
                unit="samples",
                unit_scale=True,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )
        self.start = time.perf_counter()
        self.paused_s = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """An evaluation or checkpoint: its time does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    @property
    def train_s(self) -> float:
        """Seconds of training so far, pauses excluded."""
        return max(time.perf_counter() - self.start - self.paused_s, 0.0)

    def rate(self) -> float | None:
        """Samples per second of this run so far (see the class doc)."""
        t = self.train_s
        return self.samples / t if t > 0 else None

    def step(self, batches: int, size: int, loss: float, staleness: int | None) -> None:
        """Training batch number ``batches`` (counted since the job began, resumes included)
        of ``size`` samples trained with ``loss``."""
        self.samples += size
        self.loss_sum += loss
        self.loss_n += 1
        if staleness is not None:
            self.stale_sum += staleness
            self.stale_n += 1
        if self.bar is not None:
            self.bar.update(size)
            if batches % 10 == 0:
                self.bar.set_postfix(
                    batch=batches, loss=f"{loss:.4f}", staleness=staleness, refresh=False
                )
        if batches % self.every != 0:
            return
        rate = self.rate()
        mean_loss = self.loss_sum / self.loss_n
        rec = telemetry.current()
        if rec.on:
            rec.progress(rate, mean_loss)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", mean_loss, batches)
            if rate is not None:
                self.tb.add_scalar("train/samples_per_s", rate, batches)
            if self.stale_n:
                self.tb.add_scalar("train/staleness", self.stale_sum / self.stale_n, batches)
            self.tb.flush()
        self.stale_sum, self.stale_n = 0, 0
        if self.bar is None and self.mode == "log":
            shown = "n/a" if rate is None else f"{rate:,.0f}"
            _logger.info(
                f"{self.worker}batch {batches} samples {self.samples} loss {mean_loss:.4f} "
                f"{shown} samples/s staleness {staleness}"
            )
        self.record(
            {
                "event": "train",
                "batch": batches,
                "samples": self.samples,
                "loss": mean_loss,
                "samples_per_s": rate,
                "train_s": self.train_s,
                "staleness": staleness,
            }
        )
        self.loss_sum, self.loss_n = 0.0, 0

    def evaluation(self, batches: int, samples: int, result: dict[str, Any]) -> None:
        """A periodic evaluation's result: logged as it happens, and recorded."""

        def f(x: Any) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        self.note(
            f"{self.worker}eval at batch {batches}: test AUC {f(result.get('test_auc'))}, "
            f"log loss {f(result.get('test_logloss'))} on {result.get('test_samples')} samples",
            always=True,
        )
        self.record({"event": "eval", "batch": batches, "samples": samples, **result})
        self.scalars(batches, result)

    def scalars(self, batches: int, result: dict[str, Any]) -> None:
        """An evaluation's AUC and log loss as metrics and TensorBoard scalars."""
        telemetry.current().test_auc(result.get("test_auc"))
        if self.tb is not None:
            for key, tag in (("test_auc", "eval/auc"), ("test_logloss", "eval/logloss")):
                value = result.get(key)
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(tag, value, batches)
            self.tb.flush()

    def record(self, entry: dict[str, Any]) -> None:
        """One JSON line to the metrics file, if there is one."""
        if self.metrics is not None:
            entry = {"time": time.time(), **_jsonable(entry)}
            self.metrics.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self.metrics.flush()

    def note(self, message: str, always: bool = False) -> None:
        """A line on stderr (above the bar); with ``--progress none`` only if ``always``."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        elif self.mode != "none" or always:
            _logger.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def close_tensorboard(self) -> None:
        """Closes the TensorBoard writer (after the final evaluation's scalars)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _total_samples(reader: JobReader, job: JobConfig, stream: Any, world: int) -> int | None:
    """The samples this NN worker will train, when known (the progress bar's total)."""
    if stream is not None:
        return None
    t = job.training
    rows = reader.known_rows(job.data.train)
    total = rows * t.epochs if rows is not None else None
    if t.max_samples is not None:
        total = t.max_samples if total is None else min(total, t.max_samples)
    return None if total is None else total // world


def _pause_work(
    ctx: TrainCtx,
    job: JobConfig,
    reader: JobReader,
    batches: int,
    samples: int,
    logits: bool,
    evals: list[dict[str, Any]],
    progress: _Progress,
    position: Position | None = None,
) -> None:
    """The evaluation and / or checkpoint due after ``batches`` training batches."""
    t = job.training
    if job.data.test is not None and t.eval_every_batches and batches % t.eval_every_batches == 0:
        # with several NN workers every rank evaluates the same (allreduced) model on the same
        # batches (DDP's forward may sync buffers: a collective every rank must join), after
        # every rank applied its gradients, and none trains on before all are done
        with _all_ranks_wait():
            result = evaluate(
                ctx, reader, job.data.test, t.eval_batch_size, t.eval_max_samples, logits
            )
        evals.append({"batch": batches, "samples": samples, **result})
        progress.evaluation(batches, samples, result)
    if (
        t.checkpoint_dir
        and t.checkpoint_every_batches
        and batches % t.checkpoint_every_batches == 0
    ):
        _dump(ctx, job, position)
        progress.note(f"checkpoint at batch {batches}: {t.checkpoint_dir}")


def _dump(ctx: TrainCtx, job: JobConfig, position: Position | None) -> None:
    """Writes the job's checkpoint to ``training.checkpoint_dir``, with the data position and
    the number of NN workers (a checkpoint resumes with as many: each one's position counts its
    own rank-strided batches).

    With several NN workers (one DDP group sharing the parameter servers) every worker applies
    its pending gradients, then rank 0 writes the checkpoint (the allreduced dense model is the
    same on every rank) while the others wait: no rank trains on until it is written."""
    directory = job.training.checkpoint_dir
    if directory is None:
        return
    world = env.get_world_size()
    saved = {**position.to_dict(), "nn_workers": world} if position is not None else None
    if world == 1:
        ctx.dump_checkpoint(directory, position=saved, config=job_to_dict(job))
        return
    ctx.runtime.flush()
    with _all_ranks_wait():
        if env.get_rank() == 0:
            ctx.dump_checkpoint(directory, position=saved, config=job_to_dict(job))


@contextlib.contextmanager
def _all_ranks_wait() -> Iterator[None]:
    """With several NN workers: a barrier before and after the body; nothing with one."""
    if env.get_world_size() == 1:
        yield
        return
    import torch.distributed as dist

    dist.barrier()
    try:
        yield
    finally:
        dist.barrier()


def _resume(ctx: TrainCtx, resume: str | Path) -> Position:
    """Loads checkpoint ``resume`` into ``ctx`` and returns its data position. With several NN
    workers rank 0 restores the shared embedding rows and every rank the dense model and
    optimizer; no rank starts training before all have loaded.

    Raises:
        CheckpointError: not a checkpoint with a data position, or written by another number
            of NN workers.
    """
    world = env.get_world_size()
    where = str(resume)
    info = ctx.load_checkpoint(resume, embeddings=env.get_rank() == 0)
    saved = info.position if info is not None and info.position is not None else {}
    position = Position.from_dict(saved, where)
    written_by = saved.get("nn_workers", 1)
    if written_by != world:
        raise CheckpointError(
            f"{where}: written by {written_by} NN worker(s), resumed with {world}: a checkpoint "
            f"resumes with as many NN workers as wrote it (each one's data position counts its "
            f"own share of the batches)"
        )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return position


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """The resolved job as a JSON dict (saved with each checkpoint; informative only)."""
    out = _jsonable(job)
    return out if isinstance(out, dict) else {}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def run_job(
    job: JobConfig,
    *,
    stderr: TextIO | None = None,
    cluster: Any = None,
    resume: str | Path | None = None,
    on_trained: Callable[[TrainCtx, JobConfig, Any], Any] | None = None,
    export: Any = None,
    metrics_file: str | Path | None = None,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """Trains and tests the job; returns the result (what ``persia train`` prints as JSON).

    The backend named by ``training.backend`` runs :func:`train_loop` (through the backend
    registry, :mod:`persia.runtime.registry`): ``local`` right here, ``ray`` with the parameter
    servers (and, as ``cluster`` says, embedding workers, data loaders and several NN workers)
    as Ray actors; ``cluster`` is a :class:`persia.backends.ray.ClusterConfig` (default settings
    if None).

    ``resume`` is a checkpoint directory written by a job like this one: its embeddings (with
    optimizer state), dense model and dense optimizer are loaded, and training continues at
    the data position saved with it. ``on_trained(ctx, job, reader_stats)`` runs at the end of
    training, once (on rank 0 between barriers with several NN workers): the serving export
    (:func:`persia.serving.run_and_export`) is such a hook. ``metrics_file`` gets the loss,
    throughput, evaluations and result as JSON lines, and ``tensorboard`` (a folder) the loss,
    samples/s, staleness and evaluations as TensorBoard scalars (see :func:`train_loop`).

    Raises:
        ConfigError: a setting that only shows up when the job is built (model arguments, ...).
        BatchError: data that cannot be read as configured.
        CheckpointError: ``resume`` is not a readable checkpoint of this job.
    """
    if export is not None:
        raise ConfigError(
            "run_job(export=...) moved to persia.serving.run_and_export(job, export_dir, ...) "
            "(the job floor does not import serving); persia train --export is unchanged"
        )
    t = job.training
    if cluster is not None and t.backend != "ray":
        raise ConfigError(f"cluster settings need training.backend 'ray', got {t.backend!r}")
    options: dict[str, Any] = {"stderr": stderr, "resume": resume, "on_trained": on_trained}
    if metrics_file is not None:
        options["metrics_file"] = str(metrics_file)
    if tensorboard is not None:
        options["tensorboard"] = str(tensorboard)
    if cluster is not None:
        options["cluster"] = cluster
    return registry.backend(t.backend).run_job(train_loop, job, **options)


def train_loop(
    job: JobConfig,
    *,
    stderr: TextIO | None = None,
    cluster: Any = None,
    resume: str | Path | None = None,
    on_trained: Callable[[TrainCtx, JobConfig, Any], Any] | None = None,
    stream: Callable[[], Iterable[PersiaBatch]] | None = None,
    on_data_end: Callable[[], None] | None = None,
    incremental_dir: str | None = None,
    metrics_file: str | Path | None = None,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """The training loop of one NN worker, as a plain function that a backend calls.

    Args:
        job: the validated job.
        stderr: where progress goes (default: ``sys.stderr``).
        cluster: the backend's settings, handed to :class:`TrainCtx` (None: the backend's
            defaults).
        resume: a checkpoint directory to continue from.
        on_trained: called as ``on_trained(ctx, job, reader_stats)`` after training and testing,
            by rank 0 between barriers (the serving export).
        stream: the batches of the backend's data loaders (None: read ``data.train`` here).
        on_data_end: called once the stream is exhausted (waits for the data loaders).
        incremental_dir: where the parameter servers' incremental deltas go (recovery).
        metrics_file: a file that gets one JSON line per log interval (loss, throughput), per
            periodic evaluation and the final result (written by rank 0 only).
        tensorboard: a folder that gets TensorBoard scalars (rank 0 only): ``train/loss``,
            ``train/samples_per_s`` and ``train/staleness`` (the interval's mean) every
            ``log_every_batches`` batches, ``eval/auc`` and ``eval/logloss`` per evaluation
            (periodic and final).

    Raises:
        BatchError: no training batch was read (and the job is not resumed), or data that
            cannot be read as configured (naming the file, the column and the rows).
    """
    t = job.training
    if resume is not None and not Path(resume).is_dir():
        raise CheckpointError(f"--resume: checkpoint directory {str(resume)!r} does not exist")
    start = time.perf_counter()
    setup_seed(t.seed)
    reader = JobReader(job.data)
    stats = reader.stats
    slot_dims = [s.dim for s in job.embedding.slots]
    model = build_model(job.model.type, job.model.args, len(job.data.dense), slot_dims)
    # a batch of one sample cannot train a model with batch normalisation: refused for the
    # whole job, skipped when it is the last, short batch of an epoch
    single_ok = not uses_batch_norm(model)
    problem = batch_size_problem(model, job.model.type, t.batch_size)
    if problem:
        raise ConfigError(problem)
    logits = job.model.builtin or job.model.output == "logits"
    loss_fn: torch.nn.Module = torch.nn.BCEWithLogitsLoss() if logits else torch.nn.BCELoss()
    emb_file, global_file = embedding_configs(job, incremental_dir)
    emb_opt = embedding_optimizer(job)
    dense_opt = dense_optimizer(job, model)
    hyper = job_hyper(job)
    world = env.get_world_size()
    progress = _Progress(
        t.progress,
        t.log_every_batches,
        _total_samples(reader, job, stream, world),
        stderr or sys.stderr,
        metrics_file=metrics_file if env.get_rank() == 0 else None,
        worker=f"NN worker {env.get_rank()}: " if world > 1 else "",
        tensorboard=tensorboard if env.get_rank() == 0 else None,
    )
    pauses = _Pauses([t.eval_every_batches if job.data.test else 0, t.checkpoint_every_batches])
    evals: list[dict[str, Any]] = []
    samples = 0
    batches = 0
    start_at = Position()
    loss_sum = 0.0
    train_s = 0.0
    skipped = 0  # one-sample batches a batch-normalised model cannot train on
    try:
        with TrainCtx(
            emb_opt,
            dense_opt,
            model=model,
            mixed_precision=False,
            embedding_config=hyper,
            embedding_config_file=emb_file,
            global_config_file=global_file,
            backend=t.backend,
            cluster=cluster,
        ) as ctx:
            if resume is not None:
                start_at = _resume(ctx, resume)
                progress.note(
                    f"resumed from {resume} after batch {start_at.batches} "
                    f"({start_at.samples} samples trained; epoch {start_at.epoch}, "
                    f"{start_at.batch} of its batches done)"
                )
                batches, samples = start_at.batches, start_at.samples
            dataset = _TrainDataset(reader, job, pauses, start_at, stream)
            loader = DataLoader(
                dataset,
                forward_buffer_size=t.forward_buffer_size,
                embedding_staleness=t.staleness,
                reproducible=t.reproducible,
            )
            progress.begin(initial=start_at.samples)
            # Held in a variable so that an error closes the pauses before the loader's
            # generator is finalised (its close joins the lookup thread, which may be paused).
            batches_iter = iter(loader)
            try:
                for batch in batches_iter:
                    size = batch.batch.batch_size
                    if size == 1 and not single_ok:  # (its permit returns with the next one)
                        skipped += 1
                        batches += 1
                        samples += size
                    else:
                        output, labels = ctx.forward(batch)
                        loss = loss_fn(output, labels[0])  # type: ignore[index]
                        ctx.backward(loss)
                        samples += size
                        batches += 1
                        value = float(loss.item())
                        loss_sum += value
                        progress.step(batches, size, value, batch.staleness)
                    if pauses.due(batches):
                        with progress.paused():
                            ctx.runtime.flush()
                            _pause_work(
                                ctx,
                                job,
                                reader,
                                batches,
                                samples,
                                logits,
                                evals,
                                progress,
                                dataset.position_after(batches),
                            )
                        pauses.release(batches)
            except BaseException:
                pauses.close()
                batches_iter.close()  # type: ignore[attr-defined]
                raise
            ctx.runtime.flush()
            train_s = progress.train_s
            if on_data_end is not None:
                on_data_end()
            progress.close()
            final: dict[str, Any] = {"test_auc": None, "test_logloss": None, "test_samples": 0}
            if job.data.test is not None:
                final = evaluate(
                    ctx, reader, job.data.test, t.eval_batch_size, t.eval_max_samples, logits
                )
                progress.scalars(batches, final)
            if t.checkpoint_dir:
                _dump(ctx, job, dataset.last)
            if on_trained is not None:
                # several NN workers: rank 0 runs it once every rank's gradients are applied
                with _all_ranks_wait():
                    if env.get_rank() == 0:
                        on_trained(ctx, job, stats)
            report = loader.staleness_report()
            shard_rows = ctx.get_embedding_size()
            rows = sum(shard_rows)
            recovery = ctx.runtime.recovery_report()
            recovered = _jsonable(recovery) if recovery is not None else None
    finally:
        pauses.close()
        progress.close()
        progress.close_tensorboard()
    if skipped:
        _logger.warning(
            f"skipped {skipped} training batch(es) of one sample: model {job.model.type!r} "
            "uses batch normalisation, which needs at least 2 samples per batch"
        )
    trained = batches - start_at.batches - skipped
    if trained == 0 and resume is None:
        raise BatchError(
            "data.train: no training batch was read"
            + (f" (fewer batches than the {world} NN workers)" if world > 1 else "")
            + "; check the files and training.max_samples"
        )
    result = {
        "test_auc": _finite(final["test_auc"]),
        "test_logloss": _finite(final["test_logloss"]),
        "test_samples": final["test_samples"],
        "train_samples": samples - start_at.samples,
        "train_batches": batches - start_at.batches,
        "train_loss": loss_sum / trained if trained > 0 else None,
        "skipped_batches": skipped,
        # one definition of throughput: _Progress's (log lines, bar and this alike)
        "samples_per_s": (samples - start_at.samples) / train_s if train_s > 0 else None,
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "staleness_max": report.max,
        "staleness_mean": report.mean,
        "staleness_histogram": {str(k): v for k, v in sorted(report.histogram.items())},
        "staleness_bound": t.staleness,
        "embedding_rows": int(rows),
        "dense_rows_for_stats": stats.rows,
        "evals": evals,
        "model": job.model.type,
        "seed": t.seed,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "checkpoint_dir": str(Path(t.checkpoint_dir)) if t.checkpoint_dir else None,
        "resumed_from": (
            {"checkpoint": str(resume), **start_at.to_dict()} if resume is not None else None
        ),
        "export_dir": None,
        "backend": t.backend,
        "num_ps": len(shard_rows),
        "num_nn_workers": world,
        "persia_version": persia.__version__,
    }
    if recovered is not None:  # --recover: parameter-server shards restored during the job
        result["recovery"] = recovered
    if metrics_file is not None and env.get_rank() == 0:
        with open(metrics_file, "a", encoding="utf-8") as out:
            entry = {"event": "result", "time": time.time(), **_jsonable(result)}
            out.write(json.dumps(entry, separators=(",", ":")) + "\n")
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A short human summary of a result."""

    def f(x: Any, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    return [
        f"trained {result['train_samples']} samples in {result['train_batches']} batches, "
        f"{f(result['samples_per_s'], ',.0f')} samples/s; mean train loss "
        f"{f(result['train_loss'], '.4f')}",
        f"test AUC {f(result['test_auc'], '.4f')}, log loss {f(result['test_logloss'], '.4f')} "
        f"on {result['test_samples']} samples",
        f"staleness max {result['staleness_max']} mean {result['staleness_mean']:.2f} "
        f"(bound {result['staleness_bound']}); {result['embedding_rows']} embedding rows; "
        f"wall {result['wall_s']:.1f} s",
    ]


def dumps(result: dict[str, Any]) -> str:
    """The result as one JSON line."""
    return json.dumps(result, separators=(",", ":"))
