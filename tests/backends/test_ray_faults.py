"""Failures of the multi-NN-worker job on the Ray backend end it with a typed error, not a hang."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from persia.backends.ray.backend import ClusterConfig
from persia.errors import BackendError

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"


def _kill_when_training(ray, job_name: str, rank: int, log: dict, stop: threading.Event) -> None:
    """Kills NN worker ``rank`` of ``job_name`` once the parameter servers hold rows (training
    has started); records when."""
    from persia.backends.ray.ddp import attach_parameter_servers

    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            ps = attach_parameter_servers(job_name, 1, timeout_s=5)
            worker = ray.get_actor(f"persia-{job_name}-nn-{rank}")
            stats = ray.get(ps[0].stats.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - not started yet
            time.sleep(0.2)
            continue
        if int(stats["rows"]) > 0:
            time.sleep(0.5)  # well into training
            log["killed_at"] = time.monotonic()
            ray.kill(worker, no_restart=True)
            return
        time.sleep(0.1)


def test_a_dead_nn_worker_ends_a_ddp_job_with_a_typed_error_naming_it(ray_cluster):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    ray = ray_cluster
    timeout_s = 20.0
    job_name = f"fault-nn-{int(time.time() * 1000)}"
    # several epochs so that the kill lands mid-run
    job = load_job(ADULT, ["training.backend=ray", "training.progress=none", "training.epochs=5"])
    log: dict = {}
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_when_training, args=(ray, job_name, 1, log, stop), daemon=True
    )
    killer.start()
    cluster = ClusterConfig(num_ps=2, num_nn_workers=2, timeout_s=timeout_s, job_name=job_name)
    try:
        with pytest.raises(BackendError) as info:
            run_job(job, cluster=cluster)
        ended_at = time.monotonic()
    finally:
        stop.set()
        killer.join(timeout=10)
    assert "killed_at" in log, "the job ended before NN worker 1 could be killed"
    err = info.value
    assert (err.role, err.rank) == ("nn-worker", 1), str(err)
    assert "nn-worker[1]" in str(err)
    assert ended_at - log["killed_at"] < timeout_s
    # every actor of the job is gone: the surviving NN worker and the parameter servers
    time.sleep(0.5)
    for name in (f"persia-{job_name}-nn-0", f"persia-{job_name}-ps-0"):
        with pytest.raises(ValueError):
            ray.get_actor(name)
