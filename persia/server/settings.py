"""``persia serve``'s settings (light: the command line builds them before anything heavy is
imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from persia.errors import ConfigError

__all__ = ["ServerSettings"]

MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    """The limits and addresses of one server (``persia serve``'s options).

    Attributes:
        host: the address both front ends listen on.
        port: the HTTP port (0: any free port).
        grpc_port: the gRPC port (TorchServe's inference API; 0: any free port, None: no gRPC).
        max_request_bytes: a larger request body gets 413 (HTTP) or RESOURCE_EXHAUSTED (gRPC).
        max_batch: a request with more samples gets 413, naming the field.
        max_concurrent: requests computed at once (threads).
        max_queue: requests waiting for a thread; one more gets 503 with ``Retry-After``
            (HTTP) or RESOURCE_EXHAUSTED (gRPC).
        max_delta_age_s: readiness fails while the last applied delta is older than this
            (None: no bound).
        model_name: the gRPC ``model_name`` served (None: any name).
        coalesce_rows: JSON-rows requests waiting at the same moment are computed in one
            model call up to this many rows (:mod:`persia.server._coalesce`; 0: one call per
            request).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = 7070
    max_request_bytes: int = 16 * MiB
    max_batch: int = 8192
    max_concurrent: int = 4
    max_queue: int = 64
    max_delta_age_s: float | None = None
    model_name: str | None = None
    coalesce_rows: int = 1024

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_request_bytes", "max_batch", "max_concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_queue", "coalesce_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be an int >= 0, got {value!r}")
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            if value is None and name == "grpc_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
                problems.append(f"{name} must be a port number (0: any free port), got {value!r}")
        age = self.max_delta_age_s
        if age is not None and not (
            isinstance(age, (int, float)) and math.isfinite(age) and age > 0
        ):
            problems.append(f"max_delta_age_s must be > 0 or None, got {age!r}")
        if problems:
            raise ConfigError(problems, source="persia serve")
