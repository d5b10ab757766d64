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


class ParameterServerClient:
    """Batched calls to the parameter-server shards, addressed by shard index.

    Args:
        transport: reaches ``parameter-server`` replicas 0..N-1, each a
            :class:`persia.rpc.protocol.ShardProtocol` (a :class:`persia.store.Shard`, or an
            actor wrapping one).
        shard_of: the store's key -> shard function (``persia.store.shard_of``), so that the
            worker routes keys exactly as the store would.
    """

    def __init__(self, transport: Transport, shard_of: Any) -> None:
        self.transport = transport
        self.num_shards = transport.replicas(PARAMETER_SERVER)
        if self.num_shards <= 0:
            raise BackendError("no parameter-server shard is reachable", role=PARAMETER_SERVER)
        self._shard_of = shard_of

    def shard_of(self, keys: np.ndarray) -> np.ndarray:
        """Shard index (int32) of every key."""
        return self._shard_of(keys, self.num_shards)

    def lookup(self, shard: int, keys: np.ndarray, dim: int, training: bool) -> np.ndarray:
        """Rows (float32, ``(len(keys), dim)``) of ``keys`` on one shard."""
        return self.transport.call(PARAMETER_SERVER, shard, "lookup", keys, dim, training)

    def apply_gradients(self, shard: int, keys: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Applies one gradient per key on one shard; returns the shard's counts."""
        return self.transport.call(PARAMETER_SERVER, shard, "apply_gradients", keys, grads)

    def each(self, method: str, *args: Any) -> list[Any]:
        """Calls ``method(*args)`` on every shard, in shard order."""
        return [
            self.transport.call(PARAMETER_SERVER, i, method, *args) for i in range(self.num_shards)
        ]
