"""Before / after: one benchmark script run alternately against two source trees of persia.

    python benchmarks/ab_trees.py --base ../persia-before --rounds 3 -- benchmarks/bench_store.py
    python benchmarks/ab_trees.py --base ../persia-before -- benchmarks/bench_e2e.py --steps 150

Each round runs the script once per tree, in the order base, new on odd rounds and new, base on
even ones (so drift of a shared, noisy machine hits both alike), with ``PYTHONPATH`` set to the
tree and the tree as the working directory; the script's path is taken relative to each tree.
An absolute script path runs that one script against both trees (``bench_emb_path.py`` is
written for this: it imports persia from ``PYTHONPATH`` and uses only APIs both trees have)::

    python benchmarks/ab_trees.py --base ../persia-b936917 --fields value,ns_per_unique \
        -- "$PWD/benchmarks/bench_emb_path.py"
Every JSON line the script prints comes out again with ``tree`` ("base" / "new") and ``round``
added; then, per key (a line's ``metric``, else its ``system``, plus the fields that tell lines of one metric
apart: transport, payload, backend, staleness, ...) and numeric field (``--fields``),
one summary line with the median of each tree and ``new_over_base``.

A "before / after nothing is slower" check of a refactor reads the summary lines: rates should
give ``new_over_base`` >= 0.95, costs (``cpu_ms_per_step``) <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_FIELDS = "value,value_cpu,samples_per_s,cpu_ms_per_step,ms_per_step"
#: Fields that tell two lines of one metric apart (a transport, a payload size, ...).
DISCRIMINATORS = (
    "workload", "system", "stage", "backend", "transport", "payload", "staleness", "optimizer",
)  # fmt: skip
#: A field left out of the key at this value: a line without it means the same (bench_e2e.py's
#: lines before it had workloads were dlrm's), so an older tree's lines pair with the new tree's.
DEFAULTS = {"workload": "dlrm"}


def run_once(tree: Path, command: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """The JSON lines of ``command`` (a script path relative to ``tree`` plus arguments)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(
        [sys.executable, str(tree / command[0]), *command[1:]],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(command)} failed ({proc.returncode}):\n{proc.stderr}")
    out = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def summarise(rows: list[dict[str, Any]], fields: list[str]) -> list[dict[str, Any]]:
    """Median per (key, field) per tree and the ratio new / base."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        name = row.get("metric") or row.get("system")
        if name is None:
            continue
        extra = [
            f"{k}={row[k]}"
            for k in DISCRIMINATORS
            if k in row and row[k] != name and DEFAULTS.get(k, None) != row[k]
        ]
        key = " ".join([str(name), *extra])
        for f in fields:
            v = row.get(f)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault((str(key), f), {}).setdefault(row["tree"], []).append(float(v))
    out = []
    for (key, f), by_tree in values.items():
        if "base" not in by_tree or "new" not in by_tree:
            continue
        base, new = statistics.median(by_tree["base"]), statistics.median(by_tree["new"])
        out.append(
            {
                "summary": key,
                "field": f,
                "base_median": base,
                "new_median": new,
                "new_over_base": new / base if base else None,
                "runs": [len(by_tree["base"]), len(by_tree["new"])],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", type=Path, help="the tree before the change")
    p.add_argument("--new", type=Path, default=HERE.parent, help="the tree after (default: this)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fields", default=DEFAULT_FIELDS, help="numeric fields to summarise")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument(
        "--from", dest="saved", type=Path, help="summarise the lines of an earlier run instead"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = p.parse_args(argv)
    if args.saved is not None:
        lines = [json.loads(x) for x in args.saved.read_text().splitlines() if x.startswith("{")]
        saved = [x for x in lines if "tree" in x and "summary" not in x]
        for line in summarise(saved, args.fields.split(",")):
            print(json.dumps(line), flush=True)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.base is None:
        p.error("--base is required (unless --from)")
    if not command:
        p.error("give the benchmark after --, e.g. -- benchmarks/bench_store.py")
    trees = {"base": args.base.resolve(), "new": args.new.resolve()}
    rows: list[dict[str, Any]] = []
    for r in range(1, args.rounds + 1):
        order = ["base", "new"] if r % 2 else ["new", "base"]
        for name in order:
            for row in run_once(trees[name], command, args.timeout):
                row.update(tree=name, round=r)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for line in summarise(rows, args.fields.split(",")):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
