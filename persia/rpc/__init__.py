"""The RPC floor: how the embedding worker reaches the parameter-server shards, on any backend.

:mod:`persia.rpc.protocol` declares what a shard offers (``ShardProtocol``);
:mod:`persia.rpc.base` holds the two interfaces (``Transport``, ``ParameterServerClient``); the
transports are :mod:`persia.rpc.local` (in-process, the local backend),
:mod:`persia.rpc.zmq_transport` (zero-copy ZeroMQ, the cluster backend's default) and
:mod:`persia.rpc.simlink` (a simulated link, for benchmarks); :mod:`persia.rpc.wire` codes
rows and gradients as float16 with a per-row scale (opt-in). No Ray here: the Ray transport is
in :mod:`persia.backends.ray.backend`.
"""

from persia.rpc.base import ParameterServerClient, Transport
from persia.rpc.local import LocalTransport, local_parameter_servers
from persia.rpc.protocol import ShardProtocol

__all__ = [
    "ParameterServerClient",
    "Transport",
    "LocalTransport",
    "local_parameter_servers",
    "ShardProtocol",
]
