"""``persia``: train a recommender from one job file, check a job file, export or serve a model.

Errors from a bad job file or bad data (:class:`~persia.errors.PersiaError`) are printed as a
clean message and exit with status 2; any other error keeps its traceback. Imports stay light
until a subcommand runs, so ``persia --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from persia.errors import PersiaError

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT"]

#: Exit status for a bad job file or bad data (argparse uses 2 for bad arguments as well).
EXIT_BAD_INPUT = 2

_DESCRIPTION = """\
persia trains recommendation models whose embedding tables are far larger than the dense
network: embeddings are trained asynchronously with bounded staleness, the dense network
synchronously (the PERSIA paper's hybrid algorithm). By default every role runs in this
process; --backend ray puts the parameter servers (and optionally NN workers, data loaders and
embedding workers) in Ray actors (docs/cluster.md).

examples:
  persia train examples/adult_income/job.yaml
  persia train job.yaml --set training.staleness=1 --set training.epochs=2
  persia validate --data job.yaml
  persia train job.yaml --resume ckpt/        (continue from a checkpoint)
  persia train job.yaml --backend ray --num-ps 2
  persia train job.yaml --metrics-file metrics.jsonl
  persia export job.yaml --checkpoint ckpt/ --out served/
  persia serve served/ --port 8080          (HTTP and gRPC inference server, docs/server.md)

The job file's reference: docs/job-file.md."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``persia`` and its subcommands."""
    from persia import __version__
    from persia.cli import export, serve, train, validate

    parser = argparse.ArgumentParser(
        prog="persia",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"persia {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train.add_parser(sub)
    validate.add_parser(sub)
    export.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``persia`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from persia._settings import ensure_numba_cache_dir, passive_openmp_threads

    ensure_numba_cache_dir()
    passive_openmp_threads()  # must precede the first torch import
    try:
        return int(args.run(args) or 0)
    except PersiaError as exc:
        print(f"persia {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"persia {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
