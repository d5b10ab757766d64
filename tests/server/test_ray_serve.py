"""``persia serve --backend ray``: two Ray Serve replicas with fractional CPUs on a local Ray
cluster serve the export, both answer, and their predictions equal the export's ``predict``."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from server.conftest import raw_test_rows

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install .[ray])")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install .[ray])")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEPLOY_TIMEOUT_S = 180.0  # generous: replicas import torch on a shared machine


@pytest.fixture(scope="module")
def local_ray():
    """The session's Ray cluster if a test started one, else a new one (2 CPUs) shut down after."""
    from persia.backends.ray.backend import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_two_replicas_with_fractional_cpus_give_the_same_predictions(export, local_ray):
    from ray import serve

    import persia.serving
    from persia.backends.ray.serve import APP_NAME, deploy
    from persia.server import ServerSettings
    from persia.utils import find_free_port

    rows = raw_test_rows(export.job, 64)
    expected = persia.serving.load(export.dir).predict(rows)
    settings = ServerSettings(port=find_free_port(20000), grpc_port=None)
    try:
        url = deploy(export.dir, settings, replicas=2, replica_cpus=0.25)
        status = serve.status().applications[APP_NAME]
        replicas = status.deployments["persia-server"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        seen: dict[str, int] = {}
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        with httpx.Client(base_url=url, timeout=60) as client:
            while len(seen) < 2 or sum(seen.values()) < 8:
                assert time.monotonic() < deadline, f"answers by replica: {seen}"
                r = client.post("/predict", json={"rows": rows})
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(r.json()["predictions"], expected, atol=1e-6, rtol=0)
                replica = r.headers["x-persia-replica"]
                seen[replica] = seen.get(replica, 0) + 1
            ready = client.get("/readyz").json()
            assert ready["ready"] is True and ready["kind"] == "export"
            r = client.post("/predict/batch", content=b"junk")
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
    finally:
        serve.shutdown()
