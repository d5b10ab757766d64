"""``persia train JOB.yaml``: train and test the model a job file describes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "train and test the model described by a job file"
DESCRIPTION = """\
Train and test the model described by JOB (a YAML job file; see docs/job-file.md).

Progress goes to stderr: a progress bar on a terminal, periodic log lines otherwise, and a
summary at the end. The last line on stdout is one JSON object with test_auc, test_logloss,
samples_per_s, wall_s, staleness_max, staleness_mean, embedding_rows and more."""


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
    p.set_defaults(run=run)
    return p


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
    job = load_job(args.job, overrides)

    from persia.job.runner import dumps, run_job, summary_lines
    from persia.logger import get_default_logger

    logger = get_default_logger()
    logger.info(
        f"persia train {args.job}: model {job.model.type}, {len(job.embedding.slots)} slots"
    )
    result = run_job(job)
    for line in summary_lines(result):
        logger.info(line)
    sys.stdout.write(dumps(result) + "\n")
    sys.stdout.flush()
    return 0
