"""The two interfaces a backend implements.

* :class:`Transport` moves one request to one role replica and brings its reply back. Requests
  are a method name plus plain arguments (numpy arrays, ints, floats, strings); the in-process
  implementation is a direct method call, a network implementation serialises the arrays without
  pickle (raw buffers plus a small header).
* :class:`ParameterServerClient` is what the embedding worker needs from the parameter servers:
  batched calls, one per shard per batch, addressed by shard index. It is written once, on top of
  a :class:`Transport`, so every backend gets the same routing and error handling.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from persia.errors import BackendError
from persia.rpc.wire import check_codec, decode_rows, encode_rows

PARAMETER_SERVER = "parameter-server"


class Transport(abc.ABC):
    """Sends ``method(*args)`` to replica ``rank`` of ``role`` and returns the reply."""

    @abc.abstractmethod
    def call(self, role: str, rank: int, method: str, *args: Any) -> Any:
        """Runs one request; raises :class:`BackendError` naming role and rank on failure."""

    @abc.abstractmethod
    def replicas(self, role: str) -> int:
        """How many replicas of ``role`` this transport reaches."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections; the default has none."""

    def local_target(self, role: str, rank: int) -> Any | None:
        """The replica itself when it is an object in this process that a caller may use
        directly (for calls beyond the protocol, such as row hints); None by default, and for
        any transport that does more than a method call (a network, a simulated link)."""
        return None


class ParameterServerClient:
    """Batched calls to the parameter-server shards, addressed by shard index.

    Args:
        transport: reaches ``parameter-server`` replicas 0..N-1, each a
            :class:`persia.rpc.protocol.ShardProtocol` (a :class:`persia.store.Shard`, or an
            actor wrapping one).
        shard_of: the store's key -> shard function (``persia.store.shard_of``), so that the
            worker routes keys exactly as the store would.
        wire: ``"none"`` (float32 rows and gradients, the default) or ``"f16"``: rows and
            gradients cross the transport as float16 with a per-row scale
            (:mod:`persia.rpc.wire`); settable later through :attr:`wire`.
    """

    def __init__(self, transport: Transport, shard_of: Any, wire: str | None = None) -> None:
        self.transport = transport
        self.num_shards = transport.replicas(PARAMETER_SERVER)
        if self.num_shards <= 0:
            raise BackendError("no parameter-server shard is reachable", role=PARAMETER_SERVER)
        self._shard_of = shard_of
        self.wire = wire

    @property
    def wire(self) -> str:
        """The wire codec of the per-batch calls: ``"none"`` or ``"f16"``."""
        return self._wire

    @wire.setter
    def wire(self, codec: str | None) -> None:
        self._wire = check_codec(codec)

    def shard_of(self, keys: np.ndarray) -> np.ndarray:
        """Shard index (int32) of every key."""
        return self._shard_of(keys, self.num_shards)

    def lookup(self, shard: int, keys: np.ndarray, dim: int, training: bool) -> np.ndarray:
        """Rows (float32, ``(len(keys), dim)``) of ``keys`` on one shard."""
        if self._wire == "none":
            return self.transport.call(PARAMETER_SERVER, shard, "lookup", keys, dim, training)
        message = self.transport.call(
            PARAMETER_SERVER, shard, "lookup_wire", keys, dim, training, self._wire
        )
        try:
            return decode_rows(message, len(keys), dim)
        except BackendError as exc:
            raise BackendError(f"lookup reply: {exc}", PARAMETER_SERVER, shard) from None

    def apply_gradients(self, shard: int, keys: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Applies one gradient per key on one shard; returns the shard's counts."""
        if self._wire == "none":
            return self.transport.call(PARAMETER_SERVER, shard, "apply_gradients", keys, grads)
        grads = np.asarray(grads)
        dim = int(grads.shape[1]) if grads.ndim == 2 else -1
        if dim < 0 or grads.shape[0] != len(keys):
            raise BackendError(
                f"gradients of {len(keys)} keys must be 2-D with one row per key, "
                f"got shape {grads.shape}",
                PARAMETER_SERVER,
                shard,
            )
        message = encode_rows(grads)
        return self.transport.call(  # type: ignore[no-any-return]
            PARAMETER_SERVER, shard, "apply_gradients_wire", keys, message, dim, self._wire
        )

    def lookup_hinted(
        self, shard: int, keys: np.ndarray, dim: int, training: bool
    ) -> tuple[np.ndarray, Any]:
        """:meth:`lookup`, plus an opaque row hint for :meth:`apply_gradients_hinted` when the
        shard is in this process and can give one (else None): the rows the keys are in, so
        the gradients need not find them again."""
        target = self.transport.local_target(PARAMETER_SERVER, shard)
        if self._wire != "none":
            target = None  # the rows must cross the transport, coded
        if target is not None and training and hasattr(target, "lookup_hinted"):
            return target.lookup_hinted(keys, dim)  # type: ignore[no-any-return]
        return self.lookup(shard, keys, dim, training), None

    def apply_gradients_hinted(
        self, shard: int, keys: np.ndarray, grads: np.ndarray, hint: Any
    ) -> np.ndarray:
        """:meth:`apply_gradients` for the keys of a :meth:`lookup_hinted` whose hint is
        ``hint`` (None: a plain :meth:`apply_gradients`). Same result either way: the shard
        checks that the hint still holds and finds the rows again when it does not."""
        target = self.transport.local_target(PARAMETER_SERVER, shard)
        if self._wire != "none":
            target = None
        if hint is not None and target is not None and hasattr(target, "apply_gradients_hinted"):
            return target.apply_gradients_hinted(keys, grads, hint)  # type: ignore[no-any-return]
        return self.apply_gradients(shard, keys, grads)

    def each(self, method: str, *args: Any) -> list[Any]:
        """Calls ``method(*args)`` on every shard, in shard order."""
        return [
            self.transport.call(PARAMETER_SERVER, i, method, *args) for i in range(self.num_shards)
        ]
