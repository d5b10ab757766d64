"""Checkpoint files: generations of numpy arrays behind an atomically switched pointer.

A checkpoint directory holds one or more *generations*; a small pointer file names the current one::

    directory/
      CURRENT                    "gen-000007\\n": the current generation (replaced atomically)
      .lock                      empty; writers hold an exclusive flock on it while writing
      gen-000006/                the previous generation (kept: see ``keep``)
      gen-000007/
        embeddings.npy           one file per array, numpy's .npy format (header + raw C-order data)
        state.npy
        manifest.json            written last: describes and checksums every array file
      .tmp-gen-000008-4242/      a generation being written by process 4242 (or left by a crash)

``manifest.json`` (format version 1)::

    {"format_version": 1, "kind": "shard", "generation": 7, "created_unix_s": 1700000000.0,
     "meta": {...},                              # the caller's JSON-serialisable dict
     "arrays": {"embeddings": {"file": "embeddings.npy", "dtype": "<f4", "shape": [1000, 16],
                               "bytes": 64128, "crc32": 123456789}, ...}}

``bytes`` is the size of the whole ``.npy`` file and ``crc32`` the zlib CRC-32 of all its bytes
(header included), so a file can be checked with standard tools alone.

**Writing** (:func:`write_generation`, one writer per directory at a time, enforced by an exclusive
``flock`` on ``.lock``): temporary folders left by crashed writers are removed; the arrays and then the
manifest are written into ``.tmp-gen-NNNNNN-<pid>/``, each file fsynced; the folder is fsynced and
renamed to ``gen-NNNNNN`` (NNNNNN = one more than any generation present); the directory is fsynced;
``CURRENT.tmp`` is written, fsynced and renamed over ``CURRENT`` (``os.replace``, atomic on POSIX); the
directory is fsynced again. Only then are generations beyond ``keep`` old ones removed (each first
renamed to a ``.tmp-`` name, so a crash mid-removal never leaves a half-deleted folder under a real
name). A process killed at any moment therefore leaves ``CURRENT`` naming a complete generation (or
no ``CURRENT`` at all, before the first generation completed); a generation folder under a real
name is always complete.

**Reading** (:func:`read_current`, :func:`read_generation`) verifies everything and raises
:class:`~persia.errors.CheckpointError` naming the path, what was expected and what was found:
missing directory or pointer, a pointer to a missing generation, a missing or malformed manifest, a
kind or format version other than expected, and array files missing, truncated, of another dtype or
shape than the manifest says, or failing their CRC-32. The data is read straight into the result
array in chunks, each checksummed while still in cache (one pass over the file, no extra copy).

Arrays are stored C-contiguous; names must be safe file names (letters, digits, ``_``, ``-``, ``.``;
not starting with ``.``); object and structured (void) dtypes are refused, as numpy's format would
need pickle for them. ``meta`` round-trips through JSON: tuples come back as lists, and NaN or
infinity are refused (they are not JSON).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from persia.errors import CheckpointError

try:  # POSIX only; elsewhere writers are not serialised (documented: one writer per directory)
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "write_generation",
    "read_current",
    "read_generation",
    "list_generations",
    "current_generation",
    "current_kind",
    "current_meta",
]

#: Version of the on-disk layout described in the module docstring. Bump it when a change would
#: make an older reader misread a new checkpoint; readers refuse versions newer than theirs.
FORMAT_VERSION = 1

POINTER_NAME = "CURRENT"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"

_CHUNK_BYTES = 4 << 20  # I/O and checksum unit
_BACKGROUND_CRC_BYTES = 16 << 20  # from this file size on, checksum on a thread, overlapping I/O
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
_MAX_NAME_LEN = 200
_ALLOWED_KINDS = "biufcSUmM"  # bool, ints, floats, complex, bytes, str, datetimes: no pickle needed
_POINTER_RETRIES = 3


# --------------------------------------------------------------------------------------------------
# small helpers


def _gen_name(number: int) -> str:
    return f"gen-{number:06d}"


def _gen_number(path: Path) -> int:
    match = _GEN_RE.match(path.name)
    if match is None:  # callers pass only folders list_generations found
        raise CheckpointError(f"{path} is not a generation folder")
    return int(match.group(1))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def _npy_header(arr: np.ndarray) -> bytes:
    """The .npy header numpy's ``np.save`` would write for ``arr`` (C order)."""
    header = np.lib.format.header_data_from_array_1_0(arr)
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:  # header over 64 KiB (absurdly many dims): numpy uses version 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def _byte_view(arr: np.ndarray) -> memoryview:
    """The C-contiguous array's memory as a flat byte memoryview (no copy)."""
    return arr.reshape(-1).view(np.uint8).data


class _RunningCrc:
    """CRC-32 of a byte stream fed in order, chunk by chunk.

    For large streams the checksum runs on one background thread (``zlib.crc32`` releases the GIL),
    overlapping the file I/O of the next chunk; chunks are processed in the order they were added.
    Callers must not modify a chunk after adding it, and must call :meth:`close` (also on error).
    """

    def __init__(self, total_bytes: int) -> None:
        self._crc = 0
        self._pool = ThreadPoolExecutor(1) if total_bytes >= _BACKGROUND_CRC_BYTES else None

    def _update(self, chunk: bytes | memoryview) -> None:
        self._crc = zlib.crc32(chunk, self._crc)

    def add(self, chunk: bytes | memoryview) -> None:
        if self._pool is None:
            self._update(chunk)
        else:
            self._pool.submit(self._update, chunk)

    def close(self) -> int:
        """Wait for the pending chunks and return the checksum."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return self._crc


@contextlib.contextmanager
def _writer_lock(directory: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock (also released by the OS if the process dies)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > _MAX_NAME_LEN or not _NAME_RE.match(name):
        raise CheckpointError(
            f"array name must be a safe file name (letters, digits, '_', '-', '.', not starting "
            f"with '.', at most {_MAX_NAME_LEN} characters), got {name!r}"
        )
    return name


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise CheckpointError(f"arrays must be a dict of name -> np.ndarray, got {type(arrays)}")
    seen: dict[str, str] = {}
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        _check_name(name)
        folded = name.lower()  # case-insensitive file systems would merge "A" and "a"
        if folded in seen:
            raise CheckpointError(
                f"array names {seen[folded]!r} and {name!r} differ only in case; "
                "they would collide on case-insensitive file systems"
            )
        seen[folded] = name
        if not isinstance(arr, np.ndarray):
            raise CheckpointError(f"array {name!r} must be an np.ndarray, got {type(arr)}")
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise CheckpointError(
                f"array {name!r}: dtype {arr.dtype} is refused (object and structured arrays "
                "would need pickle); use a plain numeric, bool, bytes or str dtype"
            )
        # no copy when already C-contiguous (np.ascontiguousarray would turn 0-d into 1-d)
        out[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    return out


def _check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"meta must be a dict, got {type(meta)}")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise CheckpointError(f"meta keys must be str, got {key!r} ({type(key).__name__})")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"meta[{key!r}] is not JSON-serialisable: {exc}") from None
    return dict(meta)


def _read_pointer(directory: Path) -> str:
    """The generation name in CURRENT (validated), or CheckpointError."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    pointer = directory / POINTER_NAME
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"{pointer} is missing: {directory} holds no completed checkpoint generation"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {pointer}: {exc}") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not _GEN_RE.match(text):
        raise CheckpointError(
            f"{pointer} is malformed: expected a generation name like 'gen-000007', got {raw[:80]!r}"
        )
    return text


# --------------------------------------------------------------------------------------------------
# public API


def list_generations(directory: str | os.PathLike[str]) -> list[Path]:
    """The generation folders in ``directory``, oldest first (by generation number).

    Only folders under a real name (``gen-NNNNNN``) are listed: by construction those are complete,
    though not necessarily verified. Temporary folders are not listed. A missing directory has none.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _GEN_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def current_generation(directory: str | os.PathLike[str]) -> Path:
    """The folder the pointer file names (not verified; it may be missing).

    Raises:
        CheckpointError: no such directory, or ``CURRENT`` is missing or malformed.
    """
    root = Path(directory)
    return root / _read_pointer(root)


def current_kind(directory: str | os.PathLike[str]) -> str:
    """The kind of the generation ``CURRENT`` names (its manifest is read and checked; its arrays
    are not).

    Raises:
        CheckpointError: no directory, pointer or manifest, or a malformed one.
    """
    return str(_read_manifest(current_generation(directory))["kind"])


def current_meta(directory: str | os.PathLike[str], *, kind: str) -> tuple[Path, dict[str, Any]]:
    """The folder and manifest meta of the generation ``CURRENT`` names, its arrays neither read
    nor verified (a cheap look at what a checkpoint is).

    Raises:
        CheckpointError: as :func:`current_kind`, or another kind.
    """
    gen = current_generation(directory)
    manifest = _read_manifest(gen)
    if manifest["kind"] != kind:
        raise CheckpointError(
            f"{gen / MANIFEST_NAME}: expected a checkpoint of kind {kind!r}, "
            f"found kind {manifest['kind']!r}"
        )
    return gen, manifest["meta"]


def write_generation(
    directory: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    kind: str,
    keep: int = 2,
) -> Path:
    """Write a new generation beside the existing ones and switch ``CURRENT`` to it atomically.

    Args:
        directory: the checkpoint directory; created (with parents) if missing.
        arrays: name -> array; names must be safe file names; object/structured dtypes are refused.
            C-contiguous arrays are written without a copy; others are copied to C order first.
        meta: JSON-serialisable dict stored in the manifest (returned as is by the readers, after
            a JSON round trip).
        kind: what this checkpoint is (e.g. ``"shard"``); readers must ask for the same kind.
        keep: how many old generations to keep beside the new current one (0 = only the new one).

    Returns:
        The new generation's folder (``directory/gen-NNNNNN``).

    Raises:
        CheckpointError: bad names, dtypes, meta or kind (nothing is written then).
        OSError: the file system failed (disk full, ...); the previous generation stays current.
    """
    if not isinstance(kind, str) or not kind:
        raise CheckpointError(f"kind must be a non-empty str, got {kind!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise CheckpointError(f"keep must be an int >= 0, got {keep!r}")
    arrays = _check_arrays(arrays)
    meta = _check_meta(meta)

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    with _writer_lock(root):
        _remove_temporaries(root)
        existing = list_generations(root)
        number = _gen_number(existing[-1]) + 1 if existing else 1
        name = _gen_name(number)
        tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
        tmp.mkdir()
        try:
            entries = {}
            for array_name, arr in arrays.items():
                entries[array_name] = _write_array(tmp / f"{array_name}.npy", arr)
            manifest = {
                "format_version": FORMAT_VERSION,
                "kind": kind,
                "generation": number,
                "created_unix_s": time.time(),
                "meta": meta,
                "arrays": entries,
            }
            fd = os.open(tmp / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, json.dumps(manifest, indent=1, allow_nan=False).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(tmp)
        except BaseException:  # an error, not a crash: remove the partial folder right away
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        final = root / name
        os.rename(tmp, final)
        _fsync_dir(root)
        _switch_pointer(root, name)

        old = [p for p in list_generations(root) if p.name != name]
        for path in old[: max(0, len(old) - keep)]:
            _remove_tree(root, path)
    return final


def read_current(
    directory: str | os.PathLike[str], *, kind: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and verify the generation ``CURRENT`` names.

    If a concurrent writer switches the pointer and removes the generation while it is being read,
    the read is retried on the new generation (a few times).

    Args:
        directory: the checkpoint directory.
        kind: the kind the generation must have been written with.

    Returns:
        ``(arrays, meta)``: fresh, writable C-contiguous arrays, and the manifest's meta.

    Raises:
        CheckpointError: anything missing, truncated, tampered with, or of another kind/format.
    """
    root = Path(directory)
    name = _read_pointer(root)
    for attempt in range(_POINTER_RETRIES + 1):
        try:
            return read_generation(root / name, kind=kind)
        except CheckpointError:
            if attempt == _POINTER_RETRIES:
                raise
            try:
                now = _read_pointer(root)
            except CheckpointError:
                now = name
            if now == name:  # the pointer did not move: the failure is real
                raise
            name = now
    raise AssertionError("unreachable")  # pragma: no cover


def read_generation(
    path: str | os.PathLike[str], *, kind: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and verify one generation folder (e.g. an older one from :func:`list_generations`).

    Raises:
        CheckpointError: as :func:`read_current`.
    """
    gen = Path(path)
    if not gen.is_dir():
        raise CheckpointError(f"checkpoint generation {gen} does not exist")
    manifest = _read_manifest(gen)
    if manifest["kind"] != kind:
        raise CheckpointError(
            f"{gen / MANIFEST_NAME}: expected a checkpoint of kind {kind!r}, "
            f"found kind {manifest['kind']!r}"
        )
    arrays = {name: _read_array(gen, name, entry) for name, entry in manifest["arrays"].items()}
    return arrays, manifest["meta"]


# --------------------------------------------------------------------------------------------------
# writing


def _write_array(path: Path, arr: np.ndarray) -> dict[str, Any]:
    """Write ``arr`` in numpy's .npy format (what np.save writes) and return its manifest entry.

    Data goes out in chunks straight from the array's memory (no copy); large arrays are
    checksummed on a background thread while the file is written and fsynced.
    """
    header = _npy_header(arr)
    data = _byte_view(arr)
    crc = _RunningCrc(len(data))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, header)
        crc.add(header)
        for start in range(0, len(data), _CHUNK_BYTES):
            chunk = data[start : start + _CHUNK_BYTES]
            _write_all(fd, chunk)
            crc.add(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
        checksum = crc.close()
    return {
        "file": path.name,
        "dtype": arr.dtype.str,
        "shape": list(arr.shape),
        "bytes": len(header) + len(data),
        "crc32": checksum,
    }


def _switch_pointer(root: Path, name: str) -> None:
    tmp = root / (POINTER_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, (name + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, root / POINTER_NAME)
    _fsync_dir(root)


def _remove_tree(root: Path, path: Path) -> None:
    """Remove a generation: rename it to a temporary name first, so it vanishes atomically."""
    doomed = root / f"{TMP_PREFIX}old-{path.name}-{os.getpid()}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_temporaries(root: Path) -> None:
    """Remove what crashed writers left (called with the writer lock held, so none is live)."""
    for entry in root.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    (root / (POINTER_NAME + ".tmp")).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# reading


def _read_manifest(gen: Path) -> dict[str, Any]:
    path = gen / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing: {gen} is not a complete checkpoint generation"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(manifest).__name__}")

    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path}: expected an integer format_version, found {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this persia reads "
            f"({FORMAT_VERSION}); upgrade persia to load it"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unknown format_version {version} (this persia reads {FORMAT_VERSION})"
        )
    for field, typ in (("kind", str), ("meta", dict), ("arrays", dict)):
        if not isinstance(manifest.get(field), typ):
            raise CheckpointError(
                f"{path}: expected field {field!r} of type {typ.__name__}, "
                f"found {manifest.get(field)!r:.80}"
            )
    number = manifest.get("generation")
    match = _GEN_RE.match(gen.name)
    if match and number != int(match.group(1)):
        raise CheckpointError(
            f"{path}: manifest says generation {number!r}, but the folder is {gen.name}"
        )
    for name, entry in manifest["arrays"].items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CheckpointError(f"{path}: unsafe array name {name!r}")
        ok = (
            isinstance(entry, dict)
            and entry.get("file") == f"{name}.npy"
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"]
            )
            and all(
                isinstance(entry.get(f), int) and not isinstance(entry.get(f), bool)
                for f in ("bytes", "crc32")
            )
        )
        if not ok:
            raise CheckpointError(
                f"{path}: malformed entry for array {name!r}: expected "
                f"{{'file': '{name}.npy', 'dtype': str, 'shape': [int, ...], 'bytes': int, "
                f"'crc32': int}}, found {entry!r:.200}"
            )
    return manifest


def _read_array(gen: Path, name: str, entry: dict[str, Any]) -> np.ndarray:
    path = gen / entry["file"]
    try:
        want_dtype = np.dtype(entry["dtype"])
    except (TypeError, ValueError, SyntaxError):
        raise CheckpointError(
            f"{gen / MANIFEST_NAME}: array {name!r} has an unknown dtype {entry['dtype']!r}"
        ) from None
    want_shape = tuple(entry["shape"])
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (listed in the manifest)") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "too long"
            raise CheckpointError(
                f"{path} is {what}: the manifest says {entry['bytes']} bytes, found {size}"
            )
        try:
            major, minor = np.lib.format.read_magic(f)
            if (major, minor) == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif (major, minor) == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {major}.{minor}")
        except Exception as exc:  # numpy parses the header with literal_eval: anything goes
            raise CheckpointError(f"{path}: not a valid .npy file: {exc}") from None
        if dtype != want_dtype or tuple(shape) != want_shape or fortran:
            raise CheckpointError(
                f"{path}: the manifest says dtype {want_dtype.str} shape {list(want_shape)}, "
                f"the file holds dtype {dtype.str} shape {list(shape)}"
                + (" in Fortran order" if fortran else "")
            )
        header_len = f.tell()
        out = np.empty(want_shape, dtype=want_dtype)
        data = _byte_view(out)
        if header_len + len(data) != size:
            raise CheckpointError(
                f"{path}: header ({header_len} bytes) plus data ({len(data)} bytes) do not "
                f"add up to the file size {size}"
            )
        f.seek(0)
        crc = _RunningCrc(len(data))
        try:
            crc.add(f.read(header_len))
            for start in range(0, len(data), _CHUNK_BYTES):
                chunk = data[start : start + _CHUNK_BYTES]
                got = 0
                while got < len(chunk):
                    n = f.readinto(chunk[got:])
                    if not n:
                        raise CheckpointError(f"{path} was truncated while being read")
                    got += n
                crc.add(chunk)
        finally:
            checksum = crc.close()
    if checksum != entry["crc32"]:
        raise CheckpointError(
            f"{path}: crc32 mismatch (the manifest says {entry['crc32']}, the file gives {checksum}): "
            "the file is corrupt or was modified"
        )
    return out
