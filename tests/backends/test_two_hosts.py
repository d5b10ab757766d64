"""Two hosts for real: a Ray head and a Ray worker node in two network namespaces joined by a
veth pair; the parameter servers on one, the NN workers on the other, traffic over the veth.

Needs root and a kernel that allows network namespaces (CI runs as root); skipped otherwise.
Only the addresses of the namespaces created here (10.123.0.1/24, 10.123.0.2/24) are used.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"
HOST_A, HOST_B = "10.123.0.1", "10.123.0.2"

DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from persia.backends.ray.backend import ClusterConfig
    from persia.job.config import load_job
    from persia.job.runner import run_job

    address, job_path = sys.argv[1], sys.argv[2]
    cluster = ClusterConfig(
        address=address, num_ps=2, ps_resources={"ps_host": 1},
        num_nn_workers=2, nn_resources={"nn_host": 1}, timeout_s=60,
    )
    result = run_job(load_job(job_path, ["training.backend=ray", "training.progress=none"]),
                     cluster=cluster)

    # Where the roles ran and which addresses the data path used.
    from persia.backends.ray.runtime import build_ray_runtime
    from persia.embedding import EmbeddingConfig
    from persia.job.config import load_job as lj
    from persia.job.runner import embedding_configs

    emb, glob = embedding_configs(lj(job_path, []))
    rt = build_ray_runtime(EmbeddingConfig(), None, emb, glob, cluster=cluster)
    endpoints = [ray.get(a.endpoint.remote()) for a in rt.store.actors]
    # a stranger on host B that knows each server's address and public key, but no job key
    import subprocess
    import numpy as np
    dims = sorted(ray.get(rt.store.actors[0].stats.remote())["dims"])
    for a in rt.store.actors:  # some rows to poison
        ray.get(a.lookup.remote(np.arange(1, 6, dtype=np.uint64), dims[0], True))
    before = [ray.get(a.export_rows.remote()) for a in rt.store.actors]
    targets = []
    for a, part in zip(rt.store.actors, before):
        acc = ray.get(a.access.remote())
        d = next(d for d in dims if len(part[d]["keys"]))
        targets.append({"kind": "ps", "address": acc.address, "server_key":
                        acc.server_key.decode(), "keys": [int(k) for k in part[d]["keys"][:5]],
                        "dim": d})
    probe = subprocess.run([sys.executable, sys.argv[3], json.dumps(targets)],
                           capture_output=True, text=True, timeout=60)
    stranger = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else [
        {"error": probe.stderr[-2000:]}]
    after = [ray.get(a.export_rows.remote()) for a in rt.store.actors]
    unchanged = all(
        np.array_equal(b[d]["keys"], n[d]["keys"]) and np.array_equal(b[d]["values"], n[d]["values"])
        for b, n in zip(before, after) for d in b
    )
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    @ray.remote(num_cpus=0, resources={"nn_host": 0.01})
    def nn_node():
        return ray.util.get_node_ip_address()
    nn_ip = ray.get(nn_node.remote())
    rt.close()
    print(json.dumps({"test_auc": result["test_auc"], "train_samples": result["train_samples"],
                      "endpoints": endpoints, "nn_ip": nn_ip,
                      "stranger": stranger, "unchanged": unchanged,
                      "nodes": sorted(nodes.values())}))
    """
)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    tag = f"{os.getpid() % 100000}"
    a, b = f"persia-a-{tag}", f"persia-b-{tag}"
    va, vb = f"pva{tag}", f"pvb{tag}"
    made: list[str] = []
    try:
        for ns in (a, b):
            r = sh("ip", "netns", "add", ns, check=False)
            if r.returncode != 0:
                pytest.skip(f"the kernel refused a network namespace: {r.stderr.strip()}")
            made.append(ns)
        r = sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb, check=False)
        if r.returncode != 0:
            pytest.skip(f"the kernel refused a veth pair: {r.stderr.strip()}")
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, HOST_A), (b, vb, HOST_B)):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in made:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes started inside the namespaces made here
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)


def _wait_port(ns: str, host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    probe = f"import socket; socket.create_connection(({host!r}, {port}), 1).close()"
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True
        )
        if r.returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {host}:{port} in {ns}")


@pytest.mark.slow
def test_adult_job_across_two_hosts_over_a_veth_pair(two_hosts):
    pytest.importorskip("ray")
    a, b = two_hosts
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="pr2h-", dir="/tmp")
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    with socket.socket() as s:  # any port: it lives in namespace A only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--block", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}"]
    head = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            a,
            ray_bin,
            "start",
            "--head",
            f"--node-ip-address={HOST_A}",
            f"--port={port}",
            "--include-dashboard=false",
            '--resources={"ps_host": 4}',
            *common,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs = [head]
    try:
        _wait_port(a, HOST_A, port, 45)
        worker = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                b,
                ray_bin,
                "start",
                f"--address={HOST_A}:{port}",
                f"--node-ip-address={HOST_B}",
                '--resources={"nn_host": 4}',
                *common,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(worker)
        script = Path(temp) / "driver.py"
        script.write_text(DRIVER)
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                b,
                sys.executable,
                str(script),
                f"{HOST_A}:{port}",
                str(ADULT),
                str(Path(__file__).with_name("_stranger.py")),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(temp, ignore_errors=True)
    print("two hosts:", result)
    assert result["nodes"] == [HOST_A, HOST_B]
    assert all(e.startswith(f"tcp://{HOST_A}:") for e in result["endpoints"])  # PS on host A
    assert result["nn_ip"] == HOST_B  # NN workers on host B
    assert result["test_auc"] >= 0.90
    # from the other host, the stranger got no reply from either parameter server and moved
    # no row (its probes: a lookup and a gradient of 1e3 each, CURVE with its own keys and NULL)
    assert [(p.get("curve"), p.get("null")) for p in result["stranger"]] == [(0, 0), (0, 0)], (
        result["stranger"]
    )
    assert result["unchanged"]
