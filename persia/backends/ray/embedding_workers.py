"""Embedding workers as Ray actors (``ClusterConfig(num_embedding_workers=M)``).

Each :class:`EmbeddingWorkerActor` runs the ordinary
:class:`persia.worker.embedding_worker.EmbeddingWorker` (prefix, de-duplication, routing,
pooling, gradient aggregation) over its own :class:`persia.rpc.base.ParameterServerClient` to the
job's parameter-server actors, and serves it on a ZeroMQ ROUTER socket (the wire format of
:mod:`persia.rpc.zmq_transport`: numeric arrays plus a JSON header, no pickle).

In the NN worker, :class:`RemoteEmbeddingWorker` has the two methods the training runtime uses
(``forward(batch, training) -> lookup``, ``backward(lookup, summed_grad, raw_grads) -> counts``):
forward sends the batch's ID features (name, values, lengths per feature) to one worker, round
robin by batch, under a batch id; the worker keeps the batch's backward context (uniques,
inverse, shard routing) under that id and returns the pooled arrays; backward sends the
gradients and the batch id to the same worker, which applies them and drops the context. A
context whose gradients never come (a discarded batch) is dropped after ``context_ttl_s``.
The staleness gate, lookup thread and applier thread stay in the NN worker
(:class:`persia.runtime.pipeline.Runtime`, unchanged).

Messages:

* ``forward``: ``[batch_id, training, batch_size, n_features, (name, values, lengths) * n]``
  -> ``[summed, layout int64 (n, 3), raw feature indices int64, raw arrays..., dropped_ids]``;
  layout rows are ``(0, column, dim)`` for a summed slot and ``(1, feature_index, dim)`` for
  a raw one.
* ``backward``: ``[batch_id, summed_grad or None, raw feature indices int64, raw grads...]``
  -> ``[counts int64[3]]``.
* ``forward_wire`` / ``backward_wire`` (``ClusterConfig(wire_compression="f16")``): the same
  with the codec's name first, and ``summed`` / ``summed_grad`` as one coded message of
  :mod:`persia.rpc.wire` (float16 with a per-sample scale; raw slots stay float32, their mask
  channel exact). The actor's own calls to the parameter servers are coded alike.

A dead or silent worker actor raises :class:`BackendError` naming ``embedding-worker`` and its
rank, within ``timeout_s``.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from persia.backends.ray.backend import ClusterConfig, _bind_host, _liveness, get_with_timeout
from persia.backends.ray.naming import ew_actor_name, namespace
from persia.errors import BackendError, BatchError, ConfigError
from persia.rpc.base import ParameterServerClient
from persia.rpc.security import ChannelAccess, secure_server
from persia.rpc.wire import decode_rows, encode_rows
from persia.rpc.zmq_transport import ZmqTransport, serve_requests
from persia.worker.embedding_worker import EmbeddingWorker, SlotSpec

__all__ = [
    "EMBEDDING_WORKER",
    "EmbeddingWorkerActor",
    "RemoteEmbeddingWorker",
    "RemoteLookup",
    "attach_embedding_workers",
    "start_embedding_workers",
]

EMBEDDING_WORKER = "embedding-worker"
_KINDS = {"sum": 0, "raw": 1}


@dataclass
class _Feature:
    name: str
    values: np.ndarray
    lengths: np.ndarray


@dataclass
class _IdBatch:
    """The part of a :class:`PersiaBatch` the embedding worker reads."""

    batch_size: int
    id_type_features: list[_Feature]


@dataclass
class RemoteLookup:
    """A remote worker's forward result (the fields :class:`persia.ctx.TrainCtx` reads, as in
    :class:`persia.worker.embedding_worker.Lookup`) plus where its backward must go.

    Attributes:
        batch_size: samples in the batch.
        summed: float32 ``(batch, total_summed_dim)``.
        raw: per raw slot (by feature index), float32 ``(batch, sample_fixed_size, dim + 1)``.
        layout: per ID feature, ("sum", column, dim) or ("raw", feature_index, dim).
        training: whether gradients are expected.
        rank: the embedding-worker actor holding the backward context.
        batch_id: the context's key there.
        dropped_ids: IDs beyond ``sample_fixed_size`` of raw slots.
    """

    batch_size: int
    summed: np.ndarray
    raw: dict[int, np.ndarray]
    layout: list[tuple[str, int, int]]
    training: bool
    rank: int
    batch_id: int
    dropped_ids: int = 0


# ----------------------------------------------------------------------------- the actor
class EmbeddingWorkerActor:
    """One embedding worker as a Ray actor (created through :func:`start_embedding_workers`).

    Args:
        rank: this worker's index.
        slots: the configured slots.
        prefix_bits: ``feature_index_prefix_bit``.
        ps_actors: the parameter-server actors, by rank.
        cluster: transport and timeout of the parameter-server calls.
        bind_host: where this worker's ZeroMQ socket binds (``"node"``: the node's Ray address).
        context_ttl_s: how long a training batch's backward context waits for its gradients.
        metrics: where to push this actor's metrics (None: metrics off here).
    """

    def __init__(
        self,
        rank: int,
        slots: Sequence[SlotSpec],
        prefix_bits: int,
        ps_actors: list[Any],
        cluster: ClusterConfig,
        bind_host: str,
        context_ttl_s: float,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        from persia._settings import ensure_numba_cache_dir

        ensure_numba_cache_dir()
        if metrics is not None:
            from persia import telemetry

            telemetry.configure(telemetry.EW, rank, push=metrics)
        from persia.backends.ray.backend import parameter_server_client

        self.rank = rank
        self.client: ParameterServerClient = parameter_server_client(
            ps_actors, cluster, cluster.resolved_timeout_s()
        )
        self.worker = EmbeddingWorker(list(slots), prefix_bits, self.client)
        self.context_ttl_s = float(context_ttl_s)
        self._contexts: dict[int, tuple[Any, float]] = {}
        self.expired = 0
        self.forwarded = 0
        self.backwarded = 0
        if bind_host == "node":
            import ray

            bind_host = ray.util.get_node_ip_address()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._security = secure_server(self._ctx, self._sock, cluster.channel_security)
        port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        self._endpoint = f"tcp://{bind_host}:{port}"
        self._access = self._security.access(self._endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="persia-ew-server", daemon=True)
        self._thread.start()

    def endpoint(self) -> str:
        """The ZeroMQ address (``tcp://host:port``)."""
        return self._endpoint

    def access(self) -> ChannelAccess:
        """What a client of the job needs (address and, with CURVE, keys; only as this
        call's reply over Ray)."""
        return self._access

    def flush_metrics(self) -> bool | None:
        """Pushes this actor's metrics now (None: it does not push)."""
        from persia import telemetry

        return telemetry.push_now()

    def ping(self) -> int:
        return self.rank

    def stats(self) -> dict[str, int]:
        """Batches looked up and applied, held backward contexts, contexts dropped unused,
        non-finite gradient rows."""
        return {
            "forward_batches": self.forwarded,
            "backward_batches": self.backwarded,
            "contexts": len(self._contexts),
            "expired": self.expired,
            "nonfinite_gradients": int(self.worker.nonfinite_gradients),
        }

    def _serve(self) -> None:
        serve_requests(self._sock, self._stop, self._handle)

    def _handle(self, method: str, args: list[Any]) -> list[Any]:
        if method == "forward":
            return self._forward(args)
        if method == "backward":
            return self._backward(args)
        if method in ("forward_wire", "backward_wire"):
            codec, args = args[0], args[1:]
            if codec != "f16":
                raise ConfigError(
                    f"wire codec {codec!r} is not served here (this worker knows f16)"
                )
            if method == "forward_wire":
                values = self._forward(args)
                return [encode_rows(values[0]), *values[1:]]
            entry = self._contexts.get(int(args[0]))
            if entry is not None and args[1] is not None:
                shape = entry[0].summed.shape
                args = [args[0], decode_rows(args[1], shape[0], shape[1]), *args[2:]]
            return self._backward(args)
        raise BackendError(f"method {method!r} is not served by an embedding worker")

    def _expire(self, now: float) -> None:
        old = [k for k, (_, t) in self._contexts.items() if now - t > self.context_ttl_s]
        for k in old:
            del self._contexts[k]
        self.expired += len(old)

    def _forward(self, args: list[Any]) -> list[Any]:
        batch_id, training, n, k = int(args[0]), bool(args[1]), int(args[2]), int(args[3])
        feats = [_Feature(str(args[4 + 3 * i]), args[5 + 3 * i], args[6 + 3 * i]) for i in range(k)]
        lookup = self.worker.forward(_IdBatch(n, feats), training)  # type: ignore[arg-type]
        self.forwarded += 1
        now = time.monotonic()
        self._expire(now)
        if training:
            self._contexts[batch_id] = (lookup, now)
        layout = np.array(
            [(_KINDS[kind], where, dim) for kind, where, dim in lookup.layout], dtype=np.int64
        ).reshape(-1, 3)
        fis = sorted(lookup.raw)
        return [
            lookup.summed,
            layout,
            np.array(fis, dtype=np.int64),
            *(lookup.raw[i] for i in fis),
            int(lookup.dropped_ids),
        ]

    def _backward(self, args: list[Any]) -> list[Any]:
        batch_id = int(args[0])
        entry = self._contexts.pop(batch_id, None)
        if entry is None:
            raise BackendError(
                f"no backward context for batch {batch_id} (expired after "
                f"{self.context_ttl_s:g} s, or never looked up for training)",
                EMBEDDING_WORKER,
                self.rank,
            )
        fis = [int(i) for i in args[2]]
        raw_grads = {fi: np.asarray(g) for fi, g in zip(fis, args[3:], strict=True)}
        counts = self.worker.backward(entry[0], args[1], raw_grads)
        self.backwarded += 1
        return [np.asarray(counts, dtype=np.int64)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._security.stop()
        self._ctx.term()
        self.client.transport.close()
        from persia import telemetry

        telemetry.shutdown()  # the last push


def start_embedding_workers(
    n: int,
    slots: Sequence[SlotSpec],
    prefix_bits: int,
    ps_actors: list[Any],
    cluster: ClusterConfig,
    job: str,
) -> list[Any]:
    """Starts ``n`` embedding-worker actors named ``persia-<job>-ew-<rank>`` and waits until
    each answers (or :class:`BackendError`)."""
    import ray

    options: dict[str, Any] = {
        "num_cpus": cluster.ew_num_cpus,
        "max_restarts": 0,
        "max_concurrency": 2,
    }
    if cluster.ew_resources:
        options["resources"] = dict(cluster.ew_resources)
    timeout = cluster.resolved_timeout_s()
    actor_cls = ray.remote(EmbeddingWorkerActor)
    bind = _bind_host(cluster)
    from persia import telemetry

    metrics = telemetry.settings()  # each actor pushes its own, where this process does
    actors: list[Any] = [
        actor_cls.options(name=ew_actor_name(job, r), namespace=namespace(), **options).remote(
            r, list(slots), prefix_bits, ps_actors, cluster, bind, max(2 * timeout, 60.0), metrics
        )
        for r in range(n)
    ]
    try:
        for r, a in enumerate(actors):
            get_with_timeout(a.ping.remote(), timeout, EMBEDDING_WORKER, r)
    except BaseException:
        stop_embedding_workers(actors)
        raise
    return actors


def attach_embedding_workers(job: str, n: int, timeout_s: float) -> list[Any]:
    """The running embedding-worker actors of ``job`` (waits up to ``timeout_s`` for each)."""
    import ray

    actors: list[Any] = []
    deadline = time.monotonic() + timeout_s
    for r in range(n):
        name = ew_actor_name(job, r)
        while True:
            try:
                actors.append(ray.get_actor(name, namespace=namespace()))
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"no actor named {name!r} within {timeout_s:g} s", EMBEDDING_WORKER, r
                    ) from None
                time.sleep(0.2)
        get_with_timeout(actors[-1].ping.remote(), timeout_s, EMBEDDING_WORKER, r)
    return actors


def stop_embedding_workers(actors: list[Any]) -> None:
    """Kills the actors (already dead ones are skipped), after their last metrics push."""
    import ray

    from persia.backends.ray.backend import flush_actor_metrics

    flush_actor_metrics(actors, EMBEDDING_WORKER)
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already gone
            pass


# ------------------------------------------------------------------- the NN-worker proxy
class RemoteEmbeddingWorker:
    """The NN worker's stand-in for :class:`EmbeddingWorker`: batches go to the actors (an
    :class:`persia.worker.protocol.EmbeddingWorkerProtocol`).

    Args:
        actors: the embedding-worker actors, by rank.
        servers: this process's client of the parameter servers (kept for the store-level
            paths that use ``worker.servers``; not used per batch).
        timeout_s: the longest one call may take.
        owned: :meth:`close` stops the actors.
    """

    def __init__(
        self, actors: list[Any], servers: ParameterServerClient, timeout_s: float, owned: bool
    ) -> None:
        if not actors:
            raise BackendError("no embedding-worker actors", EMBEDDING_WORKER)
        self.actors = list(actors)
        self.servers = servers
        self.timeout_s = float(timeout_s)
        self._owned = owned
        endpoints: list[ChannelAccess | str] = [
            get_with_timeout(a.access.remote(), self.timeout_s, EMBEDDING_WORKER, r)
            for r, a in enumerate(self.actors)
        ]
        # requests go over the transport's DEALER client (one socket per thread and actor,
        # late replies skipped, a dead actor found while a reply is late)
        self._channel = ZmqTransport(
            {EMBEDDING_WORKER: endpoints},
            self.timeout_s,
            liveness=_liveness({EMBEDDING_WORKER: self.actors}),
        )
        self._closed = False
        self._ids = itertools.count(1)
        # unique among every NN worker sharing these actors
        self._token = secrets.randbits(30) << 32
        self._next = 0
        self.nonfinite_gradients = 0  # counted by the actors; see their stats()
        self.wire = servers.wire  # the pooled embeddings and their gradients, coded alike

    def _call(self, rank: int, method: str, args: list[Any]) -> list[Any]:
        return self._channel.call_values(EMBEDDING_WORKER, rank, method, args)

    # --------------------------------------------------------- EmbeddingWorker API
    def forward(self, batch: Any, training: bool) -> RemoteLookup:
        """Looks up and pools ``batch``'s ID features on the next worker (round robin)."""
        rank = self._next
        self._next = (self._next + 1) % len(self.actors)
        batch_id = self._token | (next(self._ids) & 0xFFFFFFFF)
        feats = batch.id_type_features
        args: list[Any] = [batch_id, bool(training), int(batch.batch_size), len(feats)]
        for f in feats:
            args += [str(f.name), np.asarray(f.values), np.asarray(f.lengths)]
        if self.wire == "none":
            values = self._call(rank, "forward", args)
        else:
            values = self._call(rank, "forward_wire", [self.wire, *args])
        summed, layout_arr, fis = values[0], values[1], values[2]
        raw = {int(fi): np.array(a) for fi, a in zip(fis, values[3:-1], strict=True)}
        kinds = ("sum", "raw")
        layout = [(kinds[int(k)], int(w), int(d)) for k, w, d in layout_arr]
        if self.wire == "none":
            summed = np.array(summed)  # a writable copy of the message frame (torch.from_numpy)
        else:
            width = sum(d for kind, _, d in layout if kind == "sum")
            try:
                summed = decode_rows(summed, int(batch.batch_size), width)
            except BackendError as exc:
                raise BackendError(f"forward reply: {exc}", EMBEDDING_WORKER, rank) from None
        return RemoteLookup(
            int(batch.batch_size),
            summed,
            raw,
            layout,
            bool(training),
            rank,
            batch_id,
            int(values[-1]),
        )

    def backward(
        self, lookup: Any, summed_grad: np.ndarray | None, raw_grads: dict[int, np.ndarray]
    ) -> np.ndarray:
        """Sends one batch's gradients to the worker holding its context; the counts
        ``[applied, skipped_absent, skipped_nonfinite]`` come back."""
        fis = sorted(raw_grads)
        grad = None if summed_grad is None else np.ascontiguousarray(summed_grad, np.float32)
        if grad is not None and self.wire != "none":
            if grad.shape != lookup.summed.shape:
                raise BatchError(
                    f"summed_grad must have shape {lookup.summed.shape}, got {grad.shape}"
                )
            grad = encode_rows(grad)
        args: list[Any] = [
            int(lookup.batch_id),
            grad,
            np.array(fis, dtype=np.int64),
            *(np.ascontiguousarray(raw_grads[i], dtype=np.float32) for i in fis),
        ]
        if self.wire == "none":
            values = self._call(int(lookup.rank), "backward", args)
        else:
            values = self._call(int(lookup.rank), "backward_wire", [self.wire, *args])
        return np.asarray(values[0], dtype=np.int64)

    def stats(self) -> list[dict[str, int]]:
        """Each actor's :meth:`EmbeddingWorkerActor.stats`."""
        refs = [a.stats.remote() for a in self.actors]
        return [
            get_with_timeout(r, self.timeout_s, EMBEDDING_WORKER, i) for i, r in enumerate(refs)
        ]

    def push_metrics(self) -> None:
        """Has the actors push their metrics now (:func:`flush_actor_metrics`)."""
        from persia.backends.ray.backend import flush_actor_metrics

        if not self._closed:
            flush_actor_metrics(self.actors, EMBEDDING_WORKER)

    def close(self) -> None:
        """Closes the channel and stops the actors this proxy started (once)."""
        if self._closed:
            return
        self._closed = True
        self._channel.close()
        if self._owned:
            self._owned = False
            stop_embedding_workers(self.actors)
