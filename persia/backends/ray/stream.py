"""PERSIA's separate data-loader processes on the cluster backend: ``DataCtx`` -> ``StreamingDataset``.

A data-loader process (``with DataCtx() as ctx: ctx.send_data(batch)``) binds a ZeroMQ ROUTER
socket and announces its address through a small named Ray actor,
``persia-stream-<channel>-loader-<index>`` in the Ray namespace ``PERSIA_RAY_NAMESPACE``
(default ``persia``), so that processes of other Ray drivers find it. NN workers iterating
``DataLoader(StreamingDataset(...))`` find every loader (``replica_size`` of them, learnt from
loader 0), connect one DEALER socket to each and pull batches: each request is answered with the
next batch :meth:`StreamSender.send` was given (so loaders never run more than one batch ahead of
a consumer per socket, plus ZeroMQ's buffers), or with ``end`` once the loader has finished.

Batches travel as :meth:`PersiaBatch.to_arrays` (numeric arrays plus a JSON header) in the
wire format of :mod:`persia.rpc.zmq_transport`: raw buffers, no pickle; the receiver rebuilds
them with :meth:`PersiaBatch.from_arrays`, which runs every batch check again.

A loader leaves when each NN worker it has seen got ``end`` and at least ``consumers`` of them
did (``PERSIA_STREAM_CONSUMERS``, default 1), or after ``linger_s`` without requests.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from persia import _settings, env, telemetry
from persia.backends.ray.naming import namespace, stream_actor_name
from persia.embedding.data import PersiaBatch
from persia.errors import BackendError, ConfigError
from persia.rpc.security import ChannelAccess, secure_client, secure_server
from persia.rpc.zmq_transport import decode, encode

if TYPE_CHECKING:
    from persia.backends.ray.config import ClusterConfig

__all__ = ["DATA_LOADER", "StreamSender", "receive_batches", "stream_namespace", "stream_of"]

DATA_LOADER = "data-loader"
_POLL_MS = 100


def stream_namespace() -> str:
    """The Ray namespace in which loaders and NN workers meet: :func:`naming.namespace`."""
    return namespace()


def _env_count(name: str, default: int, minimum: int) -> int:
    try:
        value = _settings.env_int(name, default)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}: expected an integer, got {_settings.env_raw(name)!r}"
        ) from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}: expected >= {minimum}, got {value}")
    return value


class _LoaderInfo:
    """What a loader announces (a Ray actor holding no data): its index, the number of
    loaders, and its channel's :class:`ChannelAccess` (address and, with CURVE, the client
    keys, handed out only as replies of Ray calls)."""

    def __init__(self, access: ChannelAccess, index: int, size: int) -> None:
        self.info = {"endpoint": access, "index": index, "size": size}

    def get(self) -> dict[str, Any]:
        return self.info


def _connect_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if not _settings.ray_address():
        raise BackendError(
            "a data loader joins the job's Ray cluster: set RAY_ADDRESS (persia-launcher does)",
            role=DATA_LOADER,
        )
    from persia.backends.ray.backend import init_ray

    init_ray()


class StreamSender:
    """The sending side of one data loader (what ``DataCtx`` uses).

    Args:
        replica_index: this loader's index (default :func:`persia.env.get_replica_index`:
            ``REPLICA_INDEX``, else 0).
        replica_size: the number of loaders (default :func:`persia.env.get_replica_size`:
            ``REPLICA_SIZE``, else 1).
        channel: the stream's name (default ``PERSIA_STREAM_CHANNEL``, else ``default``).
        consumers: NN workers that must get ``end`` before :meth:`close` returns (default
            ``PERSIA_STREAM_CONSUMERS``, else 1).
        bind_host: address to bind (default: the node's Ray address when joining a cluster by
            ``RAY_ADDRESS``, else 127.0.0.1).
        timeout_s: the longest :meth:`send` waits for an NN worker to ask for a batch.
        linger_s: how long :meth:`close` keeps answering ``end`` without new requests.
        security: the channel's mechanism, ``"curve"`` or ``"null"`` (default
            ``PERSIA_CHANNEL_SECURITY``, else ``"curve"``: :mod:`persia.rpc.security`).
    """

    def __init__(
        self,
        replica_index: int | None = None,
        replica_size: int | None = None,
        channel: str | None = None,
        consumers: int | None = None,
        bind_host: str | None = None,
        timeout_s: float = 600.0,
        linger_s: float = 5.0,
        security: str | None = None,
    ) -> None:
        self.size = replica_size if replica_size is not None else env.get_replica_size()
        self.index = replica_index if replica_index is not None else env.get_replica_index()
        if not 0 <= self.index < self.size:
            raise ConfigError(
                f"replica_index must be in [0, replica_size={self.size}), got {self.index}"
            )
        self.channel = channel or _settings.stream_channel() or "default"
        self.consumers = (
            consumers
            if consumers is not None
            else _env_count(_settings.PERSIA_STREAM_CONSUMERS, 1, 1)
        )
        self.timeout_s = timeout_s
        self.linger_s = linger_s
        _connect_ray()
        import ray

        if bind_host is None:
            joined = _settings.ray_address()
            bind_host = ray.util.get_node_ip_address() if joined else "127.0.0.1"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._security = secure_server(
            self._ctx, self._sock, security or _settings.channel_security()
        )
        port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        self.endpoint = f"tcp://{bind_host}:{port}"
        self._seen: set[bytes] = set()
        self._ended: set[bytes] = set()
        self.sent = 0
        info_cls: Any = ray.remote(_LoaderInfo)
        self._actor: Any = info_cls.options(
            name=stream_actor_name(self.channel, self.index),
            namespace=stream_namespace(),
            num_cpus=0,
            max_restarts=0,
        ).remote(self._security.access(self.endpoint), self.index, self.size)
        ray.get(self._actor.get.remote(), timeout=60)

    def _next_request(self, timeout_s: float) -> bytes | None:
        """The identity of the next NN worker asking for a batch (None after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._sock.poll(_POLL_MS):
                frames = self._sock.recv_multipart(copy=True)
                ident = frames[0]
                self._seen.add(ident)
                return ident
        return None

    def send(self, batch: PersiaBatch) -> None:
        """Hands ``batch`` to the next NN worker that asks for one (waits up to ``timeout_s``)."""
        if not isinstance(batch, PersiaBatch):
            raise BackendError(
                f"send_data expects a PersiaBatch, got {type(batch).__name__}", DATA_LOADER
            )
        arrays = batch.to_arrays()
        names = list(arrays)
        frames = encode({"op": "batch", "names": names}, [arrays[n] for n in names])
        rec = telemetry.current()
        t0 = time.perf_counter() if rec.on else 0.0
        ident = self._next_request(self.timeout_s)
        if rec.on:  # the wait for an NN worker to ask
            rec.loader_batch(batch.batch_size, time.perf_counter() - t0)
        if ident is None:
            raise BackendError(
                f"no NN worker asked for a batch within {self.timeout_s:g} s",
                DATA_LOADER,
                self.index,
            )
        self._sock.send_multipart([ident, *frames], copy=False)
        self.sent += 1

    def close(self) -> None:
        """Answers ``end`` to every NN worker (see the module doc), then leaves."""
        if self._sock.closed:
            return
        try:
            end = encode({"op": "end", "sent": self.sent}, [])
            last = time.monotonic()
            while not (len(self._ended) >= self.consumers and self._ended >= self._seen):
                ident = self._next_request(0.2)
                if ident is None:
                    if time.monotonic() - last > self.linger_s:
                        break
                    continue
                last = time.monotonic()
                self._sock.send_multipart([ident, *end])
                self._ended.add(ident)
        finally:
            self._sock.close()
            self._security.stop()
            self._ctx.term()
            try:
                import ray

                ray.kill(self._actor)
            except Exception:  # noqa: BLE001 - the cluster may be gone
                pass


def _find_loaders(channel: str, timeout_s: float) -> list[ChannelAccess | str]:
    """The endpoints of every loader of ``channel`` (waits for them up to ``timeout_s``)."""
    import ray

    deadline = time.monotonic() + timeout_s
    endpoints: dict[int, ChannelAccess | str] = {}
    size = None
    index = 0
    while size is None or len(endpoints) < size:
        try:
            actor = ray.get_actor(stream_actor_name(channel, index), namespace=stream_namespace())
            info: Any = ray.get(actor.get.remote(), timeout=timeout_s)
            endpoints[index] = info["endpoint"]
            size = int(info["size"])
            index = next((i for i in range(size) if i not in endpoints), size)
            continue
        except ValueError:
            pass
        except Exception as exc:  # noqa: BLE001 - the loader left before answering
            raise BackendError(f"loader vanished: {exc}", DATA_LOADER, index) from exc
        if time.monotonic() > deadline:
            raise BackendError(
                f"no data loader {stream_actor_name(channel, index)!r} within {timeout_s:g} s",
                DATA_LOADER,
                index,
            )
        time.sleep(0.1)
    return [endpoints[i] for i in range(len(endpoints))]


def receive_batches(channel: str | None = None, timeout_s: float = 600.0, stop: Any = None) -> Any:
    """Yields the batches of every loader of ``channel`` until each has sent ``end``.

    Raises:
        BackendError: no loader appears, or none sends anything, within ``timeout_s``.
        BatchError: a received batch fails :meth:`PersiaBatch.from_arrays`' checks.
    """
    channel = channel or _settings.stream_channel() or "default"
    _connect_ray()
    endpoints = _find_loaders(channel, timeout_s)
    ctx = zmq.Context()
    socks = []
    try:
        poller = zmq.Poller()
        for ep in endpoints:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(secure_client(s, ep))
            s.send(b"next")
            poller.register(s, zmq.POLLIN)
            socks.append(s)
        live = len(socks)
        last = time.monotonic()
        while live:
            if stop is not None and stop.is_set():
                return
            events = dict(poller.poll(_POLL_MS))
            if not events:
                if time.monotonic() - last > timeout_s:
                    raise BackendError(f"no batch within {timeout_s:g} s", DATA_LOADER)
                continue
            last = time.monotonic()
            for rank, s in enumerate(socks):
                if s not in events:
                    continue
                head, values = decode(s.recv_multipart(copy=False))
                if head.get("op") == "end":
                    poller.unregister(s)
                    live -= 1
                    continue
                names = head.get("names")
                if not isinstance(names, list) or len(names) != len(values):
                    raise BackendError("malformed batch message", DATA_LOADER, rank)
                batch = PersiaBatch.from_arrays(dict(zip(names, values, strict=True)))
                s.send(b"next")
                yield batch
    finally:
        for s in socks:
            s.close()
        ctx.term()


def stream_of(cluster: ClusterConfig) -> Callable[[], Any]:
    """The batches of the data-loader stream ``cluster.data_channel``, as a factory."""
    return functools.partial(
        receive_batches, cluster.data_channel, timeout_s=cluster.resolved_timeout_s()
    )
