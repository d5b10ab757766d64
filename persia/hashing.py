"""THE hash from raw feature values to uint64 IDs, used alike by examples, readers and serving.

This hash is a file format: IDs written by one version must be the IDs computed by the next, so the
algorithm below never changes (``tests/test_hashing.py`` pins its test vectors). It is not
Python's ``hash()``, which is salted per process.

Algorithm (all arithmetic modulo 2**64):

* ``mix64(x)``: splitmix64's output for state ``x`` (Vigna's splitmix64.c)::

      z = x + 0x9E3779B97F4A7C15
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
      z = (z ^ (z >> 27)) * 0x94D049BB133111EB
      return z ^ (z >> 31)

* strings and bytes (``hash_strings``): 64-bit FNV-1a over the value's bytes (a ``str`` is hashed
  as its UTF-8 encoding, so ``"a"`` and ``b"a"`` give the same ID), started from the FNV offset
  basis XOR the salt, then ``mix64``::

      h = 0xCBF29CE484222325 ^ salt
      for byte in value:
          h = (h ^ byte) * 0x100000001B3
      return mix64(h)

* integers (``hash_ints``): ``mix64((v mod 2**64) ^ salt)`` for ``v`` in ``[-2**63, 2**64)``;
  a negative int64 is taken as its two's complement (so -1 and 2**64 - 1 give the same ID).

Test vectors (salt 0 unless shown)::

    hash_ints([0])             == [0xE220A8397B1DCDAF]   # splitmix64's first output, seed 0
    hash_ints([1])             == [0x910A2DEC89025CC1]
    hash_ints([-1])            == [0xE4D971771B652C20]
    hash_ints([0x9E3779B97F4A7C15]) == [0x6E789E6AA1B965F4]  # splitmix64's second output
    hash_strings([""])         == [0xC3817C016BA4FF30]   # mix64(0xCBF29CE484222325)
    hash_strings(["a"])        == [0x5F29C2AADD9B8527]   # mix64(FNV-1a("a") = 0xAF63DC4C8601EC8C)
    hash_strings(["foobar"])   == [0x5DF295413403DE4F]   # FNV-1a("foobar") = 0x85944171F73967E8
    hash_strings(["héllo"])    == [0x4019771FFD0488F9]   # UTF-8 bytes 68 C3 A9 6C 6C 6F
    hash_strings(["a"], salt=1) == [0x17A6B6692246BD10]

Missing values: ``None`` (or a null of a pyarrow array) raises :class:`~persia.errors.BatchError`
unless ``missing=`` gives a sentinel, which is then hashed in its place (a string for
``hash_strings``, an int for ``hash_ints``). Values of another type (a float, a bool, a str among
the ints) raise BatchError naming the position and the type.

Accepted inputs: ``hash_strings`` takes a sequence of str / bytes (None allowed as above), numpy
arrays of dtype ``U``, ``S`` or ``object``, and pyarrow string / binary arrays (plain, large, view,
chunked); pyarrow arrays are hashed straight from their UTF-8 buffer and offsets in a numba kernel.
``hash_ints`` takes a sequence of int, numpy integer arrays and pyarrow integer arrays.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from persia.errors import BatchError, ConfigError

__all__ = [
    "hash_strings",
    "hash_ints",
    "hash_value",
    "mix64_py",
    "FNV_OFFSET",
    "FNV_PRIME",
    "MISSING_TOKEN",
]

#: The token hashed in place of a missing ID value under the job file's ``missing.ids: token``:
#: by the job's readers when training and by serving's request recipe (one definition, so that
#: training and serving give a missing value the same ID).
MISSING_TOKEN = "<missing>"

MASK64 = (1 << 64) - 1
#: 64-bit FNV-1a offset basis and prime.
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_FNV_PRIME_U = np.uint64(FNV_PRIME)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, inline="always")
def _mix64(x):  # type: ignore[no-untyped-def]
    z = x + _GAMMA
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@njit(nogil=True, cache=True)
def _hash_bytes_kernel(data, offsets, start, basis, out):  # type: ignore[no-untyped-def]
    """out[i] = mix64(FNV-1a of data[offsets[start + i]:offsets[start + i + 1]] from ``basis``)."""
    for i in range(out.shape[0]):
        h = basis
        for p in range(offsets[start + i], offsets[start + i + 1]):
            h = (h ^ np.uint64(data[p])) * _FNV_PRIME_U
        out[i] = _mix64(h)
    return out.shape[0]


@njit(nogil=True, cache=True)
def _hash_fixed_bytes_kernel(data, basis, out):  # type: ignore[no-untyped-def]
    """Like ``_hash_bytes_kernel`` for an (n, width) uint8 matrix of NUL-padded values (numpy's
    ``S`` dtype): row i's value is its bytes up to its last non-NUL byte."""
    width = data.shape[1]
    for i in range(data.shape[0]):
        end = width
        while end > 0 and data[i, end - 1] == 0:
            end -= 1
        h = basis
        for p in range(end):
            h = (h ^ np.uint64(data[i, p])) * _FNV_PRIME_U
        out[i] = _mix64(h)
    return data.shape[0]


@njit(nogil=True, cache=True)
def _hash_u64_kernel(values, salt, out):  # type: ignore[no-untyped-def]
    """out[i] = mix64(values[i] ^ salt)."""
    for i in range(values.shape[0]):
        out[i] = _mix64(values[i] ^ salt)
    return values.shape[0]


# ---------------------------------------------------------------------------------------------
# Pure-Python reference of the finaliser (for one value; documentation and checks)
# ---------------------------------------------------------------------------------------------


def mix64_py(x: int) -> int:
    """splitmix64's output for state ``x`` (a Python int in [0, 2**64)), in plain Python."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _salt(salt: int) -> int:
    if isinstance(salt, bool) or not isinstance(salt, int | np.integer):
        raise ConfigError(f"salt must be an int, got {type(salt).__name__}")
    if not 0 <= int(salt) <= MASK64:
        raise ConfigError(f"salt must be in [0, 2**64), got {salt}")
    return int(salt)


def _arrow_binary_chunks(arr: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    """The chunks of a string/binary arrow array as large_binary or binary arrays."""
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    out = []
    for c in chunks:
        t = c.type
        if pa.types.is_string(t) or pa.types.is_binary(t):
            out.append(c)
        elif pa.types.is_large_string(t) or pa.types.is_large_binary(t):
            out.append(c)
        elif pa.types.is_string_view(t) or pa.types.is_binary_view(t):
            out.append(c.cast(pa.large_binary()))
        else:
            raise BatchError(f"values must be a string or binary arrow array, got type {t}")
    return out


def _hash_arrow(
    arr: pa.Array | pa.ChunkedArray, salt: int, missing: str | bytes | None
) -> np.ndarray:
    chunks = _arrow_binary_chunks(arr)
    total = sum(len(c) for c in chunks)
    out = np.empty(total, dtype=np.uint64)
    basis = np.uint64(FNV_OFFSET ^ salt)
    pos = 0
    for c in chunks:
        n = len(c)
        if n == 0:
            continue
        wide = pa.types.is_large_string(c.type) or pa.types.is_large_binary(c.type)
        _, off_buf, data_buf = c.buffers()
        offsets = np.frombuffer(off_buf, dtype=np.int64 if wide else np.int32)
        data = (
            np.frombuffer(data_buf, dtype=np.uint8)
            if data_buf is not None
            else np.zeros(0, np.uint8)
        )
        _hash_bytes_kernel(data, offsets, c.offset, basis, out[pos : pos + n])
        if c.null_count:
            nulls = c.is_null().to_numpy(zero_copy_only=False)
            if missing is None:
                first = int(np.flatnonzero(nulls)[0]) + pos
                raise BatchError(
                    f"values[{first}] is missing (None/null); pass missing=<sentinel string> "
                    "to hash missing values as that string"
                )
            out[pos : pos + n][nulls] = np.uint64(_hash_one_bytes(_as_bytes(missing), salt))
        pos += n
    return out


def _as_bytes(v: str | bytes) -> bytes:
    if isinstance(v, str):
        try:
            return v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BatchError(f"string {v!r} cannot be encoded as UTF-8: {e.reason}") from None
    return bytes(v)


def _hash_one_bytes(b: bytes, salt: int) -> int:
    out = np.empty(1, dtype=np.uint64)
    data = np.frombuffer(b, dtype=np.uint8) if b else np.zeros(0, np.uint8)
    _hash_bytes_kernel(data, np.array([0, len(b)], np.int64), 0, np.uint64(FNV_OFFSET ^ salt), out)
    return int(out[0])


def _python_strings_to_arrow(values: Iterable[Any], missing: str | bytes | None) -> pa.Array:
    """A large_binary arrow array of str/bytes values, with an error naming any bad value."""
    values = values if isinstance(values, list | tuple | np.ndarray) else list(values)
    try:
        return pa.array(values, type=pa.large_binary(), from_pandas=False)
    except (pa.ArrowException, TypeError, ValueError, UnicodeEncodeError):
        pass
    # Slow path only to say exactly what is wrong.
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, str):
            _as_bytes(v)
        elif not isinstance(v, bytes | bytearray | memoryview):
            raise BatchError(f"values[{i}] must be str or bytes, got {type(v).__name__}: {v!r}")
    raise BatchError("values could not be converted to bytes")  # pragma: no cover


def hash_strings(values: Any, *, salt: int = 0, missing: str | bytes | None = None) -> np.ndarray:
    """IDs of string / bytes values: ``mix64(FNV-1a-64(utf8(value)) from basis ^ salt)``.

    Args:
        values: a sequence of str / bytes, a numpy ``U`` / ``S`` / ``object`` array, or a pyarrow
            string or binary array (chunked allowed).
        salt: an int in [0, 2**64) that selects an independent hash function; 0 by default.
        missing: the sentinel hashed in place of None / null values; None makes them an error.

    Returns:
        uint64 IDs, one per value.

    Raises:
        BatchError: a missing value without ``missing``, a value that is not str / bytes, a str
            that cannot be encoded as UTF-8.
        ConfigError: a bad ``salt``.
    """
    salt = _salt(salt)
    if missing is not None and not isinstance(missing, str | bytes):
        raise BatchError(f"missing must be str, bytes or None, got {type(missing).__name__}")
    if isinstance(values, str | bytes):
        raise BatchError("values must be a sequence of strings, got one str/bytes; use hash_value")
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return _hash_arrow(values, salt, missing)
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise BatchError(f"values must be 1-D, got shape {values.shape}")
        if values.dtype.kind == "S":
            out = np.empty(values.shape[0], dtype=np.uint64)
            width = values.dtype.itemsize
            if values.shape[0] and width:
                raw = np.ascontiguousarray(values).view(np.uint8).reshape(-1, width)
                _hash_fixed_bytes_kernel(raw, np.uint64(FNV_OFFSET ^ salt), out)
            elif values.shape[0]:
                out[:] = np.uint64(_hash_one_bytes(b"", salt))
            return out
        if values.dtype.kind == "U":
            return _hash_arrow(pa.array(values, type=pa.large_string()), salt, missing)
        if values.dtype.kind == "O" or values.dtype.kind == "T":
            return _hash_arrow(_python_strings_to_arrow(values.tolist(), missing), salt, missing)
        raise BatchError(f"values must hold strings or bytes, got a numpy array of {values.dtype}")
    return _hash_arrow(_python_strings_to_arrow(values, missing), salt, missing)


def _ints_python(values: list[Any], missing: int | None) -> np.ndarray:
    """Python ints (None allowed if ``missing``) to their uint64 two's complement images."""
    out = np.empty(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        if v is None:
            if missing is None:
                raise BatchError(
                    f"values[{i}] is missing (None/null); pass missing=<sentinel int> "
                    "to hash missing values as that int"
                )
            v = missing
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
            raise BatchError(f"values[{i}] must be an int, got {type(v).__name__}: {v!r}")
        v = int(v)
        if not -(1 << 63) <= v <= MASK64:
            raise BatchError(f"values[{i}] must be in [-2**63, 2**64), got {v}")
        out[i] = v & MASK64
    return out


def _ints_numpy(values: np.ndarray) -> np.ndarray:
    if values.ndim != 1:
        raise BatchError(f"values must be 1-D, got shape {values.shape}")
    if values.dtype == np.uint64:
        return values
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False).view(np.uint64)
    raise BatchError(f"values must have an integer dtype, got {values.dtype}")


def hash_ints(values: Any, *, salt: int = 0, missing: int | None = None) -> np.ndarray:
    """IDs of integer values: ``mix64((v mod 2**64) ^ salt)``.

    Args:
        values: a sequence of int, a numpy integer array, or a pyarrow integer array.
        salt: an int in [0, 2**64); 0 by default.
        missing: the int hashed in place of None / null values; None makes them an error.

    Returns:
        uint64 IDs, one per value.

    Raises:
        BatchError: a missing value without ``missing``, a non-integer value (bool and float
            included), an int outside [-2**63, 2**64).
        ConfigError: a bad ``salt``.
    """
    salt = _salt(salt)
    if missing is not None and (isinstance(missing, bool) or not isinstance(missing, int)):
        raise BatchError(f"missing must be an int or None, got {type(missing).__name__}")
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if not pa.types.is_integer(values.type):
            raise BatchError(f"values must be an integer arrow array, got type {values.type}")
        if values.null_count:
            if missing is None:
                first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
                raise BatchError(
                    f"values[{first}] is missing (None/null); pass missing=<sentinel int> "
                    "to hash missing values as that int"
                )
            values = values.fill_null(missing)
        u = _ints_numpy(values.to_numpy(zero_copy_only=False))
    elif isinstance(values, np.ndarray):
        u = (
            _ints_numpy(values)
            if values.dtype.kind != "O"
            else _ints_python(values.tolist(), missing)
        )
    else:
        if isinstance(values, str | bytes):
            raise BatchError("values must be a sequence of ints, got str/bytes")
        seq = values if isinstance(values, list | tuple) else list(values)
        arr = np.asarray(seq) if seq else np.zeros(0, np.int64)
        # numpy turns [True, 2] into int64: look for bools (and everything else) value by value
        has_bool = any(isinstance(v, bool | np.bool_) for v in seq)
        if arr.ndim == 1 and arr.dtype.kind in "iu" and not has_bool:
            u = _ints_numpy(arr)
        else:
            u = _ints_python(list(seq), missing)
    u = np.ascontiguousarray(u)
    out = np.empty(u.shape[0], dtype=np.uint64)
    _hash_u64_kernel(u, np.uint64(salt), out)
    return out


def hash_value(value: str | bytes | int, *, salt: int = 0) -> int:
    """The ID of one value: a str / bytes by :func:`hash_strings`, an int by :func:`hash_ints`.

    Raises:
        BatchError: None, a bool, a float or any other type.
    """
    if isinstance(value, str | bytes | bytearray | memoryview):
        return int(
            hash_strings([_as_bytes(value) if isinstance(value, str) else bytes(value)], salt=salt)[
                0
            ]
        )
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return int(hash_ints([int(value)], salt=salt)[0])
    raise BatchError(f"value must be str, bytes or int, got {type(value).__name__}: {value!r}")


# ---------------------------------------------------------------------------------------------
# Whole ID columns (pyarrow): the one place training readers and serving turn raw values into IDs
# ---------------------------------------------------------------------------------------------


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def hash_column(arr: pa.Array, kind: str, what: str) -> np.ndarray:
    """IDs of one pyarrow column without nulls: ``hash_ints`` when ``kind`` is "int" (values
    cast to int64), else ``hash_strings`` (non-text values cast to strings first).

    Raises:
        BatchError: "int" requested but a value is not an int (the message starts with ``what``).
    """
    t = arr.type
    if kind == "int":
        if not pa.types.is_integer(t):
            try:
                arr = pc.cast(arr, pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise BatchError(f"{what}: type int, but a value is not an int ({exc})") from None
        return hash_ints(arr)
    if not (_is_text(t) or pa.types.is_binary(t)):
        arr = pc.cast(arr, pa.string())
    return hash_strings(arr)


def ids_from_column(
    arr: pa.Array,
    *,
    kind: str,
    separator: str | None,
    clean: Any,
    token_id: int | None,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(IDs ``u64[total]``, lengths ``i64[n]``) of one ID column, columnar.

    Args:
        arr: the column (strings, ints, lists of either, or strings holding several values).
        kind: "string" or "int" (see :func:`hash_column`).
        separator: split string values on it (multi-valued IDs); None: one value per row.
        clean: ``pa.Array -> pa.Array`` applied to the values (trimming, missing markers to null).
        token_id: the ID a missing value becomes (one per empty row); None: missing values are
            dropped, so a row may have no IDs.
        what: how errors name the column.
    """
    n = len(arr)
    if pa.types.is_null(arr.type):
        arr = arr.cast(pa.string())
    arr = clean(arr)
    if separator is not None and _is_text(arr.type):
        arr = pc.split_pattern(arr, separator)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        flat = clean(pc.list_flatten(arr))
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        keep = flat.is_valid()
        if _is_text(flat.type):
            keep = pc.fill_null(pc.and_(keep, pc.not_equal(flat, "")), False)
        keep_np = keep.to_numpy(zero_copy_only=False)
        values = hash_column(flat.filter(keep), kind, what)
        lengths = np.bincount(parents[keep_np], minlength=n).astype(np.int64)
        if token_id is not None:
            empty = np.flatnonzero(lengths == 0)
            if empty.size:  # each empty row gets the single ID of the missing token
                lengths[empty] = 1
                pos = np.cumsum(lengths) - 1  # the single slot of each filled row
                full = np.empty(int(lengths.sum()), dtype=np.uint64)
                mask = np.ones(full.shape[0], dtype=bool)
                mask[pos[empty]] = False
                full[mask] = values
                full[pos[empty]] = token_id
                values = full
        return values, lengths
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    hashed = hash_column(arr.drop_null(), kind, what)
    if token_id is not None:
        values = np.full(n, token_id, dtype=np.uint64)
        values[valid] = hashed
        return values, np.ones(n, dtype=np.int64)
    return hashed, valid.astype(np.int64)
