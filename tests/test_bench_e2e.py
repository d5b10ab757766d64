"""bench_e2e.py --chart-from: median runs, ratios and the chart from saved JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_e2e  # noqa: E402


def run(system: str, sps: float, auc: float, **extra) -> dict:
    return {"system": system, "samples_per_s": sps, "auc": auc, "cpu_ms_per_step": 1e5 / sps,
            "ms_per_step": 1e5 / sps, "staleness": extra.pop("staleness", None), **extra}  # fmt: skip


def test_chart_from_saved_runs(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    lines_a = [
        run("torch-embeddingbag", 20.0, 0.80),
        run("persia-hybrid", 30.0, 0.79, staleness=8),
        run("persia-hybrid", 40.0, 0.79, staleness=8),
        run("persia-hybrid", 10.0, 0.79, staleness=8),
        run("persia-sync", 25.0, 0.795, staleness=1),
        {"metric": "hybrid_vs_torch", "value": 1.0},  # ratio lines are skipped
    ]
    a.write_text("".join(json.dumps(x) + "\n" for x in lines_a))
    b.write_text(json.dumps(run("persia-staleness-2", 27.0, 0.794, staleness=2)) + "\n")
    png = tmp_path / "e2e.png"
    assert bench_e2e.main(["--chart-from", str(a), str(b), "--chart", str(png)]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    medians = {r["system"]: r for r in out if "system" in r}
    assert medians["persia-hybrid"]["samples_per_s"] == 30.0  # the median of 10, 30, 40
    assert medians["persia-hybrid"]["median_of"] == 3
    assert set(medians) == {"torch-embeddingbag", "persia-hybrid", "persia-sync",
                            "persia-staleness-2"}  # fmt: skip
    ratios = {r["metric"]: r for r in out if "metric" in r}
    assert ratios["hybrid_vs_torch"]["value"] == pytest.approx(1.5)
    assert ratios["hybrid_vs_sync"]["value"] == pytest.approx(1.2)
    assert ratios["auc_gap_hybrid_vs_sync"]["value"] == pytest.approx(0.005)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_from_rejects_a_broken_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"system": "dense-only", "samples_per_s": 1.0}\nnot json\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: not a JSON line"):
        bench_e2e.main(["--chart-from", str(bad)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"metric": "x", "value": 1}\n')
    with pytest.raises(SystemExit, match="no contender runs"):
        bench_e2e.main(["--chart-from", str(empty)])


def test_extra_links_are_planned_and_checked():
    args = bench_e2e.parse_args(["--quick", "--link", "free=100000gbit:0us"])
    labels = [r["label"] for r in bench_e2e.plan(args, False)]
    assert "persia-hybrid@free" in labels and "persia-sync@free" in labels
    assert "persia-hybrid@1gbit" in labels  # the standard links stay
    spec = next(r for r in bench_e2e.plan(args, False) if r["label"] == "persia-hybrid@free")
    assert spec["link"] == "100000gbit:0us"
    for bad in ("free", "=1gbit:1us", "x=fast:1us"):
        with pytest.raises(SystemExit):
            bench_e2e.parse_args(["--link", bad])
    results = {
        "persia-hybrid@free": run("persia-hybrid@free", 30.0, 0.8),
        "persia-sync@free": run("persia-sync@free", 20.0, 0.8),
    }
    ratio = {r["metric"]: r for r in bench_e2e.ratios(results, {})}["hybrid_vs_sync_free"]
    assert ratio["value"] == pytest.approx(1.5)
