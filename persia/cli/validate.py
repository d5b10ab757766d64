"""``persia validate JOB.yaml``: check a job file without training."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from persia.cli.train import add_set_option

HELP = "check a job file without training (with --data, also its data files)"
DESCRIPTION = """\
Check JOB (a YAML job file; see docs/job-file.md) without training: every unknown key, wrong
type and bad value is reported at once, the model is built once to check its arguments, and
every data file pattern must match a file.

With --data, also open the data (what `persia train` checks before training): every file must
have the columns the job uses; the training files must have rows, a label with both classes,
and dense columns that parse; a sample of the first file of each split is parsed (IDs, and the
test file's label and numbers)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``validate`` to the subcommands."""
    p = sub.add_parser(
        "validate",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", metavar="JOB", help="the job file (YAML)")
    p.add_argument(
        "--data", action="store_true", help="also read the data files' schemas and a sample"
    )
    p.add_argument(
        "--no-model", action="store_true", help="skip building the model (avoids importing torch)"
    )
    add_set_option(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs ``persia validate``."""
    from persia.job.validate import validate_job

    job = validate_job(args.job, args.overrides, data=args.data, model=not args.no_model)
    checked = "file, model and data" if args.data else "file, model and file patterns"
    if args.no_model:
        checked = checked.replace(", model", "")
    print(
        f"{args.job}: OK ({checked}; {len(job.embedding.slots)} ID slots, "
        f"{len(job.data.dense)} dense features, model {job.model.type})",
        file=sys.stdout,
    )
    return 0
