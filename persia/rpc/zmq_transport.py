"""A zero-copy ZeroMQ request channel: the cluster backend's hot path for lookups and gradients.

Wire format (no pickle): a request is one multipart message ``[header, buffer, buffer, ...]``;
``header`` is UTF-8 JSON ``{"id": n, "m": method, "a": [arg, ...]}`` where each argument is
``{"v": value}`` (int, float, bool, str or null) or ``{"nd": [dtype, shape]}``, an array whose
raw bytes are the next buffer frame. Only numeric dtypes (bool, int, uint, float) are accepted, so
no message can make the receiver build an arbitrary object. The reply is ``[header, buffers...]``
with ``{"id": n, "r": arg}`` or ``{"id": n, "err": class, "msg": text}``.

Arrays are sent from their own memory (``copy=False``) and received as read-only views of the
message frames. The server is one thread with a ROUTER socket; clients keep one DEALER socket per
thread and replica, so the lookup thread and the gradient thread of an NN worker never share a
socket. A call waits at most ``timeout_s``; while it waits, an optional ``liveness`` check
(``(role, rank) -> None``, raising :class:`BackendError`) detects a dead server early.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from persia import errors as _errors
from persia.errors import BackendError, PersiaError
from persia.rpc.base import Transport
from persia.rpc.security import ChannelAccess, ChannelKeys, secure_client, secure_server

__all__ = ["ZmqServer", "ZmqTransport", "encode", "decode"]

_NUMERIC_KINDS = frozenset("biuf")
_POLL_MS = 200


def encode(header: dict[str, Any], values: list[Any]) -> list[Any]:
    """``header`` plus ``values`` as frames: the JSON header, then one frame per array."""
    described: list[dict[str, Any]] = []
    frames: list[Any] = []
    for v in values:
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in _NUMERIC_KINDS:
                raise BackendError(f"cannot send an array of dtype {v.dtype}")
            v = np.ascontiguousarray(v)
            described.append({"nd": [v.dtype.str, list(v.shape)]})
            frames.append(v.data.cast("B") if v.size else b"")
        elif isinstance(v, np.generic):
            described.append({"v": v.item()})
        elif v is None or isinstance(v, (bool, int, float, str)):
            described.append({"v": v})
        else:
            raise BackendError(f"cannot send a {type(v).__name__} on the data channel")
    head = dict(header)
    head["a"] = described
    return [json.dumps(head, separators=(",", ":")).encode(), *frames]


def decode(frames: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """The inverse of :func:`encode`: (header, values); arrays are read-only views."""
    head = json.loads(bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]))
    values: list[Any] = []
    k = 1
    for d in head.get("a", []):
        if "nd" in d:
            dtype = np.dtype(d["nd"][0])
            if dtype.kind not in _NUMERIC_KINDS:
                raise BackendError(f"refusing an array of dtype {dtype} from the data channel")
            shape = tuple(int(s) for s in d["nd"][1])
            frame = frames[k]
            k += 1
            buf = frame.buffer if hasattr(frame, "buffer") else frame
            values.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
        else:
            values.append(d.get("v"))
    return head, values


def serve_requests(
    sock: Any, stop: threading.Event, handle: Callable[[str, list[Any]], list[Any]]
) -> None:
    """Answers requests on a ROUTER socket until ``stop`` is set, then closes the socket.

    ``handle(method, args)`` returns the reply's values; any exception goes back to the caller
    as an error reply (a PersiaError keeps its class, anything else becomes a BackendError).
    """
    while not stop.is_set():
        if not sock.poll(_POLL_MS):
            continue
        frames = sock.recv_multipart(copy=False)
        ident, body = frames[0], frames[1:]
        rid = None
        try:
            head, args = decode(body)
            rid = head.get("id")
            reply = encode({"id": rid}, handle(str(head.get("m")), args))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            err = {"id": rid, "err": type(exc).__name__, "msg": str(exc)}
            if not isinstance(exc, PersiaError):
                err["err"] = "BackendError"
                err["msg"] = f"{type(exc).__name__}: {exc}"
            reply = [json.dumps(err).encode()]
        sock.send_multipart([ident, *reply], copy=False)
    sock.close(0)


class ZmqServer:
    """Serves ``dispatch(method, args) -> result`` on a ROUTER socket, on its own thread.

    Args:
        dispatch: runs one request; a :class:`PersiaError` it raises goes back to the caller.
        host: the address to bind (``127.0.0.1`` keeps the channel on this machine).
        port: 0 for a free port.
        security: ``"curve"`` (only clients holding :attr:`access`'s keys get in) or ``"null"``
            (anyone who reaches the port: :mod:`persia.rpc.security`).
        keys: the CURVE keys (None: fresh ones).

    Attributes:
        endpoint: ``tcp://host:port``.
        access: what a client of the job needs (give it only over an authenticated channel).
    """

    def __init__(
        self,
        dispatch: Callable[[str, list[Any]], Any],
        host: str = "127.0.0.1",
        port: int = 0,
        security: str = "curve",
        keys: ChannelKeys | None = None,
    ) -> None:
        self._dispatch = dispatch
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self.security = secure_server(self._ctx, self._sock, security, keys)
        except BaseException:
            self._sock.close(0)
            self._ctx.term()
            raise
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
            bound = port
        else:
            bound = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{bound}"
        self.access = self.security.access(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="persia-zmq-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        serve_requests(self._sock, self._stop, lambda method, args: [self._dispatch(method, args)])

    def close(self) -> None:
        """Stops the thread and the socket."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.security.stop()
        self._ctx.term()


class ZmqTransport(Transport):
    """Requests over :class:`ZmqServer` endpoints.

    Args:
        endpoints: role name -> each replica's :class:`ChannelAccess` (or plain
            ``tcp://host:port`` for a NULL-mechanism server), by rank.
        timeout_s: the longest one call may take before :class:`BackendError`.
        liveness: optional ``(role, rank) -> None`` check run while a reply is late; raises
            :class:`BackendError` when the replica is known dead.
    """

    def __init__(
        self,
        endpoints: dict[str, list[ChannelAccess | str]],
        timeout_s: float,
        liveness: Callable[[str, int], None] | None = None,
    ) -> None:
        self._endpoints = {k: list(v) for k, v in endpoints.items()}
        self.timeout_s = float(timeout_s)
        self._liveness = liveness
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._ids = itertools.count(1)
        self._all: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def replicas(self, role: str) -> int:
        return len(self._endpoints.get(role, []))

    def _socket(self, role: str, rank: int) -> zmq.Socket:
        socks = getattr(self._local, "socks", None)
        if socks is None:
            socks = self._local.socks = {}
        sock = socks.get((role, rank))
        if sock is None:
            try:
                endpoint = self._endpoints[role][rank]
            except (KeyError, IndexError):
                raise BackendError(
                    f"no such replica (have {self.replicas(role)})", role, rank
                ) from None
            with self._lock:
                if self._closed:
                    raise BackendError("the transport is closed", role, rank)
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(secure_client(sock, endpoint))
                self._all.append(sock)
            socks[(role, rank)] = sock
        return sock

    def _drop(self, role: str, rank: int) -> None:
        sock = self._local.socks.pop((role, rank), None)
        if sock is not None:
            with self._lock:
                if sock in self._all:
                    self._all.remove(sock)
            sock.close(0)

    def call(self, role: str, rank: int, method: str, *args: Any) -> Any:
        values = self.call_values(role, rank, method, list(args))
        return values[0] if values else None

    def call_values(self, role: str, rank: int, method: str, args: list[Any]) -> list[Any]:
        """One request whose reply is a list of values (the servers of
        :func:`serve_requests` whose handler returns several, e.g. the embedding workers)."""
        sock = self._socket(role, rank)
        rid = next(self._ids)
        sock.send_multipart(encode({"id": rid, "m": method}, args), copy=False)
        waited = 0.0
        while True:
            if sock.poll(_POLL_MS):
                head, values = decode(sock.recv_multipart(copy=False))
                if head.get("id") != rid:
                    continue  # a late reply to a call that timed out
                if "err" in head:
                    raise _rebuild(head, role, rank)
                return values
            waited += _POLL_MS / 1000
            if waited >= self.timeout_s:
                self._drop(role, rank)
                raise BackendError(f"no reply to {method} within {self.timeout_s:g} s", role, rank)
            if self._liveness is not None:
                try:
                    self._liveness(role, rank)
                except BackendError:
                    self._drop(role, rank)
                    raise

    def close(self) -> None:
        """Closes every socket (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for s in self._all:
                s.close(0)
            self._all.clear()
        self._ctx.term()


def _rebuild(head: dict[str, Any], role: str, rank: int) -> PersiaError:
    name = str(head.get("err"))
    msg = str(head.get("msg"))
    cls = getattr(_errors, name, None)
    if name in _errors.__all__ and isinstance(cls, type) and issubclass(cls, PersiaError):
        if cls is BackendError:
            return BackendError(msg, role, rank)
        if cls is _errors.ConfigError:
            return _errors.ConfigError(msg)
        return cls(msg)
    return BackendError(f"{name}: {msg}", role, rank)
