"""``persia serve`` over HTTP, against real uvicorn servers on 127.0.0.1 with an httpx client:
JSON rows equal the export's ``predict``; PersiaBatch bytes equal ``eval_ctx`` on the checkpoint;
limits answer 413 / 503 with a body naming the field; the server serves on through bad requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from server.conftest import raw_test_rows

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _post_rows(client: httpx.Client, rows: list[dict[str, Any]]) -> np.ndarray:
    r = client.post("/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["predictions"], dtype=np.float64)


def test_json_rows_equal_the_exports_predict(export, export_server):
    import persia.serving

    rows = raw_test_rows(export.job, 1100)
    rows[3]["age"] = None  # a missing dense value
    predictor = persia.serving.load(export.dir)
    expected = predictor.predict(rows)
    with httpx.Client(base_url=export_server.url, timeout=60) as client:
        got = np.concatenate([_post_rows(client, rows[i : i + n]) for i, n in ((0, 1), (1, 64))])
        np.testing.assert_allclose(got, expected[:65], atol=1e-6, rtol=0)
        np.testing.assert_allclose(_post_rows(client, rows), expected, atol=1e-6, rtol=0)
        # an extra column (the label) is ignored; no rows give no predictions
        labelled = [{**r, "income_bracket": ">50K"} for r in rows[:8]]
        np.testing.assert_allclose(_post_rows(client, labelled), expected[:8], atol=1e-6, rtol=0)
        assert _post_rows(client, []).shape == (0,)
        # dense values as JSON numbers (ints and floats) rather than text
        dense = [d.name for d in export.job.data.dense]
        numeric = [{**r, **{c: float(r[c]) for c in dense if r[c] is not None}} for r in rows[:64]]
        numeric[0]["age"] = int(numeric[0]["age"])
        np.testing.assert_allclose(
            _post_rows(client, numeric), predictor.predict(numeric), atol=1e-6, rtol=0
        )
        np.testing.assert_allclose(predictor.predict(numeric), expected[:64], atol=1e-6)


def test_batch_bytes_on_an_export_equal_its_json_rows(export, export_server):
    """The job reader's PersiaBatch of the same rows gives the same predictions."""
    import persia.serving
    from persia.job.readers import JobReader

    reader = JobReader(export.job.data)
    batch = next(reader.batches(export.job.data.test, 200, training=False))
    expected = persia.serving.load(export.dir).predict(raw_test_rows(export.job, 200))
    with httpx.Client(base_url=export_server.url, timeout=60) as client:
        r = client.post(
            "/predict/batch",
            content=batch.to_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], expected, atol=1e-6, rtol=0)


def test_binary_requests_equal_eval_ctx_on_the_checkpoint(checkpoint, checkpoint_server):
    with httpx.Client(base_url=checkpoint_server.url, timeout=60) as client:
        for batch, expected in zip(checkpoint.batches, checkpoint.expected, strict=True):
            r = client.post("/predict/batch", content=batch.to_bytes())
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["predictions"], expected, atol=1e-6, rtol=0)
        # a checkpoint has no raw-row recipe: JSON rows are refused, naming the field
        r = client.post("/predict", json={"rows": [{"a": 1}]})
        assert r.status_code == 409
        assert r.json()["detail"][0]["loc"] == ["body", "rows"]
        assert "PersiaBatch.to_bytes()" in r.json()["detail"][0]["msg"]
        ready = client.get("/readyz").json()
        assert ready["ready"] is True and ready["kind"] == "checkpoint"
        assert ready["freshness"]["last_delta_seq"] == 0


def _detail(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert isinstance(body["detail"], list) and body["detail"], body
    return body["detail"][0]


def test_limits_and_bad_requests_get_4xx_naming_the_field(export, export_server):
    rows = raw_test_rows(export.job, 2)
    with httpx.Client(base_url=export_server.url, timeout=60) as client:
        # oversized, by Content-Length: refused before the body is read
        r = client.post("/predict/batch", content=b"\0" * (1 << 20 | 1))
        assert r.status_code == 413 and _detail(r)["loc"] == ["body"]
    with httpx.Client(base_url=export_server.url, timeout=60) as client:
        # oversized, chunked (no Content-Length): refused once the limit is passed
        def chunks():
            for _ in range(20):
                yield b"\0" * 65536

        r = client.post("/predict/batch", content=chunks())
        assert r.status_code == 413 and _detail(r)["type"] == "too_large"
    with httpx.Client(base_url=export_server.url, timeout=60) as client:
        # too many rows (--max-batch 1100)
        r = client.post("/predict", json={"rows": rows * 551})
        assert r.status_code == 413 and _detail(r)["loc"] == ["body", "rows"]
        cases = [
            ({"rowz": rows}, ["body", "rows"]),  # no rows
            ({"rows": "x"}, ["body", "rows"]),
            ({"rows": [{"age": {"nested": 1}}]}, ["body", "rows", "*", "age"]),
            ({"rows": [{"age": [[1]]}]}, ["body", "rows", "*", "age"]),
            ({"rows": [1]}, ["body", "rows", 0]),
            ({"rows": [], "extra": 1}, ["body", "extra"]),
            ([], ["body"]),
            ({"rows": [rows[0], {**rows[1], "age": 7}]}, ["body", "rows", "*", "age"]),
        ]
        for body, loc in cases:
            r = client.post("/predict", json=body)
            assert r.status_code == 422, (body, r.text)
            locs = [d["loc"][: len(loc)] for d in r.json()["detail"]]
            assert loc in locs, (body, r.json())
        r = client.post("/predict", json={"rows": [{"age": "39"}]})
        assert r.status_code == 422 and "missing column(s) 'workclass'" in _detail(r)["msg"]
        r = client.post("/predict", json={"rows": [{**rows[0], "age": "old"}]})
        assert r.status_code == 422 and "'age'" in _detail(r)["msg"]
        r = client.post(
            "/predict", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422
        r = client.post("/predict/batch", content=b"not a batch")
        assert r.status_code == 422 and "PersiaBatch" in _detail(r)["msg"]
        # the server serves on
        assert client.get("/healthz").json() == {"status": "ok"}
        assert _post_rows(client, rows).shape == (2,)
        answers = _samples(client.get("/metrics"), "persia_serving_responses_total")
        assert answers[(("code", "422"), ("endpoint", "rows"))] >= 1
        assert answers[(("code", "413"), ("endpoint", "batch"))] >= 1
        schema = client.get("/openapi.json").json()
        assert {"/predict", "/predict/batch", "/healthz", "/readyz", "/metrics"} <= set(
            schema["paths"]
        )


def _samples(r: httpx.Response, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` in a /metrics answer (parsed by prometheus_client's text parser),
    by their labels other than role and replica."""
    from prometheus_client.parser import text_string_to_metric_families

    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name:
                assert s.labels["role"] == "server"
                key = tuple(
                    sorted((k, v) for k, v in s.labels.items() if k not in ("role", "replica"))
                )
                out[key] = s.value
    return out


def test_metrics_count_the_requests_made(export, export_server):
    """/metrics is persia.telemetry's text: after a few requests it holds their count, their
    samples and their latencies, and the refusals by status code."""
    rows = raw_test_rows(export.job, 5)
    with httpx.Client(base_url=export_server.url, timeout=60) as client:

        def read() -> dict[str, dict]:
            r = client.get("/metrics")
            return {
                n: _samples(r, n)
                for n in (
                    "persia_serving_requests_total",
                    "persia_serving_samples_total",
                    "persia_serving_request_seconds_count",
                    "persia_serving_responses_total",
                )
            }

        before = read()
        for n in (1, 2, 5):
            _post_rows(client, rows[:n])
        assert client.post("/predict", json={"rows": "x"}).status_code == 422
        after = read()

    def delta(name: str, key: tuple = ()) -> float:
        return after[name].get(key, 0.0) - before[name].get(key, 0.0)

    assert delta("persia_serving_requests_total") == 3
    assert delta("persia_serving_samples_total") == 8
    assert delta("persia_serving_request_seconds_count") == 3
    assert delta("persia_serving_responses_total", (("code", "200"), ("endpoint", "rows"))) == 3
    assert delta("persia_serving_responses_total", (("code", "422"), ("endpoint", "rows"))) == 1
    # an export follows no deltas: no freshness gauge
    metrics = httpx.get(f"{export_server.url}/metrics", timeout=30)
    assert _samples(metrics, "persia_serving_freshness_seconds") == {}


class _Blocking:
    """A served model whose predict_batch waits until released."""

    kind = "checkpoint"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict_batch(self, batch):
        self.entered.set()
        self.release.wait(30)
        return np.zeros(batch.batch_size, np.float32)

    def predict(self, rows):
        raise AssertionError("not called")

    def freshness(self):
        return {"last_delta_seq": None, "age_s": None}

    def close(self):
        pass


def test_more_requests_than_the_limits_get_503(checkpoint):
    """max_concurrent=1, max_queue=0: a second request while one computes is refused with 503
    and Retry-After; once the first is done the server answers again (in-process uvicorn)."""
    from persia.server import ServerSettings
    from persia.server.run import serve_model

    model = _Blocking()
    settings = ServerSettings(port=0, grpc_port=None, max_concurrent=1, max_queue=0)
    info: dict[str, Any] = {}
    started = threading.Event()

    def ready(i):
        info.update(i)
        started.set()

    stop = threading.Event()
    thread = threading.Thread(
        target=serve_model,
        args=(model, settings),
        kwargs={"on_ready": ready, "stop": stop},
        daemon=True,
    )
    thread.start()
    assert started.wait(60)
    body = checkpoint.batches[0].to_bytes()
    results: list[httpx.Response] = []
    with httpx.Client(base_url=info["http"], timeout=60) as client:
        first = threading.Thread(
            target=lambda: results.append(client.post("/predict/batch", content=body))
        )
        first.start()
        assert model.entered.wait(30)
        r = client.post("/predict/batch", content=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in _detail(r)["msg"]
        model.release.set()
        first.join(30)
        assert results[0].status_code == 200
        assert client.post("/predict/batch", content=body).status_code == 200
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_concurrent_requests_while_deltas_are_applied(tmp_path, checkpoint):
    """--follow: a served prediction is always that of a whole delta's state, never a mix, while
    requests run concurrently with the deltas being applied."""
    from runtime._jobs import make_batches, run, train_ctx

    from persia.ctx._stack import last_runtime
    from persia.embedding.config import parse_global_config
    from server.conftest import JitNet, Server, eval_predictions, write_embedding_config

    deltas, ckpt = tmp_path / "deltas", tmp_path / "ckpt"
    glob = parse_global_config(
        {
            "embedding_parameter_server_config": {
                "enable_incremental_update": True,
                "incremental_dir": str(deltas),
                "incremental_buffer_size": 10**9,  # flushed by hand below
            }
        }
    )
    probe = checkpoint.batches[0]
    model = JitNet()
    server = None
    try:
        with train_ctx(model, global_config_file=glob) as train:
            run(train, make_batches(6))
            train.dump_checkpoint(ckpt, with_jit_model=True)
            # the server's dense model is the checkpoint's; only the rows follow training
            jit = torch.jit.load(str(ckpt / "jit_dense.pt"))
            states = [eval_predictions(jit, [probe])[0]]
            server = Server(
                [str(ckpt), "--no-grpc", "--follow", str(deltas), "--poll-interval", "0.02"]
                + ["--embedding-config", str(write_embedding_config(tmp_path / "emb.yml"))]
            )
            seen: list[np.ndarray] = []
            stop = threading.Event()

            def ask() -> None:
                with httpx.Client(base_url=server.url, timeout=60) as client:
                    while not stop.is_set():
                        r = client.post("/predict/batch", content=probe.to_bytes())
                        assert r.status_code == 200, r.text
                        seen.append(np.asarray(r.json()["predictions"]))

            askers = [threading.Thread(target=ask) for _ in range(3)]
            for t in askers:
                t.start()
            for seq, lo in ((1, 6), (2, 12)):
                run(train, make_batches(6, seed=lo))
                train.runtime.flush()
                # the dense model is the checkpoint's: only the rows change on the server
                info = train._delta_writer.flush()
                assert info is not None and info.seq == seq
                states.append(eval_predictions(jit, [probe])[0])
                assert not np.allclose(states[-1], states[-2], atol=1e-6)
                deadline = time.monotonic() + 60
                with httpx.Client(base_url=server.url, timeout=60) as client:
                    while client.get("/readyz").json()["freshness"]["last_delta_seq"] < seq:
                        assert time.monotonic() < deadline, server.stderr()
                        time.sleep(0.02)
                n = len(seen)
                while len(seen) < n + 3 and time.monotonic() < deadline:
                    time.sleep(0.02)
                with httpx.Client(base_url=server.url, timeout=60) as client:
                    # the last delta's age, as /metrics reports it
                    age = _samples(client.get("/metrics"), "persia_serving_freshness_seconds")
                    assert 0 <= age[()] < 60, age
            stop.set()
            for t in askers:
                t.join(60)
        last = last_runtime()
        if last is not None:
            last.close()
    finally:
        if server is not None:
            server.close()
    assert len(seen) >= 6
    for got in seen:
        assert any(np.allclose(got, s, atol=1e-6, rtol=0) for s in states), got
    np.testing.assert_allclose(seen[-1], states[-1], atol=1e-6, rtol=0)
