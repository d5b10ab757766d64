"""The embedded backend's transport: every role is an object in this process."""

from __future__ import annotations

from typing import Any

from persia.errors import BackendError
from persia.rpc.base import PARAMETER_SERVER, ParameterServerClient, Transport
from persia.rpc.wire import METHODS as WIRE_METHODS
from persia.rpc.wire import serve as serve_wire


class LocalTransport(Transport):
    """A direct method call on in-process role objects (the compressed calls of
    :mod:`persia.rpc.wire` are decoded and encoded here, as a server would).

    Args:
        roles: role name -> list of replica objects. The lists are used as given, not copied,
            so an owner that replaces its replicas in place (``ShardedStore.replace_rows``) is seen.
    """

    def __init__(self, roles: dict[str, list[Any]]) -> None:
        self._roles = dict(roles)

    def replicas(self, role: str) -> int:
        return len(self._roles.get(role, []))

    def call(self, role: str, rank: int, method: str, *args: Any) -> Any:
        try:
            target = self._roles[role][rank]
        except (KeyError, IndexError):
            raise BackendError(
                f"no such replica (have {self.replicas(role)})", role, rank
            ) from None
        if method in WIRE_METHODS:  # a compressed call: this process plays the server
            return serve_wire(target, method, args)
        return getattr(target, method)(*args)

    def local_target(self, role: str, rank: int) -> Any | None:
        """The replica object itself (it is in this process)."""
        replicas = self._roles.get(role, [])
        return replicas[rank] if 0 <= rank < len(replicas) else None


def local_parameter_servers(store: Any) -> ParameterServerClient:
    """A client over the shards of an in-process :class:`persia.store.ShardedStore`."""
    from persia.store import shard_of

    transport = LocalTransport({PARAMETER_SERVER: store.shards})
    return ParameterServerClient(transport, shard_of)
