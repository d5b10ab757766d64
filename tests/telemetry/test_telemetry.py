"""persia.telemetry without a Prometheus: off by default (nothing collected, prometheus_client
not even imported), what a job records when on, the push's URL and failures, PERSIA's config,
the distinct-ID estimate, docs/metrics.md against the catalog, and `persia train --tensorboard`."""

from __future__ import annotations

import gc
import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from persia import telemetry
from persia.errors import ConfigError
from persia.telemetry._catalog import CATALOG, exposed_names
from persia.telemetry._distinct import DistinctEstimator
from persia.telemetry._export import Pusher, push_url

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from runtime._jobs import Net, make_batches, run, train_ctx  # noqa: E402


@pytest.fixture
def metrics_on():
    telemetry.shutdown()
    rec = telemetry.configure(telemetry.NN, 0)
    yield rec
    telemetry.shutdown()


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _sum(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        if key.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


def test_off_by_default_and_nothing_is_collected_or_imported() -> None:
    code = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from runtime._jobs import Net, make_batches, run, train_ctx\n"
        "from persia import telemetry\n"
        "model = Net()\n"
        "with train_ctx(model) as ctx:\n"
        "    run(ctx, make_batches(4), staleness=2)\n"
        "print(telemetry.current().on, telemetry.render()[0] == b'', "
        "'prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "False True False"


def test_a_local_job_reports_every_role(metrics_on) -> None:
    model = Net()
    batches = make_batches(12)
    # the shards' figures cover every store alive in this process (an earlier test's runtime
    # may still be held): count this job's as the change over the figures before it trained
    with train_ctx(model) as ctx:
        gc.collect()  # a store dropped (by this context's start) but not yet collected
        s0 = _samples(telemetry.render()[0].decode())  # this job's shards hold nothing yet
        losses = run(ctx, batches, staleness=3)
        stats = ctx.runtime.store.stats()
    text = telemetry.render()[0].decode()
    s = _samples(text)
    assert _sum(s, "persia_samples_trained_total", role="nn-worker") == 12 * 16
    assert _sum(s, "persia_batches_trained_total") == len(losses) == 12
    assert _sum(s, "persia_staleness_batches_count") == 12
    for name, key in (
        ("persia_rows_held", "rows"),
        ("index_miss_count", "misses"),
        ("gradient_id_miss_count", "skipped_absent"),
    ):
        assert (
            _sum(s, name, role="parameter-server") - _sum(s0, name, role="parameter-server")
            == (stats[key])
        ), name
    assert _sum(s, "persia_lookup_seconds_count", role="embedding-worker") == 12
    assert _sum(s, "persia_apply_seconds_count", role="embedding-worker") == 12
    assert _sum(s, "persia_loader_batches_total", role="data-loader") == 12
    ids = sum(int(n.sum()) for b in batches for _, n in b[0].values())
    assert _sum(s, "persia_lookup_keys_total") == ids
    # PERSIA's gauges, per feature where PERSIA had a feat label
    rates = {k: v for k, v in s.items() if k.startswith("batch_unique_indices_rate")}
    assert {re.search(r'feat="(\w+)"', k).group(1) for k in rates} == {"a", "b"}  # type: ignore[union-attr]
    assert all(0 < v <= 1 for v in rates.values())
    distinct = {
        re.search(r'feat="(\w+)"', k).group(1): v  # type: ignore[union-attr]
        for k, v in s.items()
        if k.startswith("estimated_distinct_id")
    }
    seen_a = len({int(x) for b in batches for x in b[0]["a"][0]})
    assert abs(distinct["a"] - seen_a) <= 2
    assert "# TYPE index_miss_count counter" in text  # PERSIA's name, no _total
    assert "# TYPE staleness gauge" in text
    assert "_created" not in text


def test_nan_gradients_are_counted_per_feature(metrics_on) -> None:
    import torch

    model = Net()
    with train_ctx(model) as ctx:
        from runtime._jobs import ListDataset

        from persia.data import DataLoader

        for b in DataLoader(ListDataset(make_batches(1)), embedding_staleness=1):
            out, labels = ctx.forward(b)
            loss = torch.nn.functional.binary_cross_entropy(out, labels[0]) * float("nan")
            ctx.backward(loss)
        ctx.runtime.flush()
    s = _samples(telemetry.render()[0].decode())
    assert _sum(s, "nan_count", feat="a") == 1 and _sum(s, "nan_count", feat="b") == 1


def test_settings_and_roles_are_checked() -> None:
    with pytest.raises(ConfigError, match="metrics role must be one of"):
        telemetry.configure("chef")
    with pytest.raises(ConfigError, match="push_interval_seconds must be a number > 0"):
        telemetry.MetricsSettings("job", "127.0.0.1:9091", 0)
    with pytest.raises(ConfigError, match="job_name must be a non-empty string"):
        telemetry.MetricsSettings(" ", "127.0.0.1:9091")


def test_push_url_encodes_what_a_path_cannot_hold() -> None:
    assert push_url("gw:9091", "job1", "nn-worker-0") == (
        "http://gw:9091/metrics/job/job1/instance/nn-worker-0"
    )
    url = push_url("http://gw:9091/", "my job/1", "parameter-server-1")
    assert url == "http://gw:9091/metrics/job@base64/bXkgam9iLzE/instance/parameter-server-1"


def test_a_push_that_fails_warns_once_and_training_goes_on(caplog) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    pusher = Pusher(push_url(f"127.0.0.1:{port}", "j", "i"), 3600, lambda: b"x 1\n")
    with caplog.at_level(logging.WARNING, logger="persia"):
        assert pusher.push() is False
        assert pusher.push() is False
    pusher._stop.set()
    warned = [r for r in caplog.records if "push to" in r.getMessage()]
    assert len(warned) == 1 and pusher.failures == 2


def test_persia_metrics_config_without_a_gateway_collects_and_warns(monkeypatch, caplog) -> None:
    from persia.embedding.config import MetricsConfig

    telemetry.shutdown()
    monkeypatch.delenv("PERSIA_METRICS_GATEWAY_ADDR", raising=False)
    try:
        assert telemetry.enable_from_config(MetricsConfig(), telemetry.NN).on is False
        with caplog.at_level(logging.WARNING, logger="persia"):
            rec = telemetry.enable_from_config(MetricsConfig(enable_metrics=True), telemetry.NN)
        assert rec.on and telemetry.settings() is None and telemetry.push_now() is None
    finally:
        telemetry.shutdown()


def test_the_scrape_endpoint_serves_the_text_format() -> None:
    import urllib.request

    telemetry.shutdown()
    try:
        server = telemetry.serve(0, "127.0.0.1")
        telemetry.current().trained(5)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as reply:
            body = reply.read().decode()
            assert reply.headers["Content-Type"] == telemetry.CONTENT_TYPE
        assert 'persia_samples_trained_total{replica="0",role="nn-worker"} 5.0' in body
    finally:
        telemetry.shutdown()


def test_distinct_ids_estimate_small_and_large_features() -> None:
    rng = np.random.default_rng(0)
    est = DistinctEstimator(12, {1: "small", 2: "large"})
    large = rng.choice(2**40, 200_000, replace=False).astype(np.uint64)
    for chunk in np.array_split(large, 100):
        keys = np.concatenate(
            [
                (np.uint64(1) << np.uint64(52)) | rng.integers(0, 50, 64).astype(np.uint64),
                (np.uint64(2) << np.uint64(52)) | chunk,
            ]
        )
        est.add(np.unique(keys))
    got = est.estimates()
    assert abs(got["small"] - 50) <= 2
    assert abs(got["large"] - 200_000) / 200_000 < 0.08
    assert not est.full_mode[est.names.index("large")]  # switched to the 1/16 sample


def test_distinct_kernel_matches_its_numpy_twin_register_for_register() -> None:
    rng = np.random.default_rng(1)
    features = {1: "a", 2: "b", 3: "a"}  # two prefixes of one feature; prefix 0 not counted
    kernel, naive = DistinctEstimator(8, features), DistinctEstimator(8, features)
    kernel.full_mode[kernel.names.index("b")] = False  # one feature already on the sample
    naive.full_mode[:] = kernel.full_mode
    total = np.zeros(256, dtype=np.int64)
    for _ in range(40):
        prefixes = rng.integers(0, 4, 3000).astype(np.uint64)
        keys = np.unique(
            (prefixes << np.uint64(56)) | rng.integers(0, 2**56, 3000, dtype=np.uint64)
        )
        counts = np.zeros(256, dtype=np.int64)
        kernel.add(keys, counts)
        naive.add_naive(keys)
        np.testing.assert_array_equal(
            counts, np.bincount((keys >> np.uint64(56)).astype(np.intp), minlength=256)
        )
        total += counts
    np.testing.assert_array_equal(kernel.full, naive.full)
    np.testing.assert_array_equal(kernel.sampled, naive.sampled)
    assert kernel.full.any() and kernel.sampled.any()
    assert kernel.estimates() == naive.estimates()


def test_unique_rates_are_read_per_group_when_collected(metrics_on) -> None:
    """batch_unique_indices_rate: each group's (dim's) last batch, computed at collection."""
    stats = metrics_on.feature_stats(8, {1: "a", 2: "b", 3: "c"})
    p = np.uint64(56)
    group1 = np.array([1 << 56 | 5, 1 << 56 | 6, 2 << 56 | 7], dtype=np.uint64)
    stats.observe(group1, {1: 4, 2: 1})  # a: 2 unique of 4 IDs, b: 1 of 1
    stats.observe(np.array([3 << 56 | 9], dtype=np.uint64), {3: 8})  # another dim: c 1 of 8
    stats.observe(np.array([1 << 56 | 5], dtype=np.uint64), {1: 2, 2: 0})  # group 1 again
    assert (group1 >> p).tolist() == [1, 1, 2]
    s = _samples(telemetry.render()[0].decode())
    rates = {
        re.search(r'feat="(\w+)"', k).group(1): v  # type: ignore[union-attr]
        for k, v in s.items()
        if k.startswith("batch_unique_indices_rate")
    }
    assert rates == {"a": 0.5, "c": 0.125}  # b: no IDs in group 1's last batch


def test_docs_list_every_metric_with_its_type() -> None:
    doc = (ROOT / "docs/metrics.md").read_text()
    for m in CATALOG:
        row = next(
            (
                line
                for line in doc.splitlines()
                if f"`{exposed_names(m)[0].removesuffix('_bucket')}`" in line
            ),
            None,
        )
        assert row is not None, f"docs/metrics.md does not list {m.name}"
        assert m.type in row, f"{m.name}: type {m.type} not in its row"


def test_persia_train_tensorboard_writes_the_scalars(tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from persia.cli.main import main

    argv = ["train", str(ROOT / "examples/adult_income/job.yaml"), "--progress", "none"]
    argv += ["--set", "training.max_samples=1024", "--set", "training.eval_max_samples=512"]
    argv += ["--set", "training.log_every_batches=2", "--set", "training.eval_every_batches=4"]
    argv += ["--tensorboard", str(tmp_path / "runs")]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/samples_per_s", "train/staleness", "eval/auc"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    aucs = acc.Scalars("eval/auc")
    assert [e.step for e in aucs] == [4, 8, 8]  # periodic, then the final evaluation
    assert aucs[-1].value == pytest.approx(result["test_auc"])
