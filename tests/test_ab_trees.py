"""benchmarks/ab_trees.py: alternates two trees, tags every line, summarises medians."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path, rate: float) -> Path:
    (path / "benchmarks").mkdir(parents=True)
    (path / "benchmarks" / "bench_x.py").write_text(
        "import json, os, sys\n"
        f"print(json.dumps({{'metric': 'rows_per_s', 'value': {rate}, 'cwd': os.getcwd(),"
        " 'path': os.environ['PYTHONPATH'], 'args': sys.argv[1:]}))\n"
        f"print(json.dumps({{'system': 'persia-sync', 'cpu_ms_per_step': {100 / rate}}}))\n"
        "print('not json')\n"
    )
    return path


def test_alternates_the_trees_and_summarises(tmp_path):
    base, new = _tree(tmp_path / "base", 10.0), _tree(tmp_path / "new", 12.0)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_trees.py"), "--base", str(base),
         "--new", str(new), "--rounds", "2", "--", "benchmarks/bench_x.py", "--flag"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = [json.loads(x) for x in out.splitlines()]
    runs = [x for x in lines if x.get("metric") == "rows_per_s"]
    assert [(x["tree"], x["round"]) for x in runs] == [
        ("base", 1),
        ("new", 1),
        ("new", 2),
        ("base", 2),
    ]
    for x in runs:
        tree = base if x["tree"] == "base" else new
        assert x["cwd"] == str(tree) and x["path"] == str(tree) and x["args"] == ["--flag"]
    summary = {(x["summary"], x["field"]): x for x in lines if "summary" in x}
    assert summary["rows_per_s", "value"]["new_over_base"] == 1.2
    assert abs(summary["persia-sync", "cpu_ms_per_step"]["new_over_base"] - 10 / 12) < 1e-9
    assert summary["rows_per_s", "value"]["runs"] == [2, 2]
    saved = tmp_path / "saved.jsonl"
    saved.write_text(out)
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_trees.py"), "--from", str(saved)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert [json.loads(x) for x in again.splitlines()] == [x for x in lines if "summary" in x]


def test_lines_of_one_metric_are_told_apart_by_their_settings():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ab_trees", ROOT / "benchmarks" / "ab_trees.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    rows = [
        {"metric": "rtt", "value": v, "transport": t, "tree": tree}
        for tree, (zmq, ray) in {"base": (1.0, 4.0), "new": (1.1, 4.0)}.items()
        for t, v in (("zmq", zmq), ("ray", ray))
    ]
    got = {x["summary"]: x["new_over_base"] for x in ab.summarise(rows, ["value"])}
    assert got == {"rtt transport=zmq": pytest.approx(1.1), "rtt transport=ray": 1.0}


def test_lines_of_an_older_bench_e2e_pair_with_the_dlrm_workload():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ab_trees", ROOT / "benchmarks" / "ab_trees.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    rows = [
        {"system": "persia-sync", "cpu_ms_per_step": 10.0, "tree": "base"},  # no workload yet
        {"system": "persia-sync", "cpu_ms_per_step": 8.0, "tree": "new", "workload": "dlrm"},
        {
            "system": "persia-sync",
            "cpu_ms_per_step": 2.0,
            "tree": "new",
            "workload": "embedding-bound",
        },  # fmt: skip
        {
            "metric": "emb_path_ns_per_id",
            "stage": "total",
            "value": 4.0,
            "tree": "base",
            "workload": "multi-hot",
        },  # fmt: skip
        {
            "metric": "emb_path_ns_per_id",
            "stage": "total",
            "value": 2.0,
            "tree": "new",
            "workload": "multi-hot",
        },  # fmt: skip
    ]
    got = {
        x["summary"]: x["new_over_base"] for x in ab.summarise(rows, ["cpu_ms_per_step", "value"])
    }
    assert got == {
        "persia-sync": pytest.approx(0.8),
        "emb_path_ns_per_id workload=multi-hot stage=total": pytest.approx(0.5),
    }
