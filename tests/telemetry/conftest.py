"""A real Prometheus and Pushgateway (Debian's packages, installed by ``make
prometheus-install``) on free loopback ports, for the metrics integration tests.

Skipped with the reason when the binaries are missing, except under CI (``CI=true``), whose
``make test`` installs them: there a missing binary is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BINARIES = ("prometheus", "prometheus-pushgateway")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read()


@dataclass
class Stack:
    prometheus: str  # http://127.0.0.1:port
    gateway: str  # 127.0.0.1:port
    scrape_port: int  # where the scrape job looks for `persia train --metrics-port`

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; raises with Prometheus's error when it does not parse."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr!r}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def query_range(self, expr: str, seconds: float = 300.0, step: str = "2s") -> list[dict]:
        """A range query over the last ``seconds`` (what a Grafana panel asks for)."""
        end = time.time()
        params = {"query": expr, "start": end - seconds, "end": end, "step": step}
        url = f"{self.prometheus}/api/v1/query_range?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr!r}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_value(self, expr: str, want: float, timeout_s: float = 30.0) -> float | None:
        """Polls ``sum(expr)`` until it equals ``want`` (the data has to travel: push or
        scrape, then Prometheus's scrape); returns the last value seen."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            result = self.query(f"sum({expr})")
            if result:
                last = float(result[0]["value"][1])
                if last == want:
                    return last
            time.sleep(0.5)
        return last


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            http_get(url, timeout=1.0)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout_s} s:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def prometheus_stack(tmp_path_factory: pytest.TempPathFactory):
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        reason = (
            f"{', '.join(missing)} not installed (make prometheus-install installs Debian's "
            "prometheus and prometheus-pushgateway)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Prometheus tests: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("prometheus")
    gw_port, prom_port, scrape_port = free_port(), free_port(), free_port()
    config = root / "prometheus.yml"
    config.write_text(
        f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:{gw_port}"]
  - job_name: persia_scraped
    static_configs:
      - targets: ["127.0.0.1:{scrape_port}"]
"""
    )
    procs = []
    try:
        gw_log = root / "pushgateway.log"
        procs.append(
            _start(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{gw_port}"], gw_log)
        )
        _wait_ready(f"http://127.0.0.1:{gw_port}/-/ready", procs[-1], gw_log)
        prom_log = root / "prometheus.log"
        procs.append(
            _start(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                prom_log,
            )
        )
        _wait_ready(f"http://127.0.0.1:{prom_port}/-/ready", procs[-1], prom_log)
        yield Stack(f"http://127.0.0.1:{prom_port}", f"127.0.0.1:{gw_port}", scrape_port)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
