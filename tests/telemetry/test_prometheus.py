"""persia's metrics in a real Prometheus: pushed through a real Pushgateway (PERSIA's way) and
scraped from ``persia train --metrics-port``; and every expression of the Grafana dashboard
(docs/grafana-dashboard.json) against that data. Both servers are Debian's packages, started on
free loopback ports by the ``prometheus_stack`` fixture (conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Stack, http_get

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "examples/adult_income/job.yaml"
SHORT = [
    "--progress", "log",
    "--set", "training.max_samples=2048",
    "--set", "training.eval_max_samples=512",
    "--set", "training.log_every_batches=4",
    "--set", "training.eval_every_batches=8",
]  # fmt: skip
PUSH_JOB = "persia_push_test"
API_JOB = "persia_api_test"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    env.update(extra)
    return env


def _persia_train(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "persia.cli.main", "train", str(JOB), *SHORT, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pushed(prometheus_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A short `persia train` whose job file turns PERSIA's metrics on (pushed every second),
    exporting the model for serving; its JSON result."""
    out = tmp_path_factory.mktemp("pushed")
    result = _persia_train(
        [
            "--set",
            "metrics.enable_metrics=true",
            "--set",
            f"metrics.job_name={PUSH_JOB}",
            "--set",
            "metrics.push_interval_seconds=1",
            "--export",
            str(out / "export"),
        ],  # fmt: skip
        _env(PERSIA_METRICS_GATEWAY_ADDR=prometheus_stack.gateway),
    )
    result["_export"] = str(out / "export")
    return result


def _check_counts(stack: Stack, selector: str, result: dict, range_: bool = False) -> None:
    def expr(name: str) -> str:
        s = f"{name}{{{selector}}}"
        return f"last_over_time({s}[10m])" if range_ else s

    samples = result["train_samples"]
    rows = result["embedding_rows"]
    batches = sum(result["staleness_histogram"].values())
    assert samples > 0 and rows > 0 and batches > 0
    assert stack.wait_value(expr("persia_samples_trained_total"), samples) == samples
    assert stack.wait_value(expr("persia_rows_held"), rows) == rows
    assert stack.wait_value(expr("persia_staleness_batches_count"), batches) == batches
    # PERSIA's names, with their labels
    for name in ("index_miss_count", "staleness", "lookup_total_time_cost_sec"):
        series = stack.query(expr(name))
        assert series, name
    shards = stack.query(expr("persia_rows_held"))
    assert {s["metric"]["replica"] for s in shards} == {str(i) for i in range(result["num_ps"])}
    assert {s["metric"]["role"] for s in shards} == {"parameter-server"}


def test_pushed_counters_equal_the_job_summary(prometheus_stack: Stack, pushed: dict) -> None:
    _check_counts(prometheus_stack, f'job="{PUSH_JOB}"', pushed)
    series = prometheus_stack.query(f'persia_samples_trained_total{{job="{PUSH_JOB}"}}')
    assert [s["metric"]["instance"] for s in series] == ["nn-worker-0"]


def test_scraped_counters_equal_the_job_summary(prometheus_stack: Stack) -> None:
    result = _persia_train(
        [
            "--metrics-port",
            str(prometheus_stack.scrape_port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-linger",
            "30",
        ],  # fmt: skip
        _env(),
    )
    # the endpoint is gone once the job ended: the last values scraped
    _check_counts(prometheus_stack, 'job="persia_scraped"', result, range_=True)


@pytest.fixture(scope="module")
def api_job(prometheus_stack: Stack, pushed: dict, tmp_path_factory: pytest.TempPathFactory):
    """A job through PERSIA's API with global_config.yml's metrics_config and incremental
    deltas, a delta reader, and requests to the served export (tests/telemetry/_api_job.py)."""
    work = tmp_path_factory.mktemp("api")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_api_job.py")), str(work), API_JOB,
         pushed["_export"]],
        capture_output=True,
        text=True,
        env=_env(PERSIA_METRICS_GATEWAY_ADDR=prometheus_stack.gateway),
        cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["deltas_applied"] > 0 and out["served"] == 80
    return out


def _dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _substitute(expr: str) -> str:
    """Grafana's variables replaced by fixed values (every job; a 1 minute rate window)."""
    out = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    out = out.replace("$__range", "10m").replace("$job", ".+")
    assert "$" not in out, f"a Grafana variable the test does not know: {expr}"
    return out


def test_every_dashboard_expression_parses_and_returns_a_series(
    prometheus_stack: Stack, pushed: dict, api_job: dict
) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    # the data of both pushes is in Prometheus (scraped from the gateway)
    assert (
        prometheus_stack.wait_value(f'persia_serving_requests_total{{job="{API_JOB}"}}', 20) == 20
    )
    empty = []
    for expr in exprs:  # as a panel asks: a range query over the dashboard's time window
        if not prometheus_stack.query_range(_substitute(expr)):
            empty.append(expr)
    assert empty == [], "dashboard expressions without a series:\n" + "\n".join(empty)
    # the dashboard's job variable lists the jobs
    url = (
        prometheus_stack.prometheus
        + "/api/v1/label/job/values?match[]=persia_samples_trained_total"
    )
    jobs = json.loads(http_get(url))["data"]
    assert {PUSH_JOB, API_JOB} <= set(jobs)


def test_the_dashboard_covers_the_issue_panels() -> None:
    titles = " | ".join(
        p["title"].lower()
        for p in json.loads((ROOT / "docs/grafana-dashboard.json").read_text())["panels"]
    )
    for word in ("throughput", "staleness", "lookup latency", "miss ratio", "rows held",
                 "delta lag", "serving latency", "freshness"):  # fmt: skip
        assert word in titles
    for expr in _dashboard_exprs():
        assert re.search(r'job=~"\$job"', expr), expr


RAY_JOB = "persia_ray_test"


@pytest.mark.slow
def test_every_ray_actor_pushes_its_own_metrics(prometheus_stack: Stack) -> None:
    """The cluster backend with 2 parameter-server actors: each actor pushes its own group
    (instance parameter-server-<rank>), the NN worker (the driver) its own, and the rows the
    two shards report add up to the job's summary."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install .[ray])")
    result = _persia_train(
        [
            "--backend",
            "ray",
            "--num-ps",
            "2",
            "--set",
            "training.max_samples=1024",
            "--set",
            "metrics.enable_metrics=true",
            "--set",
            f"metrics.job_name={RAY_JOB}",
            "--set",
            "metrics.push_interval_seconds=1",
        ],  # fmt: skip
        _env(PERSIA_METRICS_GATEWAY_ADDR=prometheus_stack.gateway),
    )
    assert result["backend"] == "ray" and result["num_ps"] == 2
    sel = f'job="{RAY_JOB}"'
    rows = result["embedding_rows"]
    assert prometheus_stack.wait_value(f"persia_rows_held{{{sel}}}", rows) == rows
    shards = prometheus_stack.query(f"persia_rows_held{{{sel}}}")
    assert sorted((s["metric"]["instance"], s["metric"]["replica"]) for s in shards) == [
        ("parameter-server-0", "0"),
        ("parameter-server-1", "1"),
    ]
    assert all(s["metric"]["role"] == "parameter-server" for s in shards)
    # each actor timed its own shard calls; the driver is the NN worker and embedding worker
    calls = prometheus_stack.query(f"persia_shard_lookup_seconds_count{{{sel}}}")
    assert {s["metric"]["instance"] for s in calls} == {"parameter-server-0", "parameter-server-1"}
    samples = result["train_samples"]
    assert prometheus_stack.wait_value(f"persia_samples_trained_total{{{sel}}}", samples) == samples
    nn = prometheus_stack.query(f"persia_samples_trained_total{{{sel}}}")
    assert [(s["metric"]["instance"], s["metric"]["role"]) for s in nn] == [
        ("nn-worker-0", "nn-worker")
    ]
