"""The batch types of PERSIA's Python API: ID-type features, dense features, labels, PersiaBatch.

Ragged layout
-------------
Every ID-type feature (a *slot*) is stored columnar, whichever constructor built it. For a batch of
three samples whose slot ``"tags"`` holds ``[[7, 9], [], [4]]`` (the second sample is empty)::

    sample         0        1     2
                 ┌──────┐ ┌──┐ ┌───┐
    IDs          │ 7  9 │ │  │ │ 4 │
                 └──────┘ └──┘ └───┘
    values  = [7, 9, 4]          np.uint64, the IDs of all samples back to back
    lengths = [2, 0, 1]          np.int64, IDs per sample (0 = empty sample); len = batch_size
    offsets = [0, 2, 2, 3]       np.int64, len = batch_size + 1, computed on demand;
                                 sample i is values[offsets[i]:offsets[i + 1]]

``IDTypeFeature("tags", [np.array([7, 9], np.uint64), np.array([], np.uint64),
np.array([4], np.uint64)])`` (PERSIA's per-sample list) and
``IDTypeFeature.from_columnar("tags", np.array([7, 9, 4], np.uint64), np.array([2, 0, 1]))`` build
the same feature; readers and benchmarks use :meth:`IDTypeFeature.from_columnar`, which checks the
arrays in O(batch) vectorised work instead of one Python step per sample.

Checks
------
Constructors raise :class:`~persia.errors.BatchError` naming the feature, the field and the value
(never ``assert``). Cheap checks (types, dtypes, shapes, lengths, batch sizes) always run. The
deep check (no NaN or Inf in float dense features and labels) reads every value; it runs unless
``PERSIA_DEEP_CHECKS=0`` (see :func:`persia._settings.deep_checks_enabled`).

Transport
---------
:meth:`PersiaBatch.to_arrays` / :meth:`PersiaBatch.from_arrays` turn a batch into a flat
``dict[str, np.ndarray]`` and back: plain arrays plus a small JSON header stored as a uint8 array,
no pickle. The cluster transport sends that dict.

:meth:`PersiaBatch.to_bytes` / :meth:`PersiaBatch.from_bytes` put the same arrays in one byte
string, the request body of a serving handler (PERSIA's ``InferCtx.get_embedding_from_bytes``).
The format, version 1, all integers little-endian::

    offset  size  field
    0       8     magic b"PERSIAB" then the byte 0x01
    8       4     u32 format version (1)
    12      4     u32 H: header length in bytes (a multiple of 8)
    16      8     u64 P: payload length in bytes
    24      4     u32 CRC-32 (zlib) of header and payload
    28      4     u32 reserved, 0
    32      H     header: UTF-8 JSON, padded with spaces to a multiple of 8
    32 + H  P     payload: the arrays' bytes (C order, little-endian), each starting at a
                  multiple of 8 from the payload's start, zero padding between them

The header is :meth:`PersiaBatch.to_arrays`' JSON header plus ``"arrays"``: one
``{"key", "dtype", "shape", "offset"}`` entry per array, in payload order (``dtype`` one of
``|b1 |i1 <i2 <i4 <i8 |u1 <u8 <f4 <f8``; ``offset`` relative to the payload). The decoder checks
the magic, the version, every length against the bytes received (the message must end exactly
after the payload), the CRC, each array's dtype, shape, offset (in order, aligned, no overlap,
within the payload) and bool bytes (0 or 1), then that the header names exactly the arrays of its
slots, features, labels and meta; then every constructor check runs again. Anything wrong raises
:class:`~persia.errors.BatchError` naming it; nothing is read outside the bytes given. The CRC
makes every changed byte an error rather than a different batch.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from persia import _settings
from persia.errors import BatchError

__all__ = [
    "IDTypeFeature",
    "IDTypeFeatureWithSingleID",
    "NdarrayDataBase",
    "NonIDTypeFeature",
    "Label",
    "PersiaBatch",
]

#: dtypes of dense features and labels: those NumPy and PyTorch share (PERSIA's list).
SUPPORTED_DENSE_DTYPES = frozenset(
    np.dtype(t)
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float32, np.float64)
)
_ARRAYS_FORMAT = "persia-batch"
_ARRAYS_VERSION = 1
#: to_bytes / from_bytes: the magic, the format version and the fixed prefix (see the module
#: docstring).
BYTES_MAGIC = b"PERSIAB\x01"
BYTES_VERSION = 1
_PREFIX = struct.Struct("<8sIIQII")
_ALIGN = 8
_MAX_NDIM = 32
#: the dtypes the byte format carries, by their little-endian descriptor
_BYTES_DTYPES = {
    np.dtype(t).newbyteorder("<").str: np.dtype(t).newbyteorder("<")
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64)
    + (np.float32, np.float64)
}


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise BatchError(f"{what}: name must be a non-empty str, got {name!r}")
    return name


def _check_id_array(array: object, where: str) -> np.ndarray:
    """A 1-D np.uint64 array, or BatchError naming ``where``."""
    if not isinstance(array, np.ndarray):
        raise BatchError(
            f"{where}: expected a 1-D np.ndarray of np.uint64, got {_type_name(array)}"
        )
    if array.dtype != np.uint64:
        raise BatchError(f"{where}: IDs must be np.uint64, got dtype {array.dtype}")
    if array.ndim != 1:
        raise BatchError(f"{where}: IDs must be a 1-D array, got ndim {array.ndim} ({array.shape})")
    return array


class IDTypeFeature:
    """A slot: for each sample of the batch, a (possibly empty) list of uint64 IDs.

    Stored columnar (``values``, ``lengths``, ``offsets``; see the module docstring for the layout
    with a worked example).

    Example::

        feature = IDTypeFeature("tags", [np.array([7, 9], np.uint64),
                                         np.array([], np.uint64),
                                         np.array([4], np.uint64)])
        feature.values    # array([7, 9, 4], dtype=uint64)
        feature.lengths   # array([2, 0, 1])
        feature.offsets   # array([0, 2, 2, 3])

    Args:
        name: the slot name (a key of ``slots_config`` in embedding_config.yml).
        data: one 1-D ``np.uint64`` array per sample; empty arrays allowed.

    Raises:
        BatchError: ``data`` is not a list of 1-D uint64 arrays; the message names the sample.
    """

    __slots__ = ("_name", "_values", "_lengths", "_offsets", "_min_length")

    def __init__(self, name: str, data: Sequence[np.ndarray]) -> None:
        _check_name(name, "IDTypeFeature")
        if isinstance(data, np.ndarray) or not isinstance(data, (list, tuple)):
            raise BatchError(
                f"IDTypeFeature {name!r}: data must be a list of 1-D np.uint64 arrays, one per "
                f"sample, got {_type_name(data)} (use IDTypeFeatureWithSingleID or "
                "IDTypeFeature.from_columnar for flat arrays)"
            )
        for i, sample in enumerate(data):
            _check_id_array(sample, f"IDTypeFeature {name!r}: sample {i}")
        lengths = np.fromiter((s.shape[0] for s in data), dtype=np.int64, count=len(data))
        values = np.concatenate(data) if len(data) else np.empty(0, dtype=np.uint64)
        self._set(name, np.ascontiguousarray(values, dtype=np.uint64), lengths)

    def _set(
        self, name: str, values: np.ndarray, lengths: np.ndarray, min_length: int | None = None
    ) -> None:
        self._name = name
        self._values = values
        self._lengths = lengths
        self._offsets: np.ndarray | None = None
        self._min_length = min_length

    @classmethod
    def from_columnar(
        cls, name: str, values: np.ndarray, lengths: np.ndarray | Sequence[int]
    ) -> IDTypeFeature:
        """Builds a feature from flat IDs and per-sample counts, without per-sample objects.

        Args:
            name: the slot name.
            values: 1-D ``np.uint64``, the IDs of all samples back to back.
            lengths: 1-D integer array (any int dtype; stored as int64), IDs per sample;
                ``len(lengths)`` is the batch size, ``sum(lengths) == len(values)``.

        Returns:
            An :class:`IDTypeFeature` (arrays kept without copy when already contiguous and
            ``lengths`` is int64).

        Raises:
            BatchError: wrong dtype or shape, a negative length, or lengths that do not sum to
                ``len(values)``.
        """
        _check_name(name, "IDTypeFeature")
        values = _check_id_array(values, f"IDTypeFeature {name!r}: values")
        where = f"IDTypeFeature {name!r}: lengths"
        if not isinstance(lengths, np.ndarray):
            lengths = np.asarray(lengths)
            if lengths.size == 0:
                lengths = lengths.astype(np.int64)
        if lengths.dtype.kind not in "iu":
            raise BatchError(f"{where}: expected an integer array, got dtype {lengths.dtype}")
        if lengths.ndim != 1:
            raise BatchError(f"{where}: expected a 1-D array, got ndim {lengths.ndim}")
        if (
            lengths.dtype.kind == "u"
            and lengths.size
            and int(lengths.max()) > np.iinfo(np.int64).max
        ):
            raise BatchError(f"{where}: a length is too large, got {int(lengths.max())}")
        lengths64 = np.ascontiguousarray(lengths, dtype=np.int64)
        smallest = 0
        if lengths64.size:
            smallest = int(lengths64.min())
            if smallest < 0:
                i = int(np.argmax(lengths64 < 0))
                raise BatchError(f"{where}: must be >= 0, got {smallest} at sample {i}")
        total = int(lengths64.sum())
        if total != values.shape[0]:
            raise BatchError(
                f"{where}: must sum to len(values) = {values.shape[0]}, got sum {total}"
            )
        feature = IDTypeFeature.__new__(IDTypeFeature)
        feature._set(name, np.ascontiguousarray(values), lengths64, smallest)
        return feature

    @property
    def name(self) -> str:
        """The slot name."""
        return self._name

    @property
    def values(self) -> np.ndarray:
        """``np.uint64[total]``: the IDs of all samples, back to back."""
        return self._values

    @property
    def lengths(self) -> np.ndarray:
        """``np.int64[batch_size]``: the number of IDs of each sample."""
        return self._lengths

    @property
    def offsets(self) -> np.ndarray:
        """``np.int64[batch_size + 1]``: sample i is ``values[offsets[i]:offsets[i + 1]]``."""
        if self._offsets is None:
            offsets = np.zeros(self._lengths.shape[0] + 1, dtype=np.int64)
            np.cumsum(self._lengths, out=offsets[1:])
            self._offsets = offsets
        return self._offsets

    @property
    def batch_size(self) -> int:
        """The number of samples."""
        return int(self._lengths.shape[0])

    @property
    def min_length(self) -> int:
        """The fewest IDs of any sample (0 for an empty batch); 1 with ``len(values) ==
        batch_size`` means one ID per sample. Worked out once (the embedding worker asks it of
        every slot of every batch)."""
        if getattr(self, "_min_length", None) is None:
            self._min_length = int(self._lengths.min()) if self._lengths.size else 0
        return self._min_length  # type: ignore[return-value]

    @property
    def data(self) -> list[np.ndarray]:
        """PERSIA's per-sample view: one array (a view into ``values``) per sample."""
        return np.split(self._values, self.offsets[1:-1])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self._name!r}, batch_size={self.batch_size}, "
            f"num_ids={self._values.shape[0]})"
        )


class IDTypeFeatureWithSingleID(IDTypeFeature):
    """A slot with exactly one ID per sample (PERSIA's fast path): ``lengths`` is all ones.

    Args:
        name: the slot name.
        data: 1-D ``np.uint64``, one ID per sample. A sample without IDs needs
            :class:`IDTypeFeature` instead.

    Raises:
        BatchError: ``data`` is not a 1-D uint64 array.
    """

    __slots__ = ()

    def __init__(self, name: str, data: np.ndarray) -> None:  # noqa: D107
        _check_name(name, "IDTypeFeatureWithSingleID")
        values = _check_id_array(data, f"IDTypeFeatureWithSingleID {name!r}: data")
        n = values.shape[0]
        self._set(name, np.ascontiguousarray(values), np.ones(n, dtype=np.int64), min(n, 1))

    @property
    def data(self) -> np.ndarray:  # type: ignore[override]
        """The IDs, one per sample (PERSIA's attribute)."""
        return self._values


class NdarrayDataBase:
    """A dense array whose first axis is the batch: PERSIA's base of non-ID features and labels.

    Supported dtypes (PERSIA's, those NumPy and PyTorch share): bool, int8, int16, int32, int64,
    uint8, float32, float64; any ``ndim >= 1``.

    Args:
        data: the array, shape ``(batch_size, ...)``.
        name: optional name; defaults to the class's ``DEFAULT_NAME``.

    Raises:
        BatchError: not an ndarray, unsupported dtype, ndim 0, or (deep check) a NaN or Inf.
    """

    DEFAULT_NAME = "ndarray_base"

    def __init__(self, data: np.ndarray, name: str | None = None) -> None:
        kind = type(self).__name__
        if name is not None and (not isinstance(name, str) or not name):
            raise BatchError(f"{kind}: name must be a non-empty str or None, got {name!r}")
        where = f"{kind} {name or self.DEFAULT_NAME!r}"
        if not isinstance(data, np.ndarray):
            raise BatchError(f"{where}: data must be a np.ndarray, got {_type_name(data)}")
        if data.dtype not in SUPPORTED_DENSE_DTYPES:
            allowed = ", ".join(sorted(str(d) for d in SUPPORTED_DENSE_DTYPES))
            raise BatchError(f"{where}: dtype must be one of {allowed}; got {data.dtype}")
        if data.ndim < 1:
            raise BatchError(f"{where}: data must have ndim >= 1 (batch first), got ndim 0")
        if data.dtype.kind == "f" and _settings.deep_checks_enabled():
            finite = np.isfinite(data)
            if not finite.all():
                bad = int(finite.size - np.count_nonzero(finite))
                first = np.unravel_index(int(np.argmin(finite.ravel())), data.shape)
                index = tuple(int(i) for i in first)
                raise BatchError(
                    f"{where}: {bad} non-finite value(s) (NaN or Inf), the first at index "
                    f"{index if len(index) > 1 else index[0]}: {data[first]}; "
                    f"set {_settings.PERSIA_DEEP_CHECKS}=0 to skip this check"
                )
        self._data = data
        self._name = name

    @property
    def data(self) -> np.ndarray:
        """The array."""
        return self._data

    @property
    def name(self) -> str:
        """The given name, else ``DEFAULT_NAME``."""
        return self._name or self.DEFAULT_NAME

    @property
    def given_name(self) -> str | None:
        """The name passed to the constructor (``None`` if none was)."""
        return self._name

    @property
    def batch_size(self) -> int:
        """The length of the first axis."""
        return int(self._data.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        shape, dtype = self._data.shape, self._data.dtype
        return f"{type(self).__name__}(name={self.name!r}, shape={shape}, dtype={dtype})"


class NonIDTypeFeature(NdarrayDataBase):
    """A dense (non-ID) input, e.g. ``np.float32[batch, 5]`` or ``np.uint8[batch, 3, 32, 32]``.

    The model receives it as a tensor in ``non_id_tensors``, in the batch's order.
    """

    DEFAULT_NAME = "non_id_type_feature_anonymous"


class Label(NdarrayDataBase):
    """A label array, e.g. ``np.float32[batch, 1]`` or several ``bool`` targets ``[batch, k]``."""

    DEFAULT_NAME = "label_anonymous"


def _check_list(items: object, what: str) -> list:
    if items is None:
        return []
    if isinstance(items, np.ndarray) or not isinstance(items, (list, tuple)):
        raise BatchError(f"{what}: expected a list, got {_type_name(items)}")
    return list(items)


def _check_unique(names: list[str | None], what: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        if name in seen:
            raise BatchError(f"{what}: duplicate name {name!r} (positions {seen[name]} and {i})")
        seen[name] = i


class PersiaBatch:
    """One batch: ID-type features (slots), dense features, labels and optional meta bytes.

    Args:
        id_type_features: the slots, in the order the model receives their embeddings.
        non_id_type_features: dense inputs, in the order the model receives them.
        labels: labels; required when ``requires_grad`` is True.
        batch_size: the number of samples; default: that of the first ID-type feature. Every
            feature and label must have exactly this many samples.
        requires_grad: whether the batch trains (embedding gradients flow back).
        meta: opaque bytes carried with the batch.

    Raises:
        BatchError: empty or malformed ``id_type_features``, duplicate names, disagreeing batch
            sizes (the message names the feature and both sizes), ``requires_grad`` without
            labels, or ``meta`` that is not bytes.
    """

    def __init__(
        self,
        id_type_features: Sequence[IDTypeFeature | IDTypeFeatureWithSingleID],
        non_id_type_features: Sequence[NonIDTypeFeature] | None = None,
        labels: Sequence[Label] | None = None,
        batch_size: int | None = None,
        requires_grad: bool = True,
        meta: bytes | None = None,
    ) -> None:
        ids = _check_list(id_type_features, "id_type_features")
        if not ids:
            raise BatchError("id_type_features: must not be empty, got an empty list")
        for i, feature in enumerate(ids):
            if not isinstance(feature, IDTypeFeature):
                raise BatchError(
                    f"id_type_features[{i}]: expected IDTypeFeature or IDTypeFeatureWithSingleID, "
                    f"got {_type_name(feature)}"
                )
        _check_unique([f.name for f in ids], "id_type_features")
        dense = _check_list(non_id_type_features, "non_id_type_features")
        for i, feature in enumerate(dense):
            if not isinstance(feature, NonIDTypeFeature):
                raise BatchError(
                    f"non_id_type_features[{i}]: expected NonIDTypeFeature, "
                    f"got {_type_name(feature)}"
                )
        _check_unique([f.given_name for f in dense], "non_id_type_features")
        label_list = _check_list(labels, "labels")
        for i, label in enumerate(label_list):
            if not isinstance(label, Label):
                raise BatchError(f"labels[{i}]: expected Label, got {_type_name(label)}")
        _check_unique([f.given_name for f in label_list], "labels")

        if batch_size is None:
            size = ids[0].batch_size
            source = f"id_type_feature {ids[0].name!r}"
        else:
            if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
                raise BatchError(f"batch_size: expected an int or None, got {batch_size!r}")
            size = int(batch_size)
            source = "batch_size"
        if size < 1:
            raise BatchError(f"batch_size: must be >= 1, got {size} (from {source})")
        groups: list[tuple[str, list]] = [
            ("id_type_feature", ids),
            ("non_id_type_feature", dense),
            ("label", label_list),
        ]
        for kind, items in groups:
            for item in items:
                if item.batch_size != size:
                    raise BatchError(
                        f"{kind} {item.name!r}: batch size {item.batch_size} does not match "
                        f"the batch's {size} (from {source})"
                    )
        if not isinstance(requires_grad, (bool, np.bool_)):
            raise BatchError(f"requires_grad: expected a bool, got {requires_grad!r}")
        if requires_grad and not label_list:
            raise BatchError(
                "requires_grad=True needs labels, got none: pass labels=[Label(...)] "
                "or requires_grad=False"
            )
        if meta is not None and not isinstance(meta, bytes):
            raise BatchError(f"meta: expected bytes or None, got {_type_name(meta)}")

        self._ids = ids
        self._dense = dense
        self._labels = label_list
        self._batch_size = size
        self._requires_grad = bool(requires_grad)
        self._meta = meta

    @property
    def batch_size(self) -> int:
        """The number of samples."""
        return self._batch_size

    @property
    def id_type_features(self) -> list[IDTypeFeature]:
        """The slots, in order."""
        return list(self._ids)

    @property
    def non_id_type_features(self) -> list[NonIDTypeFeature]:
        """The dense features, in order (empty list if none)."""
        return list(self._dense)

    @property
    def labels(self) -> list[Label]:
        """The labels, in order (empty list if none)."""
        return list(self._labels)

    @property
    def requires_grad(self) -> bool:
        """Whether the batch trains."""
        return self._requires_grad

    @property
    def meta(self) -> bytes | None:
        """The opaque meta bytes, or None."""
        return self._meta

    def __repr__(self) -> str:
        names = [f.name for f in self._ids]
        return (
            f"PersiaBatch(batch_size={self._batch_size}, id_type_features={names}, "
            f"non_id_type_features={len(self._dense)}, labels={len(self._labels)}, "
            f"requires_grad={self._requires_grad}, meta={'yes' if self._meta else 'no'})"
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The batch as plain arrays plus a JSON header (a uint8 array under ``"header"``).

        Keys: ``"header"``; ``"id.{i}.values"`` / ``"id.{i}.lengths"`` per slot;
        ``"non_id.{i}"``; ``"label.{i}"``; ``"meta"`` (uint8) when meta is set. Arrays are the
        batch's own (no copies); the receiver must not modify them.
        """
        header = {
            "format": _ARRAYS_FORMAT,
            "version": _ARRAYS_VERSION,
            "batch_size": self._batch_size,
            "requires_grad": self._requires_grad,
            "id_type_features": [
                {"name": f.name, "single_id": isinstance(f, IDTypeFeatureWithSingleID)}
                for f in self._ids
            ],
            "non_id_type_features": [f.given_name for f in self._dense],
            "labels": [f.given_name for f in self._labels],
            "meta": self._meta is not None,
        }
        out: dict[str, np.ndarray] = {
            "header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8).copy()
        }
        for i, feature in enumerate(self._ids):
            out[f"id.{i}.values"] = feature.values
            out[f"id.{i}.lengths"] = feature.lengths
        for i, dense in enumerate(self._dense):
            out[f"non_id.{i}"] = dense.data
        for i, label in enumerate(self._labels):
            out[f"label.{i}"] = label.data
        if self._meta is not None:
            out["meta"] = np.frombuffer(self._meta, dtype=np.uint8)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PersiaBatch:
        """Rebuilds a batch from :meth:`to_arrays`' output; every check runs again.

        Raises:
            BatchError: a missing array, a malformed header, or any batch check failing.
        """

        def get(key: str) -> np.ndarray:
            if key not in arrays:
                raise BatchError(f"from_arrays: missing array {key!r}")
            value = arrays[key]
            if not isinstance(value, np.ndarray):
                raise BatchError(
                    f"from_arrays: {key!r} must be a np.ndarray, got {_type_name(value)}"
                )
            return value

        raw = get("header")
        try:
            header = json.loads(np.ascontiguousarray(raw, dtype=np.uint8).tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BatchError(f"from_arrays: header is not valid JSON: {exc}") from None
        if not isinstance(header, dict) or header.get("format") != _ARRAYS_FORMAT:
            raise BatchError(f"from_arrays: header format must be {_ARRAYS_FORMAT!r}")
        if header.get("version") != _ARRAYS_VERSION:
            raise BatchError(
                f"from_arrays: header version must be {_ARRAYS_VERSION}, "
                f"got {header.get('version')!r}"
            )
        try:
            id_specs = list(header["id_type_features"])
            dense_names = list(header["non_id_type_features"])
            label_names = list(header["labels"])
            batch_size = header["batch_size"]
            requires_grad = header["requires_grad"]
            has_meta = bool(header["meta"])
        except (KeyError, TypeError) as exc:
            raise BatchError(f"from_arrays: header lacks field {exc}") from None
        ids: list[IDTypeFeature] = []
        for i, spec in enumerate(id_specs):
            if not isinstance(spec, dict) or "name" not in spec:
                raise BatchError(
                    f"from_arrays: header id_type_features[{i}] must be an object with a name, "
                    f"got {spec!r}"
                )
            values = get(f"id.{i}.values")
            lengths = get(f"id.{i}.lengths")
            if spec.get("single_id"):
                feature: IDTypeFeature = IDTypeFeatureWithSingleID(spec["name"], values)
                if not np.array_equal(feature.lengths, lengths):
                    raise BatchError(
                        f"from_arrays: single-ID feature {spec['name']!r} has lengths other than 1"
                    )
            else:
                feature = IDTypeFeature.from_columnar(spec["name"], values, lengths)
            ids.append(feature)
        dense = [NonIDTypeFeature(get(f"non_id.{i}"), n) for i, n in enumerate(dense_names)]
        labels = [Label(get(f"label.{i}"), n) for i, n in enumerate(label_names)]
        meta = get("meta").tobytes() if has_meta else None
        return cls(
            ids,
            non_id_type_features=dense,
            labels=labels or None,
            batch_size=batch_size,
            requires_grad=requires_grad,
            meta=meta,
        )

    def to_bytes(self) -> bytes:
        """The batch as one byte string (format version 1, see the module docstring): what a
        client sends to a serving handler, decoded by :meth:`from_bytes` or
        :meth:`persia.ctx.InferCtx.get_embedding_from_bytes`. No pickle."""
        arrays = self.to_arrays()
        header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
        entries = []
        chunks: list[bytes] = []
        offset = 0
        for key, array in arrays.items():
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            raw = little.tobytes()
            entries.append(
                {
                    "key": key,
                    "dtype": little.dtype.str,
                    "shape": list(little.shape),
                    "offset": offset,
                }
            )
            pad = -len(raw) % _ALIGN
            chunks.append(raw + b"\x00" * pad)
            offset += len(raw) + pad
        header["arrays"] = entries
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % _ALIGN)
        payload = b"".join(chunks)
        crc = zlib.crc32(payload, zlib.crc32(head))
        prefix = _PREFIX.pack(BYTES_MAGIC, BYTES_VERSION, len(head), len(payload), crc, 0)
        return prefix + head + payload

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> PersiaBatch:
        """Decodes what :meth:`to_bytes` wrote; the arrays are copies (writable).

        Raises:
            BatchError: not bytes; a wrong magic or version; a length, offset, shape or dtype
                that does not fit the bytes given; a CRC mismatch; a header naming other arrays
                than its features need; or any batch check failing. The message says which.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BatchError(f"from_bytes: expected bytes, got {_type_name(data)}")
        buf = bytearray(data)  # one copy: the arrays below are writable views of it
        size = len(buf)
        if size < _PREFIX.size:
            raise BatchError(
                f"from_bytes: {size} bytes is shorter than the {_PREFIX.size}-byte prefix"
            )
        magic, version, head_len, payload_len, crc, reserved = _PREFIX.unpack_from(buf, 0)
        if magic != BYTES_MAGIC:
            raise BatchError(
                f"from_bytes: not a persia batch: magic {magic!r}, expected {BYTES_MAGIC!r}"
            )
        if version != BYTES_VERSION:
            raise BatchError(
                f"from_bytes: format version {version} is not supported (this persia reads "
                f"{BYTES_VERSION})"
            )
        if reserved != 0:
            raise BatchError(f"from_bytes: reserved prefix field must be 0, got {reserved}")
        if head_len % _ALIGN:
            raise BatchError(f"from_bytes: header length {head_len} is not a multiple of 8")
        expected = _PREFIX.size + head_len + payload_len
        if expected != size:
            raise BatchError(
                f"from_bytes: the prefix announces {expected} bytes (header {head_len}, payload "
                f"{payload_len}), got {size}"
            )
        view = memoryview(buf)
        head = view[_PREFIX.size : _PREFIX.size + head_len]
        payload_start = _PREFIX.size + head_len
        actual = zlib.crc32(view[payload_start:], zlib.crc32(head))
        if actual != crc:
            raise BatchError(
                f"from_bytes: CRC-32 mismatch (stored {crc:#010x}, computed {actual:#010x}): "
                "the bytes were changed or truncated"
            )
        try:
            header = json.loads(bytes(head).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise BatchError(f"from_bytes: header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise BatchError(f"from_bytes: header must be a JSON object, got {_type_name(header)}")
        entries = header.pop("arrays", None)
        if not isinstance(entries, list):
            raise BatchError("from_bytes: header lacks its 'arrays' list")
        arrays: dict[str, np.ndarray] = {}
        end = 0
        for i, entry in enumerate(entries):
            arrays_key, array = _decode_array(buf, payload_start, payload_len, entry, i, end)
            if arrays_key in arrays:
                raise BatchError(f"from_bytes: array {arrays_key!r} appears twice")
            arrays[arrays_key] = array
            end = entry["offset"] + array.nbytes
        if payload_len != end + (-end % _ALIGN):
            raise BatchError(
                f"from_bytes: payload of {payload_len} bytes, but its arrays end at {end}"
            )
        _check_array_keys(header, set(arrays))
        arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        return cls.from_arrays(arrays)


def _decode_array(
    buf: bytearray, start: int, payload_len: int, entry: object, i: int, end: int
) -> tuple[str, np.ndarray]:
    """Array ``i`` of a to_bytes payload, its entry checked against the bytes (see from_bytes)."""
    where = f"from_bytes: arrays[{i}]"
    if not isinstance(entry, dict) or set(entry) != {"key", "dtype", "shape", "offset"}:
        raise BatchError(f"{where}: expected an object with key, dtype, shape and offset")
    key, descr, shape, offset = entry["key"], entry["dtype"], entry["shape"], entry["offset"]
    if not isinstance(key, str):
        raise BatchError(f"{where}: key must be a string, got {key!r}")
    where = f"from_bytes: array {key!r}"
    dtype = _BYTES_DTYPES.get(descr) if isinstance(descr, str) else None
    if dtype is None:
        raise BatchError(f"{where}: dtype {descr!r} is not one of {sorted(_BYTES_DTYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= _MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise BatchError(
            f"{where}: shape must be a list of 1 to {_MAX_NDIM} ints >= 0, got {shape!r}"
        )
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise BatchError(f"{where}: offset must be an int, got {offset!r}")
    if offset % _ALIGN or offset < end:
        raise BatchError(
            f"{where}: offset {offset} must be a multiple of 8 at or after the previous "
            f"array's end ({end})"
        )
    count = 1
    for n in shape:
        count *= n
    nbytes = count * dtype.itemsize
    if offset + nbytes > payload_len:
        raise BatchError(
            f"{where}: {nbytes} bytes at offset {offset} run past the payload's {payload_len}"
        )
    if count == 0:
        return key, np.empty(shape, dtype=dtype)
    array = np.frombuffer(buf, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    if dtype.kind == "b" and int(array.view(np.uint8).max()) > 1:
        raise BatchError(f"{where}: bool bytes must be 0 or 1")
    return key, array


def _check_array_keys(header: dict, present: set[str]) -> None:
    """The arrays a header's features need are exactly those present (from_bytes)."""
    try:
        wanted = set()
        for i in range(len(header["id_type_features"])):
            wanted |= {f"id.{i}.values", f"id.{i}.lengths"}
        wanted |= {f"non_id.{i}" for i in range(len(header["non_id_type_features"]))}
        wanted |= {f"label.{i}" for i in range(len(header["labels"]))}
        meta = header["meta"]
        if not isinstance(meta, bool):
            raise TypeError("'meta'")
        if meta:
            wanted.add("meta")
    except (KeyError, TypeError) as exc:
        raise BatchError(f"from_bytes: header lacks or mistypes field {exc}") from None
    if wanted != present:
        missing = sorted(wanted - present)
        extra = sorted(present - wanted)
        raise BatchError(f"from_bytes: arrays missing {missing}, unexpected {extra}")
