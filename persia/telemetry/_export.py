"""Getting the metrics out: a push to a Prometheus Pushgateway every interval (PERSIA's way), and
a scrape endpoint (``persia train --metrics-port``)."""

from __future__ import annotations

import base64
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from persia.logger import get_default_logger

#: The text format Prometheus and the Pushgateway read (prometheus_client's default moved on).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SAFE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_logger = get_default_logger()


def _path_label(name: str, value: str) -> str:
    """One ``/name/value`` of a Pushgateway URL (base64 when the value needs it)."""
    if _SAFE.match(value):
        return f"/{name}/{value}"
    encoded = base64.urlsafe_b64encode(value.encode()).decode().rstrip("=") or "="
    return f"/{name}@base64/{encoded}"


def push_url(gateway: str, job: str, instance: str) -> str:
    """The Pushgateway URL of one process's group (``job`` and ``instance`` its grouping key)."""
    base = gateway if "://" in gateway else f"http://{gateway}"
    return (
        base.rstrip("/") + "/metrics" + _path_label("job", job) + _path_label("instance", instance)
    )


class Pusher:
    """PUTs the rendered metrics to ``url`` every ``interval_s`` seconds on a daemon thread
    (``persia-metrics-push``), replacing this process's group on the gateway each time."""

    def __init__(self, url: str, interval_s: float, render: Callable[[], bytes]) -> None:
        self.url, self.interval_s, self.render = url, float(interval_s), render
        self.pushes = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="persia-metrics-push", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push()

    def push(self) -> bool:
        """Pushes once now; False (and a warning the first time) when the gateway refuses or
        cannot be reached."""
        with self._lock:
            body = self.render()
            request = urllib.request.Request(
                self.url, data=body, method="PUT", headers={"Content-Type": CONTENT_TYPE}
            )
            try:
                with urllib.request.urlopen(request, timeout=5.0) as reply:
                    reply.read()
            except (urllib.error.URLError, OSError) as exc:
                self.failures += 1
                if self.failures == 1:
                    _logger.warning(
                        f"persia metrics: push to {self.url} failed ({exc}); is the Pushgateway "
                        "running at PERSIA_METRICS_GATEWAY_ADDR? (later failures are not logged)"
                    )
                return False
            self.pushes += 1
            return True

    def close(self) -> None:
        """Stops the thread and pushes a last time."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 10.0)
        self.push()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] not in ("/", "/metrics"):
            self.send_error(404, "only /metrics is served")
            return
        body = self.server.render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.scraped()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


class MetricsServer(ThreadingHTTPServer):
    """Serves ``GET /metrics`` on a daemon thread (``persia-metrics-http``)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, render: Callable[[], bytes]) -> None:
        super().__init__((host, port), _Handler)
        self.render = render
        self.scrapes = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self.serve_forever, name="persia-metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def scraped(self) -> None:
        with self._cond:
            self.scrapes += 1
            self._cond.notify_all()

    def wait_scrape(self, after: int, timeout_s: float) -> bool:
        """Waits until more than ``after`` scrapes were served; False after ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.scrapes > after, timeout=timeout_s)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
