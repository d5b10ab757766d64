"""``persia export JOB.yaml --checkpoint DIR --out DIR``: a checkpoint as a serving export."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "export a job checkpoint for serving (TorchScript model, embeddings, request recipe)"
DESCRIPTION = """\
Export the checkpoint in DIR (written by `persia train` with training.checkpoint_dir) for
serving: the dense model as TorchScript, every embedding row (no optimizer state) and what turns
a raw request row into a prediction (ID hash, slot prefixes, pooling, dense statistics, the
label's meaning), in one verified directory. Load it with persia.serving.load(OUT) (see
docs/serving.md). The last line on stdout is a JSON object describing the export."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``export`` to the subcommands."""
    from persia.cli.train import add_set_option

    p = sub.add_parser(
        "export",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", metavar="JOB", help="the job file (YAML) the checkpoint was trained with")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="the job checkpoint directory",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the export directory")
    add_set_option(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs ``persia export``."""
    from persia.job.config import load_job

    job = load_job(args.job, list(args.overrides))
    from persia.serving import export_from_checkpoint, load

    path = export_from_checkpoint(args.out, job, args.checkpoint)
    meta = load(args.out).meta
    info = {
        "export_dir": str(args.out),
        "generation": str(path),
        "rows": meta["rows"],
        "model": meta["model"],
        "label": meta["label"]["meaning"],
        "columns": [s["column"] for s in meta["slots"]] + [d["name"] for d in meta["dense"]],
    }
    sys.stdout.write(json.dumps(info, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0
