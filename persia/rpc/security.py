"""Who may use a ZeroMQ channel: CURVE keys per server and a ZAP handler admitting only the job.

Every persia socket that can be reached from outside its process (the parameter servers' data
channel, the embedding-worker actors, the data-loader stream) is a *server* that makes its own
:class:`ChannelKeys` when it starts: a CURVE key pair for itself and one for its clients. It
hands the clients their half as a :class:`ChannelAccess` (address, the server's public key, the
client key pair) through Ray's control plane, as the reply of an actor call; keys never go into
environment variables, command lines or logs (:class:`ChannelAccess`'s ``repr`` shows the
address only).

A ZAP handler runs in the server's ZeroMQ context before the socket binds, and admits exactly the
server's own client key: a peer that knows the address and the server's public key, but not the
client secret, fails the CURVE handshake or is denied by ZAP, so no request of it is ever read.
CURVE also encrypts every frame.

``security="null"`` (``PERSIA_CHANNEL_SECURITY=null``, ``--insecure-channels``) turns this off
for trusted networks: ZeroMQ's NULL mechanism, **unauthenticated and unencrypted**: anyone who
reaches the port can read every embedding row and push gradients.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import zmq

from persia.errors import ConfigError

__all__ = [
    "SECURITY_MODES",
    "ChannelAccess",
    "ChannelKeys",
    "check_security",
    "secure_client",
    "secure_server",
]

#: ``curve`` (default: authenticated and encrypted), ``null`` (neither: trusted networks only).
SECURITY_MODES = ("curve", "null")


def check_security(mode: str) -> str:
    """``mode`` if it is one of :data:`SECURITY_MODES`, else :class:`ConfigError`."""
    if mode not in SECURITY_MODES:
        raise ConfigError(f"channel security must be one of {SECURITY_MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class ChannelKeys:
    """One server's CURVE keys (Z85 text as bytes): its own pair and its clients' pair."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> ChannelKeys:
        """Fresh key pairs from libzmq's CSPRNG."""
        spub, ssec = zmq.curve_keypair()
        cpub, csec = zmq.curve_keypair()
        return cls(spub, ssec, cpub, csec)

    def __repr__(self) -> str:
        return "ChannelKeys(<secret>)"


@dataclass(frozen=True)
class ChannelAccess:
    """What a client needs to use one server: its address and, with CURVE, the keys.

    ``server_key`` None means the server speaks the NULL mechanism (no keys)."""

    address: str
    server_key: bytes | None = None
    client_public: bytes | None = None
    client_secret: bytes | None = None

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        mode = "curve" if self.server_key is not None else "null"
        return f"ChannelAccess({self.address!r}, {mode})"


class _JobKeys:
    """ZAP credentials provider: admits only the client key of this server's job."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key == self.allowed
        if not ok:
            self.denied += 1
        return ok


class ServerSecurity:
    """The security of one server socket: the ZAP thread and the keys (see :func:`secure_server`).

    Attributes:
        mode: ``"curve"`` or ``"null"``.
        denied: peers refused by ZAP so far (a wrong client key).
    """

    def __init__(self, mode: str, keys: ChannelKeys | None, auth: Any, provider: Any) -> None:
        self.mode, self.keys, self._auth, self._provider = mode, keys, auth, provider

    @property
    def denied(self) -> int:
        return 0 if self._provider is None else int(self._provider.denied)

    def access(self, address: str) -> ChannelAccess:
        """What a client of the job gets to use this server at ``address``."""
        if self.keys is None:
            return ChannelAccess(address)
        return ChannelAccess(
            address, self.keys.server_public, self.keys.client_public, self.keys.client_secret
        )

    def stop(self) -> None:
        """Stops the ZAP thread (call before terminating the context)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


_AUTH_LOCK = threading.Lock()
_DOMAIN = "persia"


def secure_server(
    ctx: zmq.Context, sock: zmq.Socket, mode: str, keys: ChannelKeys | None = None
) -> ServerSecurity:
    """Makes ``sock`` (not yet bound) a CURVE server admitting only ``keys``' client, with a ZAP
    handler in ``ctx`` (one server socket per context); ``mode="null"``: nothing, NULL.

    Raises:
        ConfigError: an unknown mode.
    """
    check_security(mode)
    if mode == "null":
        return ServerSecurity(mode, None, None, None)
    from zmq.auth.thread import ThreadAuthenticator

    keys = keys or ChannelKeys.generate()
    provider = _JobKeys(keys.client_public)
    with _AUTH_LOCK:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(domain=_DOMAIN, credentials_provider=provider)
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    # the handshake of a peer without the key must fail, never fall back to accepting it
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.zap_domain = _DOMAIN.encode()
    return ServerSecurity(mode, keys, auth, provider)


def secure_client(sock: zmq.Socket, access: ChannelAccess | str) -> str:
    """Sets ``sock``'s CURVE client keys from ``access`` (nothing for a NULL server) and returns
    the address to connect to."""
    if isinstance(access, str):
        return access
    if access.server_key is not None:
        if access.client_public is None or access.client_secret is None:
            raise ConfigError(f"no client keys for the CURVE server at {access.address}")
        sock.curve_serverkey = access.server_key
        sock.curve_publickey = access.client_public
        sock.curve_secretkey = access.client_secret
    return access.address
