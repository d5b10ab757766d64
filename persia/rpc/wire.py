"""Wire compression of the rows and gradients between embedding workers and parameter servers.

The PERSIA paper's trick: embeddings and gradients cross the network as float16 with a per-row
scale (a non-uniform mapping: each row is scaled so that its largest magnitude lands near the top
of float16's range, then cast; the scale travels beside it and the receiver decodes to float32).
Keys stay uint64 (they cannot be shrunk).

Codec ``"f16"``: a row ``x`` (float32, ``dim`` values) is sent as ``dim`` float16 codes plus one
int8 exponent ``e``; it decodes as ``codes * 2**e``. ``e`` is chosen per row so that the largest
finite magnitude ``m`` maps into ``[2**14, 2**15)`` (``e = frexp(m).exponent - 15``, clamped to
int8): a power-of-two scale, so scaling and unscaling are exact and the only rounding is the
float16 cast (round to nearest even). Hence, per element,

    ``|decoded - x| <= 2**-11 * |x| + 2**-25 * 2**e``

(the second term only matters for elements below ``m * 2**-28``, where float16 codes are
subnormal; magnitudes within ``2**-12`` of float32's largest finite value are rounded down, not
up, so that they stay finite: ``2**-10`` of error there). All-zero rows decode to zeros (signs kept); a row with a NaN or an infinity keeps
them where they were (its finite elements are coded as usual), so a non-finite gradient stays
non-finite and the shard still skips it; a finite row never decodes to a non-finite one. One
message holds ``n`` rows as one ``uint8`` array: the ``n * dim`` codes, then the ``n`` exponents
(``2 * dim + 1`` bytes per row instead of ``4 * dim``).

The same messages carry the pooled embeddings and their gradients between embedding-worker
actors and NN workers (:mod:`persia.backends.ray.embedding_workers`, one row per sample).

Who does what: :class:`persia.rpc.base.ParameterServerClient` (the embedding worker's side) with
``wire="f16"`` sends ``lookup_wire`` / ``apply_gradients_wire`` instead of ``lookup`` /
``apply_gradients``, each naming its codec, and encodes gradients / decodes rows with
:func:`encode_rows` / :func:`decode_rows`. The parameter server's side is :func:`serve`, used by
every server of the shard protocol (the in-process :class:`persia.rpc.local.LocalTransport`, the
ZeroMQ and Ray parameter-server actors). The server has no setting: each request says how it is
coded, so client and server cannot disagree silently; a server that does not serve these methods
fails the call with :class:`~persia.errors.BackendError` naming the method, and an unknown codec
or a message of the wrong size is refused with :class:`~persia.errors.ConfigError` /
:class:`~persia.errors.BackendError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from persia.errors import BackendError, ConfigError
from persia.rpc.kernels import F16_TABLE, decode_kernel, encode_kernel

__all__ = [
    "CODECS",
    "METHODS",
    "check_codec",
    "decode_rows",
    "encode_rows",
    "message_size",
    "serve",
]

#: Codecs a client may ask for ("none": plain float32, the default).
CODECS = ("none", "f16")

#: The compressed forms of the shard protocol's two per-batch calls, by plain name.
METHODS = {"lookup_wire": "lookup", "apply_gradients_wire": "apply_gradients"}

_TOP = 15  # the largest magnitude of a row maps into [2**(_TOP - 1), 2**_TOP)
_E_MIN, _E_MAX = -127, 127


def check_codec(codec: object, source: str = "wire_compression") -> str:
    """``codec`` as one of :data:`CODECS` (None: ``"none"``), or ConfigError naming ``source``."""
    if codec is None:
        return "none"
    if not isinstance(codec, str) or codec.strip().lower() not in CODECS:
        raise ConfigError(f"{source} must be one of {', '.join(CODECS)}, got {codec!r}")
    return codec.strip().lower()


def message_size(rows: int, dim: int) -> int:
    """Bytes of ``rows`` coded rows of ``dim`` values."""
    return rows * (2 * dim + 1)


def encode_rows(rows: np.ndarray) -> np.ndarray:
    """``f32[n, dim]`` -> one ``uint8[n * (2 * dim + 1)]`` message (module doc)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise BackendError(f"wire rows must be 2-D, got shape {rows.shape}")
    n, dim = rows.shape
    out = np.empty(message_size(n, dim), dtype=np.uint8)
    if n == 0:
        return out
    codes = out[: 2 * n * dim].view(np.uint16).reshape(n, dim)
    exps = out[2 * n * dim :].view(np.int8)
    encode_kernel(rows, codes, exps, _TOP, _E_MIN, _E_MAX)
    return out


def decode_rows(message: Any, rows: int, dim: int) -> np.ndarray:
    """The inverse of :func:`encode_rows`: ``f32[rows, dim]``; BackendError when ``message``
    is not ``rows`` coded rows of ``dim`` values."""
    if not isinstance(message, np.ndarray) or message.dtype != np.uint8 or message.ndim != 1:
        got = getattr(message, "dtype", type(message).__name__)
        raise BackendError(f"a wire message must be a 1-D uint8 array, got {got}")
    size = message_size(rows, dim)
    if message.shape[0] != size:
        raise BackendError(
            f"a wire message of {rows} rows of dim {dim} has {size} bytes, got {message.shape[0]}"
        )
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    message = np.ascontiguousarray(message)
    codes = message[: 2 * rows * dim].view(np.uint16).reshape(rows, dim)
    exps = message[2 * rows * dim :].view(np.int8)
    out = np.empty((rows, dim), dtype=np.float32)
    decode_kernel(codes, exps, F16_TABLE, out)
    return out


def serve(target: Any, method: str, args: list[Any] | tuple[Any, ...]) -> Any:
    """Runs a compressed call (:data:`METHODS`) on a shard ``target`` (the server's side).

    ``lookup_wire(keys, dim, training, codec)`` returns the rows as one message;
    ``apply_gradients_wire(keys, message, dim, codec)`` decodes the gradients and returns the
    shard's counts.
    """
    if method not in METHODS:
        raise BackendError(f"method {method!r} is not a wire method")
    if len(args) != 4:
        raise BackendError(f"{method} takes 4 arguments, got {len(args)}")
    codec = args[3]
    if codec != "f16":
        raise ConfigError(f"wire codec {codec!r} is not served here (this server knows f16)")
    if method == "lookup_wire":
        keys, dim, training, _ = args
        return encode_rows(target.lookup(keys, int(dim), bool(training)))
    keys, message, dim, _ = args
    keys = np.asarray(keys)
    grads = decode_rows(message, int(keys.shape[0]), int(dim))
    return target.apply_gradients(keys, grads)
