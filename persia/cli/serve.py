"""``persia serve DIR``: an HTTP and gRPC inference server for an export or a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "serve an export or a PERSIA-API checkpoint over HTTP (FastAPI) and gRPC"
DESCRIPTION = """\
Serve DIR: a job-file export (persia export / persia train --export) or a checkpoint written by
TrainCtx.dump_checkpoint(dir, with_jit_model=True) (persia.serving.open_model opens either).

HTTP (uvicorn, one process): POST /predict (JSON rows; exports only), POST /predict/batch
(PersiaBatch.to_bytes()), GET /healthz, /readyz, /metrics, /openapi.json, /docs.
gRPC: TorchServe's inference API (InferenceAPIsService/Predictions, input key "batch"), so
PERSIA's serve_client.py runs unchanged against --grpc-port (default 7070).
--follow DIR applies the training job's deltas as they are written (checkpoints).
--backend ray --replicas N deploys the same application on Ray Serve, each replica following
the deltas itself. Once listening, one JSON line on stdout gives the addresses.
--token-file FILE (or $PERSIA_SERVE_TOKEN) requires "Authorization: Bearer <token>" on every
request but /healthz (gRPC: the same metadata); --ssl-certfile/--ssl-keyfile serve TLS on both
ports. See docs/security.md.
Reference: docs/server.md."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``serve`` to the subcommands."""
    from persia.server.settings import ServerSettings

    d = ServerSettings()
    p = sub.add_parser(
        "serve",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="the export or checkpoint directory")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"HTTP port (default {d.port}; 0: any)")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=d.grpc_port,
        help=f"gRPC port, TorchServe's inference API (default {d.grpc_port}; 0: any)",
    )
    p.add_argument("--no-grpc", action="store_true", help="no gRPC front end")
    p.add_argument("--model-name", help="the gRPC model_name served (default: any name)")
    m = p.add_argument_group("model")
    m.add_argument(
        "--follow",
        metavar="DELTA_DIR",
        help="apply the training job's deltas from this directory (checkpoints; default: "
        "incremental_dir of the global config when enable_incremental_update is on)",
    )
    m.add_argument(
        "--embedding-config",
        metavar="FILE",
        help="a checkpoint's embedding_config.yml: needed only by a checkpoint that records no "
        "embedding layer (an older persia's), else checked against it (default: "
        "$PERSIA_EMBEDDING_CONFIG)",
    )
    m.add_argument(
        "--global-config",
        metavar="FILE",
        help="a checkpoint's global_config.yml (default: $PERSIA_GLOBAL_CONFIG)",
    )
    m.add_argument(
        "--poll-interval",
        type=float,
        default=0.25,
        metavar="S",
        help="how often the delta directory is polled (default 0.25 s)",
    )
    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_request_bytes,
        help=f"larger bodies get 413 (default {d.max_request_bytes})",
    )
    lim.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help=f"more samples per request get 413 (default {d.max_batch})",
    )
    lim.add_argument(
        "--max-concurrent",
        type=int,
        default=d.max_concurrent,
        help=f"requests computed at once (default {d.max_concurrent})",
    )
    lim.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help=f"requests waiting beyond those; more get 503 (default {d.max_queue})",
    )
    lim.add_argument(
        "--coalesce-rows",
        type=int,
        default=d.coalesce_rows,
        metavar="N",
        help="JSON-rows requests waiting at the same moment are computed in one model call, up "
        f"to N rows (default {d.coalesce_rows}; 0: one call per request)",
    )
    lim.add_argument(
        "--max-delta-age",
        type=float,
        metavar="S",
        help="/readyz answers 503 while the last applied delta is older (default: no bound)",
    )
    sec = p.add_argument_group("security (docs/security.md)")
    sec.add_argument(
        "--token-file",
        metavar="FILE",
        help="a file holding the bearer token every request but /healthz must send "
        "(Authorization: Bearer <token>; gRPC: the same metadata); default: "
        "$PERSIA_SERVE_TOKEN; neither: no token",
    )
    sec.add_argument(
        "--ssl-certfile", metavar="PEM", help="TLS certificate (chain) for both front ends"
    )
    sec.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    r = p.add_argument_group("scale out (Ray Serve)")
    r.add_argument("--backend", choices=("local", "ray"), default="local")
    r.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default 1)")
    r.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        help="logical CPUs per replica (fractions allowed; default 1)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default warning)",
    )
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs ``persia serve``."""
    from persia.errors import ConfigError, PersiaError
    from persia.server import ServerSettings, open_model
    from persia.server.settings import read_token

    try:
        import fastapi  # noqa: F401
        import grpc  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PersiaError(
            f"persia serve needs the serve extra: pip install 'persia[serve]' ({exc})"
        ) from None
    ray = args.backend == "ray"
    if ray and args.grpc_port != ServerSettings().grpc_port and not args.no_grpc:
        raise ConfigError(
            "--grpc-port: the Ray Serve backend serves HTTP only; run `persia serve` without "
            "--backend ray for the gRPC front end"
        )
    if not ray and (args.replicas != 1 or args.replica_cpus != 1.0):
        raise ConfigError("--replicas / --replica-cpus need --backend ray")
    if ray and (args.ssl_certfile or args.ssl_keyfile):
        raise ConfigError(
            "--ssl-certfile / --ssl-keyfile: TLS is not served on the Ray Serve backend (Ray "
            "Serve's proxy listens); terminate TLS in front of it, or run without --backend ray"
        )
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        grpc_port=None if (args.no_grpc or ray) else args.grpc_port,
        max_request_bytes=args.max_request_bytes,
        max_batch=args.max_batch,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        max_delta_age_s=args.max_delta_age,
        model_name=args.model_name,
        coalesce_rows=args.coalesce_rows,
        token=read_token(args.token_file),
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    if not (args.poll_interval > 0):
        raise ConfigError(f"--poll-interval must be > 0, got {args.poll_interval}")
    open_kwargs = {
        "follow": args.follow,
        "embedding_config": args.embedding_config,
        "global_config": args.global_config,
        "poll_interval_s": args.poll_interval,
    }
    if ray:
        from persia.backends.ray.serve import run_ray_serve

        run_ray_serve(
            args.dir,
            settings,
            replicas=args.replicas,
            replica_cpus=args.replica_cpus,
            open_kwargs=open_kwargs,
        )
        return 0
    from persia import telemetry
    from persia.server.run import serve_model

    telemetry.configure(telemetry.SERVER)  # GET /metrics: latency, answers by status, freshness
    model = open_model(args.dir, **open_kwargs)
    try:
        serve_model(model, settings, log_level=args.log_level)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host} (--port / --grpc-port): {exc}") from None
    finally:
        model.close()
    return 0
