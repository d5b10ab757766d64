"""Backends: where the roles run. ``local`` (every role in the user's process, the default) and,
later, ``ray``. Both sit behind the small interfaces in :mod:`persia.rpc.base`."""

from persia.rpc.base import ParameterServerClient, Transport
from persia.rpc.local import LocalTransport, local_parameter_servers

__all__ = ["ParameterServerClient", "Transport", "LocalTransport", "local_parameter_servers"]
