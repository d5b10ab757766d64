"""bench_e2e.py --chart-from: median runs, ratios and the chart from saved JSON lines."""

from __future__ import annotations

import json
import os
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


def test_workloads_are_planned_with_their_models_and_slots():
    args = bench_e2e.parse_args(["--workload", "embedding-bound,multi-hot", "--no-links"])
    assert args.workloads == ["embedding-bound", "multi-hot"]
    eb = {r["label"]: r for r in bench_e2e.plan(args, False, "embedding-bound")}
    assert eb["persia-hybrid"]["bottom"] == [] and eb["persia-hybrid"]["top"] == [32]
    assert eb["persia-hybrid"]["steps"] == 600 and eb["persia-hybrid"]["ids_per_sample"] == 1
    assert "persia-profile" in eb and eb["persia-profile"]["runner"] == "profile"
    mh = {r["label"]: r for r in bench_e2e.plan(args, False, "multi-hot")}
    ids = mh["torch-embeddingbag"]["ids_per_sample"]
    assert len(ids) == 26 and ids[2] == 20 and ids[3] == 5 and ids[0] == 1
    dlrm = {r["label"]: r for r in bench_e2e.plan(args, False)}
    assert dlrm["dense-only"]["bottom"] == [512, 256, 64] and dlrm["dense-only"]["steps"] == 200
    assert "persia-profile" not in dlrm
    quick = bench_e2e.parse_args(["--quick"])
    assert quick.workloads == ["dlrm", "embedding-bound", "multi-hot"]
    labels = [r["label"] for r in bench_e2e.plan(quick, False, "multi-hot")]
    assert labels == ["dense-only", "torch-embeddingbag", "persia-sync", "persia-hybrid",
                      "persia-hybrid-sparecore", "persia-hybrid-f16", "persia-hybrid-bf16",
                      "persia-profile"]  # fmt: skip
    halves = {r["label"]: r for r in bench_e2e.plan(quick, False, "multi-hot")}
    assert halves["persia-hybrid-bf16"]["row_dtype"] == "bfloat16"
    both = bench_e2e.parse_args(["--row-dtypes", "float16", "--row-roundings",
                                 "nearest,stochastic"])  # fmt: skip
    plan = {r["label"]: r for r in bench_e2e.plan(both, False)}
    assert plan["persia-hybrid-f16-sr"]["row_rounding"] == "stochastic"
    assert "persia-hybrid-bf16" not in plan
    assert "persia-hybrid-f16" not in {
        r["label"] for r in bench_e2e.plan(bench_e2e.parse_args(["--row-dtypes", "none"]), False)
    }
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--row-dtypes", "float8"])
    runs = {"persia-hybrid": {"samples_per_s": 100.0, "auc": 0.75, "ms_per_step": 1.0},
            "persia-hybrid-f16": {"samples_per_s": 98.0, "auc": 0.7490}}  # fmt: skip
    lines = {x["metric"]: x for x in bench_e2e.ratios(runs, {}, "dlrm")}
    assert lines["hybrid_f16_vs_f32"]["value"] == 0.98
    assert lines["auc_gap_hybrid_f16_vs_f32"]["value"] == 0.001
    assert "auc_gap_hybrid_bf16_vs_f32" not in lines
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--workload", "dlrm,bogus"])


def test_the_bound_of_the_hybrid():
    results = {
        "dense-only": run("dense-only", 100.0, 0.7),  # 1000 ms per step
        "persia-sync": {**run("persia-sync", 50.0, 0.8), "cpu_ms_per_step": 3000.0, "cores": 2},
        "persia-hybrid": run("persia-hybrid", 80.0, 0.8),  # 1250 ms per step
    }
    lines = {r["metric"]: r for r in bench_e2e.ratios(results, {}, "embedding-bound")}
    assert lines["hybrid_bound_ms_per_step"]["value"] == pytest.approx(1500.0)  # 3000 / 2 cores
    assert lines["hybrid_over_bound"]["value"] == pytest.approx(1250 / 1500, abs=1e-3)
    assert all(r["workload"] == "embedding-bound" for r in lines.values())
    assert "hybrid_sparecore_over_bound" not in lines
    results[bench_e2e.SPARE_CORE] = {**run(bench_e2e.SPARE_CORE, 125.0, 0.8), "torch_threads": 1}
    lines = {r["metric"]: r for r in bench_e2e.ratios(results, {}, "embedding-bound")}
    assert lines["hybrid_sparecore_over_bound"]["value"] == pytest.approx(800 / 1500, abs=1e-3)
    del results[bench_e2e.SPARE_CORE]
    # planned for the workloads the embedding path paces, not for dlrm
    args = bench_e2e.parse_args(["--no-links"])
    spare = {r["label"]: r for r in bench_e2e.plan(args, False, "embedding-bound")}
    assert spare[bench_e2e.SPARE_CORE]["torch_threads"] == max(1, len(os.sched_getaffinity(0)) - 1)
    assert bench_e2e.SPARE_CORE not in {r["label"] for r in bench_e2e.plan(args, False, "dlrm")}
    results["dense-only"]["ms_per_step"] = 2000.0  # the dense step is the longer one
    lines = {r["metric"]: r for r in bench_e2e.ratios(results, {})}
    assert lines["hybrid_bound_ms_per_step"]["value"] == pytest.approx(2000.0)
    del results["persia-sync"]
    lines = {r["metric"]: r for r in bench_e2e.ratios(results, {})}
    assert lines["hybrid_over_bound"]["value"] is None
    assert "persia-sync did not run" in lines["hybrid_over_bound"]["note"]


def test_chart_from_saved_runs_of_several_workloads(tmp_path, capsys):
    saved = tmp_path / "w.jsonl"
    lines = [
        {**run("persia-hybrid", 30.0, 0.79, staleness=8), "workload": "embedding-bound"},
        {**run("persia-hybrid", 10.0, 0.79, staleness=8)},  # no workload field: an older dlrm line
        {**run("torch-embeddingbag", 5.0, 0.79), "workload": "embedding-bound"},
        {"metric": "emb_path_ns_per_id", "stage": "total", "value": 50.0},
    ]
    saved.write_text("".join(json.dumps(x) + "\n" for x in lines))
    png = tmp_path / "e2e.png"
    assert bench_e2e.main(["--chart-from", str(saved), "--chart", str(png)]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    ratio = {(r["workload"], r["metric"]): r["value"] for r in out if "metric" in r}
    assert ratio[("embedding-bound", "hybrid_vs_torch")] == pytest.approx(6.0)
    assert ratio[("dlrm", "hybrid_vs_torch")] is None
    assert png.exists() and (tmp_path / "e2e-embedding-bound.png").exists()


def test_wire_compression_is_planned_behind_the_1gbit_link_and_compared():
    args = bench_e2e.parse_args(["--quick", "--link", "free=100000gbit:0us"])
    specs = {r["label"]: r for r in bench_e2e.plan(args, False)}
    wire = specs["persia-hybrid-f16wire@1gbit"]
    assert wire["wire"] == "f16" and wire["link"] == "1gbit:100us"
    assert wire["staleness"] == specs["persia-hybrid@1gbit"]["staleness"]
    assert "persia-hybrid-f16wire@free" in specs  # and behind every --link
    assert "persia-hybrid-f16wire@10gbit" not in specs
    assert all("wire" not in r for n, r in specs.items() if "f16wire" not in n)
    results = {
        "persia-hybrid@1gbit": run("persia-hybrid@1gbit", 30.0, 0.80, link_mb_per_step=2.0),
        "persia-hybrid-f16wire@1gbit": run(
            "persia-hybrid-f16wire@1gbit", 27.0, 0.799, link_mb_per_step=1.1
        ),
    }
    lines = {r["metric"]: r for r in bench_e2e.ratios(results, {})}
    assert lines["wire_link_mb_ratio_1gbit"]["value"] == pytest.approx(0.55)
    assert lines["auc_gap_wire_1gbit"]["value"] == pytest.approx(0.001)
    assert lines["wire_vs_plain_1gbit"]["value"] == pytest.approx(0.9)


def test_device_is_planned_and_cuda_refused_without_a_gpu(capsys):
    import torch

    runs = bench_e2e.plan(bench_e2e.parse_args(["--quick"]), have_torchrec=False)
    assert {r["device"] for r in runs} == {"cpu"}
    if torch.cuda.is_available():
        args = bench_e2e.parse_args(["--quick", "--device", "cuda"])
        assert {r["device"] for r in bench_e2e.plan(args, have_torchrec=False)} == {"cuda"}
        return
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--quick", "--device", "cuda"])
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_disk_tier_runs_are_planned_and_compared():
    args = bench_e2e.parse_args(["--quick", "--disk-tier", "--no-links"])
    specs = {r["label"]: r for r in bench_e2e.plan(args, False)}
    assert specs["persia-hybrid+disk"]["disk_tier"] == {"ram_fraction": 0.35}
    assert specs["persia-hybrid+disk-cold"].get("cold") is True
    assert specs["persia-hybrid+evict"]["disk_tier"].get("no_tier") is True
    results = {
        "persia-hybrid": run("persia-hybrid", 40.0, 0.80),
        "persia-hybrid+disk": run("persia-hybrid+disk", 28.0, 0.80),
        "persia-hybrid+disk-cold": run("persia-hybrid+disk-cold", 4.0, 0.80),
        "persia-hybrid+evict": run("persia-hybrid+evict", 35.0, 0.7995),
    }
    lines = {r["metric"]: r for r in bench_e2e.ratios(results, {})}
    assert lines["disk_vs_ram"]["value"] == pytest.approx(0.7)
    assert lines["disk_cold_vs_ram"]["value"] == pytest.approx(0.1)
    assert lines["disk_vs_evict"]["value"] == pytest.approx(0.8)
    assert lines["auc_gap_evict_vs_disk"]["value"] == pytest.approx(0.0005)
