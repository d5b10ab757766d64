"""``persia serve``'s settings (light: the command line builds them before anything heavy is
imported)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from persia import _settings
from persia.errors import ConfigError

__all__ = ["ServerSettings", "read_token"]

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
        token: every request but ``GET /healthz`` must send ``Authorization: Bearer <token>``
            (HTTP) or the metadata ``authorization: Bearer <token>`` (gRPC), else 401 /
            UNAUTHENTICATED (None: no token; see docs/security.md). Not shown in ``repr``.
        ssl_certfile, ssl_keyfile: a PEM certificate (chain) and its private key: both front
            ends then speak TLS only (None, None: plain text).
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
    token: str | None = field(default=None, repr=False)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @property
    def tls(self) -> bool:
        """Whether both front ends speak TLS."""
        return self.ssl_certfile is not None

    def __post_init__(self) -> None:
        problems = []
        token = self.token
        if token is not None and (
            not isinstance(token, str) or not token or not all(33 <= ord(c) <= 126 for c in token)
        ):
            problems.append(
                "token must be a non-empty string of visible ASCII characters (no blanks)"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            problems.append("ssl_certfile and ssl_keyfile go together: give both or neither")
        for name in ("ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                problems.append(f"{name}: no such file {value!r}")
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


def read_token(token_file: str | os.PathLike[str] | None) -> str | None:
    """``persia serve``'s token: the content of ``token_file`` (surrounding blanks and the final
    newline ignored) when given, else ``$PERSIA_SERVE_TOKEN``, else None (no token).

    Raises:
        ConfigError: the file cannot be read or is empty, or the variable is set but blank.
    """
    if token_file is None:
        return _settings.serve_token()
    try:
        token = Path(token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file: cannot read {str(token_file)!r}: {exc}") from None
    if not token:
        raise ConfigError(f"--token-file: {str(token_file)!r} is empty")
    return token
