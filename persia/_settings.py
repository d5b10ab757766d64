"""Every environment variable persia reads, declared once, with its default and unit.

Read these through the functions here, never with ``os.environ`` elsewhere in the package
(``tests/test_settings.py`` checks it). Writes for child processes or for libraries that read
the environment themselves (``torch.distributed``'s ``MASTER_ADDR``, Ray's
``RAY_AUTH_TOKEN_PATH``, ...) stay where they happen, using the names declared here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from persia.errors import ConfigError

#: PERSIA-compatible: path of embedding_config.yml (set by PERSIA's launcher).
PERSIA_EMBEDDING_CONFIG = "PERSIA_EMBEDDING_CONFIG"
#: PERSIA-compatible: path of global_config.yml.
PERSIA_GLOBAL_CONFIG = "PERSIA_GLOBAL_CONFIG"
#: Folder for numba's compiled-kernel cache; must be writable.
NUMBA_CACHE_DIR = "NUMBA_CACHE_DIR"
#: Set to "0" to skip the deep (per-value) batch checks; cheap checks always run.
PERSIA_DEEP_CHECKS = "PERSIA_DEEP_CHECKS"
#: Set to "0" to stop the disk tier faulting its slab's pages in ahead of its writes.
PERSIA_DISK_PREFAULT = "PERSIA_DISK_PREFAULT"
#: PERSIA-compatible rank / world size / local rank (torch.distributed's names also work).
RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"
#: Backend of TrainCtx / eval_ctx when not given in code: "local" (default) or "ray".
PERSIA_BACKEND = "PERSIA_BACKEND"
DEFAULT_BACKEND = "local"
#: Ray's own variable: address of an existing Ray cluster to join (else a local one is started).
RAY_ADDRESS = "RAY_ADDRESS"
#: Seconds a call to a cluster role may take before it fails with BackendError (default 60).
PERSIA_RAY_TIMEOUT_S = "PERSIA_RAY_TIMEOUT_S"
DEFAULT_RAY_TIMEOUT_S = 60.0
#: Folder of a locally started Ray cluster's logs, sockets and auth token
#: (default ``<system temp>/persia-ray-<uid>``).
PERSIA_RAY_TEMP_DIR = "PERSIA_RAY_TEMP_DIR"
#: Ray namespace in which persia's processes join Ray and the roles of one job find each other
#: by name (default "persia": persia.backends.ray.naming).
PERSIA_RAY_NAMESPACE = "PERSIA_RAY_NAMESPACE"
#: PERSIA-compatible: this data loader's index and the number of data loaders (set by
#: persia-launcher data-loader --replica-index / --replica-size; defaults 0 and 1).
REPLICA_INDEX = "REPLICA_INDEX"
REPLICA_SIZE = "REPLICA_SIZE"
#: Name of the stream DataCtx sends to and StreamingDataset reads (default "default").
PERSIA_STREAM_CHANNEL = "PERSIA_STREAM_CHANNEL"
#: NN workers each data loader tells "end" before it exits (default 1).
PERSIA_STREAM_CONSUMERS = "PERSIA_STREAM_CONSUMERS"
#: PERSIA-compatible: the script of ``persia-launcher nn-worker`` / ``data-loader`` when no FILE
#: is given on the command line.
PERSIA_NN_WORKER_ENTRY = "PERSIA_NN_WORKER_ENTRY"
PERSIA_DATALOADER_ENTRY = "PERSIA_DATALOADER_ENTRY"
#: Name shared by the roles of one job started by persia-launcher (their actors'
#: ``persia-<name>-...``); set: TrainCtx(backend="ray") attaches to its parameter servers.
PERSIA_JOB_NAME = "PERSIA_JOB_NAME"
#: Security of persia's ZeroMQ channels: "curve" (default: only the job's own clients, encrypted)
#: or "null" (unauthenticated, for trusted networks only; persia.rpc.security).
PERSIA_CHANNEL_SECURITY = "PERSIA_CHANNEL_SECURITY"
#: Wire compression of the rows and gradients between embedding workers and parameter servers
#: on the cluster backend: "none" (default) or "f16" (float16 with a per-row scale; persia.rpc.wire).
PERSIA_WIRE_COMPRESSION = "PERSIA_WIRE_COMPRESSION"
#: torch threads of a CPU NN worker's dense step: "auto" (default: torch's count, or one fewer
#: when measured faster during the first steps), "keep" (torch's count) or an int.
PERSIA_NN_THREADS = "PERSIA_NN_THREADS"
#: Ray's own variables for its token authentication. When none is set, a Ray cluster started
#: by persia gets a fresh token in :func:`ray_temp_dir` (persia then sets RAY_AUTH_TOKEN_PATH).
RAY_AUTH_TOKEN = "RAY_AUTH_TOKEN"
RAY_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
#: Ray's own: "disabled" turns token authentication off.
RAY_AUTH_MODE = "RAY_AUTH_MODE"
#: torch.distributed's gloo interface; when unset, an NN worker sets it to the interface of
#: the rendezvous address (set to "": unset, gloo chooses).
GLOO_SOCKET_IFNAME = "GLOO_SOCKET_IFNAME"
#: PERSIA-compatible: the embedding-worker service (``host:port``) a serving handler's
#: ``InferCtx`` connects to (:func:`persia.service.get_embedding_worker_services`); unset or
#: empty: PERSIA's default ``DEFAULT_EMBEDDING_WORKER_SERVICE``.
EMBEDDING_WORKER_SERVICE = "EMBEDDING_WORKER_SERVICE"
DEFAULT_EMBEDDING_WORKER_SERVICE = "embedding_worker:8887"
#: torch.distributed's rendezvous address and port: written by persia's NN-worker actors before
#: they join their process group and by ``persia-launcher nn-worker``; read by
#: ``persia.distributed.DDPOption``'s tcp initialisation when it is given no address or port.
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
#: PERSIA-compatible: the Prometheus Pushgateway (``host:port`` or ``http://host:port``) every
#: role pushes its metrics to when ``metrics_config.enable_metrics`` is on (docs/metrics.md);
#: unset or blank: no push (PERSIA defaulted to ``metrics_gateway:9091``).
PERSIA_METRICS_GATEWAY_ADDR = "PERSIA_METRICS_GATEWAY_ADDR"
#: ``persia serve``'s bearer token (docs/security.md): every request but ``/healthz`` must send
#: ``Authorization: Bearer <token>``. ``--token-file`` wins when both are given; set and blank:
#: refused. Unset: no token.
PERSIA_SERVE_TOKEN = "PERSIA_SERVE_TOKEN"


def ensure_numba_cache_dir() -> str:
    """Point numba's cache at a writable folder before numba is imported.

    Uses ``NUMBA_CACHE_DIR`` when set; else ``<tmp>/persia-numba-cache-<uid>``, so an installed,
    read-only package still caches its kernels.
    """
    current = os.environ.get(NUMBA_CACHE_DIR)
    if current:
        return current
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"persia-numba-cache-{uid}"
    os.environ[NUMBA_CACHE_DIR] = str(path)
    return str(path)


#: OpenMP's idle policy; persia defaults it to PASSIVE (see :func:`passive_openmp_threads`).
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_openmp_threads() -> bool:
    """Makes torch's idle OpenMP threads sleep instead of spin, unless the user chose.

    persia runs its lookups and gradient application on background threads beside the dense
    compute; spinning OpenMP workers starve them (measured here on 2 cores under load: the Adult
    example ran at 2-6k samples/s with spinning threads, 25-35k with passive ones). Takes effect
    only if torch has not been imported yet; returns whether it did.
    """
    import sys

    if OMP_WAIT_POLICY in os.environ or "torch" in sys.modules:
        return False
    os.environ[OMP_WAIT_POLICY] = "PASSIVE"
    return True


def deep_checks_enabled() -> bool:
    """Whether per-value batch checks (finite dense features, ...) run. Default: on."""
    return os.environ.get(PERSIA_DEEP_CHECKS, "1") != "0"


def disk_prefault_enabled() -> bool:
    """Whether the disk tier faults slab pages in ahead of its writes. Default: on."""
    return os.environ.get(PERSIA_DISK_PREFAULT, "1") != "0"


def env_int(name: str, default: int) -> int:
    """An integer environment variable, or ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_raw(name: str) -> str:
    """The value of ``name`` as set (``""`` when unset), e.g. for an error message."""
    return os.environ.get(name, "")


def env_path(name: str) -> Path | None:
    """A path variable (``PERSIA_EMBEDDING_CONFIG``, ``PERSIA_GLOBAL_CONFIG``); None when unset or
    blank."""
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def env_values(names: Iterable[str]) -> dict[str, str]:
    """The variables among ``names`` that are set, with their values (e.g. to forward them)."""
    return {n: os.environ[n] for n in names if n in os.environ}


def environment() -> dict[str, str]:
    """A copy of this process's whole environment (the base of a child process's)."""
    return dict(os.environ)


def backend() -> str:
    """``PERSIA_BACKEND`` (surrounding blanks ignored), else ``DEFAULT_BACKEND``."""
    return os.environ.get(PERSIA_BACKEND, "").strip() or DEFAULT_BACKEND


def ray_address() -> str | None:
    """``RAY_ADDRESS`` (surrounding blanks ignored); None when unset or blank."""
    return os.environ.get(RAY_ADDRESS, "").strip() or None


def ray_timeout_s() -> float:
    """``PERSIA_RAY_TIMEOUT_S`` in seconds, else ``DEFAULT_RAY_TIMEOUT_S``.

    Raises:
        ConfigError: a value that is not a number, or not > 0.
    """
    raw = os.environ.get(PERSIA_RAY_TIMEOUT_S, "").strip()
    if not raw:
        return DEFAULT_RAY_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {PERSIA_RAY_TIMEOUT_S}: expected seconds, got {raw!r}"
        ) from None
    if not value > 0:
        raise ConfigError(f"environment variable {PERSIA_RAY_TIMEOUT_S}: must be > 0")
    return value


def ray_temp_dir() -> Path:
    """``PERSIA_RAY_TEMP_DIR``, else ``<system temp>/persia-ray-<uid>``."""
    raw = os.environ.get(PERSIA_RAY_TEMP_DIR, "").strip()
    if raw:
        return Path(raw)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"persia-ray-{uid}"


def ray_auth_chosen() -> bool:
    """Whether the user configured Ray's token authentication: ``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH`` set, or ``RAY_AUTH_MODE=disabled``."""
    if os.environ.get(RAY_AUTH_TOKEN) or os.environ.get(RAY_AUTH_TOKEN_PATH):
        return True
    return os.environ.get(RAY_AUTH_MODE, "").lower() == "disabled"


def channel_security() -> str:
    """``PERSIA_CHANNEL_SECURITY`` (surrounding blanks ignored, lower-cased), else ``"curve"``.

    Raises:
        ConfigError: a value other than ``curve`` or ``null``.
    """
    raw = os.environ.get(PERSIA_CHANNEL_SECURITY, "").strip().lower() or "curve"
    if raw not in ("curve", "null"):
        raise ConfigError(
            f"environment variable {PERSIA_CHANNEL_SECURITY}: expected curve or null, got {raw!r}"
        )
    return raw


def wire_compression() -> str:
    """``PERSIA_WIRE_COMPRESSION`` (surrounding blanks ignored, lower-cased), else ``"none"``.

    Raises:
        ConfigError: a value other than ``none`` or ``f16``.
    """
    raw = os.environ.get(PERSIA_WIRE_COMPRESSION, "").strip().lower() or "none"
    if raw not in ("none", "f16"):
        raise ConfigError(
            f"environment variable {PERSIA_WIRE_COMPRESSION}: expected none or f16, got {raw!r}"
        )
    return raw


def nn_threads() -> str:
    """``PERSIA_NN_THREADS`` (surrounding blanks ignored, lower-cased), else ``"auto"``; checked
    by ``persia.ctx.TrainCtx`` (``"auto"``, ``"keep"`` or an int >= 1)."""
    return os.environ.get(PERSIA_NN_THREADS, "").strip().lower() or "auto"


def ray_namespace() -> str | None:
    """``PERSIA_RAY_NAMESPACE`` (surrounding blanks ignored); None when unset or blank (the Ray
    backend then uses its default, ``persia``: ``persia.backends.ray.naming.namespace``)."""
    return os.environ.get(PERSIA_RAY_NAMESPACE, "").strip() or None


def job_name() -> str | None:
    """``PERSIA_JOB_NAME`` (surrounding blanks ignored); None when unset or blank."""
    return os.environ.get(PERSIA_JOB_NAME, "").strip() or None


def stream_channel() -> str | None:
    """``PERSIA_STREAM_CHANNEL`` as set; None when unset or empty (the caller's default is
    ``"default"``)."""
    return os.environ.get(PERSIA_STREAM_CHANNEL) or None


def gloo_socket_ifname() -> str | None:
    """``GLOO_SOCKET_IFNAME`` as set (``""`` when set empty); None when unset."""
    return os.environ.get(GLOO_SOCKET_IFNAME)


def embedding_worker_service() -> str:
    """``EMBEDDING_WORKER_SERVICE`` as set when not empty, else
    ``DEFAULT_EMBEDDING_WORKER_SERVICE`` (PERSIA's rule: the value is not stripped)."""
    return os.environ.get(EMBEDDING_WORKER_SERVICE) or DEFAULT_EMBEDDING_WORKER_SERVICE


def master_addr() -> str | None:
    """``MASTER_ADDR`` (surrounding blanks ignored); None when unset or blank."""
    return os.environ.get(MASTER_ADDR, "").strip() or None


def master_port() -> int | None:
    """``MASTER_PORT``; None when unset or blank.

    Raises:
        ConfigError: a value that is not a port number (1-65535).
    """
    raw = os.environ.get(MASTER_PORT, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"environment variable {MASTER_PORT}: expected a port, got {raw!r}")
    return port


def metrics_gateway_addr() -> str | None:
    """``PERSIA_METRICS_GATEWAY_ADDR`` (surrounding blanks ignored); None when unset or blank."""
    return os.environ.get(PERSIA_METRICS_GATEWAY_ADDR, "").strip() or None


def serve_token() -> str | None:
    """``PERSIA_SERVE_TOKEN`` (surrounding blanks ignored); None when unset.

    Raises:
        ConfigError: set but blank (an empty token would admit anyone who sends an empty one).
    """
    raw = os.environ.get(PERSIA_SERVE_TOKEN)
    if raw is None:
        return None
    if not raw.strip():
        raise ConfigError(
            f"environment variable {PERSIA_SERVE_TOKEN}: the token is empty (unset it to serve "
            "without a token)"
        )
    return raw.strip()
