"""``persia train JOB.yaml``: train and test the model a job file describes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "train and test the model described by a job file"
DESCRIPTION = """\
Train and test the model described by JOB (a YAML job file; see docs/job-file.md).

The data is checked first, as `persia validate --data` does: every problem (a missing file or
column, no training rows, a label with one class only, dense values that do not parse) is
reported at once, with exit status 2, before anything is trained.

Progress goes to stderr: a progress bar on a terminal (with a total and an ETA when the number
of training rows is known), periodic log lines otherwise, each periodic evaluation as it
happens, and a summary at the end. The last line on stdout is one JSON object with test_auc,
test_logloss, samples_per_s, wall_s, staleness_max, staleness_mean, embedding_rows, backend,
num_ps, num_nn_workers, persia_version and more. --metrics-file writes the training loss,
the evaluations and the throughput as JSON lines as they happen; --tensorboard DIR writes them
as TensorBoard scalars.

Prometheus metrics (docs/metrics.md): --metrics-port serves them for scraping; the job file's
metrics section (PERSIA's metrics_config: enable_metrics, push_interval_seconds, job_name)
pushes them to the Pushgateway at $PERSIA_METRICS_GATEWAY_ADDR, from every role."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``train`` to the subcommands."""
    p = sub.add_parser(
        "train",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", metavar="JOB", help="the job file (YAML)")
    add_set_option(p)
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "none"),
        default=None,
        help="progress display (default: training.progress of the job, auto)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue from the checkpoint in DIR (written with training.checkpoint_dir): "
        "embeddings with optimizer state, dense model and optimizer, data position",
    )
    p.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="at the end, export the model for serving to DIR (see docs/serving.md)",
    )
    p.add_argument(
        "--metrics-file",
        default=None,
        metavar="PATH",
        help="write the training loss and throughput (every training.log_every_batches "
        "batches), each evaluation and the final result to PATH as JSON lines",
    )
    p.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="write TensorBoard scalars to DIR: train/loss, train/samples_per_s and "
        "train/staleness every training.log_every_batches batches, eval/auc and eval/logloss "
        "per evaluation (needs the tensorboard package)",
    )
    g = p.add_argument_group("Prometheus metrics (docs/metrics.md)")
    g.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve this process's metrics at http://HOST:PORT/metrics for Prometheus to scrape",
    )
    g.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address the metrics endpoint binds (default 0.0.0.0)",
    )
    g.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        metavar="S",
        help="after the job, keep the endpoint up until it is scraped once more (at most S "
        "seconds), so that Prometheus sees the final values (default 0)",
    )
    add_cluster_options(p)
    p.set_defaults(run=run)
    return p


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """``--backend ray`` and its placement options (see docs/cluster.md)."""
    g = p.add_argument_group("cluster backend (Ray)")
    g.add_argument(
        "--backend",
        choices=("local", "ray"),
        default=None,
        help="where the roles run (default: training.backend of the job, local)",
    )
    g.add_argument(
        "--recover",
        action="store_true",
        default=None,
        help="restore a dead parameter-server shard from the last checkpoint plus incremental "
        "deltas and keep training (one NN worker; see docs/cluster.md, Recovery)",
    )
    g.add_argument(
        "--num-ps",
        type=int,
        default=None,
        metavar="N",
        help="parameter-server actors (default: embedding.shards of the job)",
    )
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster is started)",
    )
    g.add_argument(
        "--ps-cpus",
        type=float,
        default=0.25,
        metavar="CPUS",
        help="CPUs each parameter-server actor asks Ray for (default 0.25)",
    )
    g.add_argument(
        "--transport",
        choices=("zmq", "ray"),
        default="zmq",
        help="channel of the per-batch lookups and gradients (default zmq)",
    )
    g.add_argument(
        "--insecure-channels",
        action="store_true",
        help="ZeroMQ's NULL mechanism on the job's channels: unauthenticated and unencrypted, "
        "for trusted networks only (default: CURVE, only the job's own processes get in)",
    )
    g.add_argument(
        "--wire-compression",
        choices=("none", "f16"),
        default=None,
        help="f16: rows and gradients between embedding workers and parameter servers cross "
        "the channel as float16 with a per-row scale, about half the bytes (default "
        "$PERSIA_WIRE_COMPRESSION, else none)",
    )
    g.add_argument(
        "--num-nn-workers",
        type=int,
        default=None,
        metavar="W",
        help="NN-worker processes (Ray actors) training together with DDP over gloo, each on "
        "every W-th batch (default 1: this process)",
    )
    g.add_argument(
        "--nn-cpus",
        type=float,
        default=0.5,
        metavar="CPUS",
        help="CPUs each NN-worker actor asks Ray for (default 0.5)",
    )
    g.add_argument(
        "--num-data-loaders",
        type=int,
        default=None,
        metavar="D",
        help="data-loader actors reading the training input, each every D-th batch, and "
        "streaming it to the NN workers (any number for any --num-nn-workers, the last "
        "incomplete round of one batch per NN worker dropped; default 0: the NN workers read it)",
    )
    g.add_argument(
        "--loader-cpus",
        type=float,
        default=0.25,
        metavar="CPUS",
        help="CPUs each data-loader actor asks Ray for (default 0.25)",
    )
    g.add_argument(
        "--num-embedding-workers",
        type=int,
        default=None,
        metavar="M",
        help="embedding-worker actors doing the lookups and gradient aggregation for the NN "
        "workers, round robin by batch (default 0: inside each NN worker)",
    )
    g.add_argument(
        "--embedding-worker-cpus",
        type=float,
        default=0.25,
        metavar="CPUS",
        help="CPUs each embedding-worker actor asks Ray for (default 0.25)",
    )
    g.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        metavar="S",
        help="longest call to a role before the job fails (default $PERSIA_RAY_TIMEOUT_S, 60)",
    )


def cluster_config(args: argparse.Namespace, backend: str) -> Any:
    """The ClusterConfig of the options, or None for the local backend."""
    given = [
        f"--{n.replace('_', '-')}"
        for n in (
            "num_ps",
            "address",
            "timeout_s",
            "num_nn_workers",
            "num_data_loaders",
            "num_embedding_workers",
            "recover",
        )
        if getattr(args, n, None) is not None
    ]
    if getattr(args, "insecure_channels", False):
        given.append("--insecure-channels")
    if getattr(args, "wire_compression", None) is not None:
        given.append("--wire-compression")
    if backend != "ray":
        if given:
            from persia.errors import ConfigError

            raise ConfigError(f"{', '.join(given)} need --backend ray (or training.backend: ray)")
        return None
    from persia.backends.ray.backend import ClusterConfig

    return ClusterConfig(
        num_ps=args.num_ps,
        address=args.address,
        ps_num_cpus=args.ps_cpus,
        transport=args.transport,
        channel_security="null" if getattr(args, "insecure_channels", False) else None,
        wire_compression=getattr(args, "wire_compression", None),
        timeout_s=args.timeout_s,
        num_nn_workers=args.num_nn_workers if args.num_nn_workers is not None else 1,
        nn_num_cpus=args.nn_cpus,
        num_data_loaders=args.num_data_loaders if args.num_data_loaders is not None else 0,
        loader_num_cpus=args.loader_cpus,
        num_embedding_workers=getattr(args, "num_embedding_workers", None) or 0,
        ew_num_cpus=getattr(args, "embedding_worker_cpus", 0.25),
        recover=bool(getattr(args, "recover", None)),
    )


def add_set_option(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable), shared with ``validate``."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the job file, e.g. training.staleness=1 (VALUE is read as "
        "YAML; repeatable; validated like the file)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``persia train``."""
    from persia.job.config import load_job

    overrides = list(args.overrides)
    if args.progress is not None:
        overrides.append(f"training.progress={args.progress}")
    if getattr(args, "backend", None) is not None:
        overrides.append(f"training.backend={args.backend}")
    job = load_job(args.job, overrides)
    cluster = cluster_config(args, job.training.backend)

    from persia.errors import ConfigError
    from persia.job.validate import check_data

    problems = check_data(job)  # what `persia validate --data` checks, before any training
    if problems:
        raise ConfigError(problems, source=args.job)

    from persia.job.runner import dumps, run_job, summary_lines
    from persia.logger import get_default_logger

    logger = get_default_logger()
    logger.info(
        f"persia train {args.job}: model {job.model.type}, {len(job.embedding.slots)} slots"
    )
    options = {
        "cluster": cluster,
        "resume": getattr(args, "resume", None),
        "metrics_file": getattr(args, "metrics_file", None),
    }
    tensorboard = getattr(args, "tensorboard", None)
    if tensorboard is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"--tensorboard needs the tensorboard package (pip install tensorboard): {exc}"
            ) from None
        options["tensorboard"] = tensorboard
    from persia import telemetry

    port = getattr(args, "metrics_port", None)
    if port is not None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--metrics-port must be a port number (0-65535), got {port}")
        server = telemetry.serve(port, args.metrics_host)
        logger.info(f"metrics at http://{args.metrics_host}:{server.port}/metrics")
    export = getattr(args, "export", None)
    try:
        if export is not None:
            from persia.serving import run_and_export

            result = run_and_export(job, export, **options)
        else:
            result = run_job(job, **options)
    finally:  # the last push, and the endpoint's last scrape
        telemetry.shutdown(linger_s=getattr(args, "metrics_linger", 0.0) if port else 0.0)
    for line in summary_lines(result):
        logger.info(line)
    sys.stdout.write(dumps(result) + "\n")
    sys.stdout.flush()
    return 0
