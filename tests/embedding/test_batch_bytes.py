"""PersiaBatch.to_bytes / from_bytes: the serving request format (persia/embedding/data.py)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persia.embedding.data import (
    BYTES_MAGIC,
    IDTypeFeature,
    IDTypeFeatureWithSingleID,
    Label,
    NonIDTypeFeature,
    PersiaBatch,
)
from persia.errors import BatchError

U64 = np.uint64
PREFIX = struct.Struct("<8sIIQII")


def _ids(*samples: list[int]) -> list[np.ndarray]:
    return [np.array(s, dtype=U64) for s in samples]


def _rich_batch() -> PersiaBatch:
    ids = [
        IDTypeFeature("tags", _ids([1, 2**64 - 1], [], [3])),
        IDTypeFeatureWithSingleID("user", np.array([7, 8, 9], U64)),
        IDTypeFeature("empty", _ids([], [], [])),
    ]
    dense = [
        NonIDTypeFeature(np.arange(6, dtype=np.float32).reshape(3, 2), name="d"),
        NonIDTypeFeature(np.arange(3, dtype=np.int16)),
        NonIDTypeFeature(np.zeros((3, 1, 2), np.uint8), name="img"),
    ]
    labels = [Label(np.array([True, False, True]), name="click"), Label(np.ones((3, 1)))]
    return PersiaBatch(ids, dense, labels, requires_grad=True, meta=b"\x00meta\xff")


def _assert_same(a: PersiaBatch, b: PersiaBatch) -> None:
    assert (a.batch_size, a.requires_grad, a.meta) == (b.batch_size, b.requires_grad, b.meta)
    assert len(a.id_type_features) == len(b.id_type_features)
    for x, y in zip(a.id_type_features, b.id_type_features, strict=True):
        assert type(x) is type(y) and x.name == y.name
        assert y.values.dtype == U64 and x.values.tobytes() == y.values.tobytes()
        assert x.lengths.tolist() == y.lengths.tolist()
    pairs = list(zip(a.non_id_type_features, b.non_id_type_features, strict=True))
    pairs += list(zip(a.labels, b.labels, strict=True))
    for x, y in pairs:
        assert x.given_name == y.given_name
        assert x.data.dtype == y.data.dtype and x.data.shape == y.data.shape
        assert x.data.tobytes() == y.data.tobytes()


def _split(data: bytes) -> tuple[tuple, dict, bytes]:
    fields = PREFIX.unpack_from(data, 0)
    head_len = fields[2]
    header = json.loads(data[PREFIX.size : PREFIX.size + head_len])
    return fields, header, data[PREFIX.size + head_len :]


def _join(header: dict, payload: bytes, version: int = 1, magic: bytes = BYTES_MAGIC) -> bytes:
    """Bytes with a valid CRC around a (possibly crafted) header and payload."""
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return PREFIX.pack(magic, version, len(head), len(payload), crc, 0) + head + payload


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_several_slots_empty_rows_labels_meta():
    batch = _rich_batch()
    data = batch.to_bytes()
    assert isinstance(data, bytes) and data[:8] == BYTES_MAGIC
    back = PersiaBatch.from_bytes(data)
    _assert_same(batch, back)
    assert back.id_type_features[2].values.size == 0
    assert back.id_type_features[0].lengths.tolist() == [2, 0, 1]
    # arrays are writable copies, not views of the caller's bytes
    assert back.non_id_type_features[0].data.flags.writeable


def test_round_trip_without_labels_or_meta_and_from_bytearray_or_memoryview():
    batch = PersiaBatch([IDTypeFeature("a", _ids([5], []))], requires_grad=False)
    data = batch.to_bytes()
    for form in (data, bytearray(data), memoryview(data)):
        back = PersiaBatch.from_bytes(form)
        _assert_same(batch, back)
        assert back.labels == [] and back.meta is None and not back.requires_grad


def test_arrays_are_described_by_little_endian_dtypes():
    batch = PersiaBatch(
        [IDTypeFeatureWithSingleID("a", np.array([1, 2], U64))],
        [NonIDTypeFeature(np.arange(4, dtype=np.float64).reshape(2, 2))],
        requires_grad=False,
    )
    _, header, _ = _split(batch.to_bytes())
    assert [e["dtype"] for e in header["arrays"]] == ["<u8", "<i8", "<f8"]
    assert [e["shape"] for e in header["arrays"]] == [[2], [2], [2, 2]]


def test_layout_is_the_documented_one():
    data = _rich_batch().to_bytes()
    magic, version, head_len, payload_len, crc, reserved = PREFIX.unpack_from(data, 0)
    assert (magic, version, reserved) == (BYTES_MAGIC, 1, 0)
    assert head_len % 8 == 0 and len(data) == PREFIX.size + head_len + payload_len
    assert crc == zlib.crc32(data[PREFIX.size :])
    _, header, payload = _split(data)
    assert header["format"] == "persia-batch" and header["version"] == 1
    for entry in header["arrays"]:
        assert entry["offset"] % 8 == 0
    tags = next(e for e in header["arrays"] if e["key"] == "id.0.values")
    start = tags["offset"]
    values = np.frombuffer(payload[start : start + 24], "<u8")
    assert values.tolist() == [1, 2**64 - 1, 3]


# --- bad bytes ----------------------------------------------------------------------------------


def test_not_bytes():
    with pytest.raises(BatchError, match="expected bytes, got str"):
        PersiaBatch.from_bytes("abc")  # type: ignore[arg-type]


@pytest.mark.parametrize("cut", [0, 7, 31, 32, 100, -1])
def test_truncated(cut):
    data = _rich_batch().to_bytes()
    with pytest.raises(BatchError, match="shorter than|announces"):
        PersiaBatch.from_bytes(data[:cut])


def test_trailing_bytes():
    with pytest.raises(BatchError, match="announces"):
        PersiaBatch.from_bytes(_rich_batch().to_bytes() + b"\x00" * 8)


def test_every_single_byte_change_is_refused():
    data = PersiaBatch(
        [IDTypeFeature("a", _ids([1, 2], []))],
        [NonIDTypeFeature(np.ones((2, 1), np.float32))],
        [Label(np.zeros(2, np.float32))],
        meta=b"m",
    ).to_bytes()
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x5A
        with pytest.raises(BatchError):
            PersiaBatch.from_bytes(bytes(mutated))


def test_wrong_magic_and_version_named():
    fields, header, payload = _split(_rich_batch().to_bytes())
    with pytest.raises(BatchError, match="not a persia batch: magic"):
        PersiaBatch.from_bytes(_join(header, payload, magic=b"PERSIAB\x02"))
    with pytest.raises(BatchError, match="format version 2 is not supported"):
        PersiaBatch.from_bytes(_join(header, payload, version=2))


def test_crc_mismatch_named():
    data = bytearray(_rich_batch().to_bytes())
    data[-1] ^= 1
    with pytest.raises(BatchError, match="CRC-32 mismatch"):
        PersiaBatch.from_bytes(bytes(data))


def _crafted(change) -> bytes:
    _, header, payload = _split(_rich_batch().to_bytes())
    change(header, payload)
    return _join(header, payload)


def _entry(header: dict, key: str) -> dict:
    return next(e for e in header["arrays"] if e["key"] == key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, p: _entry(h, "id.0.values").update(offset=10**12), "run past the payload"),
        (lambda h, p: _entry(h, "id.0.values").update(shape=[10**30]), "run past the payload"),
        (lambda h, p: _entry(h, "id.0.values").update(shape=[-1]), "shape must be a list"),
        (lambda h, p: _entry(h, "id.0.values").update(shape=[]), "shape must be a list"),
        (lambda h, p: _entry(h, "id.0.values").update(dtype="|O"), "dtype '|O' is not one"),
        (lambda h, p: _entry(h, "id.0.values").update(dtype=">u8"), "dtype '>u8' is not one"),
        (lambda h, p: _entry(h, "id.0.values").update(offset=4), "must be a multiple of 8"),
        (lambda h, p: _entry(h, "id.0.lengths").update(offset=0), "at or after the previous"),
        (lambda h, p: _entry(h, "id.0.values").update(extra=1), "expected an object with key"),
        (lambda h, p: _entry(h, "id.0.values").update(key=3), "key must be a string"),
        (lambda h, p: h["arrays"].pop(), "payload of .* bytes, but its arrays end"),
        (lambda h, p: h.pop("arrays"), "lacks its 'arrays' list"),
        (lambda h, p: h.pop("labels"), "lacks or mistypes field 'labels'"),
        (lambda h, p: h.update(meta=1), "lacks or mistypes field 'meta'"),
        (lambda h, p: h.update(meta=False), r"unexpected \['meta'\]"),
        (lambda h, p: h.update(labels=["click"]), r"unexpected \['label.1'\]"),
        (lambda h, p: h.update(version=7), "header version must be 1"),
        (lambda h, p: h.update(batch_size=2), "does not match the batch's 2"),
        (lambda h, p: h["id_type_features"].__setitem__(0, "tags"), "must be an object"),
        (lambda h, p: _entry(h, "id.1.values").update(dtype="<i8"), "IDs must be np.uint64"),
    ],
)
def test_crafted_headers_with_valid_crc(change, message):
    with pytest.raises(BatchError, match=message):
        PersiaBatch.from_bytes(_crafted(change))


def test_header_not_an_object_or_not_json_or_too_deep():
    _, _, payload = _split(_rich_batch().to_bytes())
    with pytest.raises(BatchError, match="must be a JSON object"):
        PersiaBatch.from_bytes(_join([1, 2], payload))  # type: ignore[arg-type]
    deep = b"[" * 100_000
    deep += b" " * (-len(deep) % 8)
    raw = PREFIX.pack(BYTES_MAGIC, 1, len(deep), 0, zlib.crc32(deep), 0) + deep
    with pytest.raises(BatchError, match="not valid JSON"):
        PersiaBatch.from_bytes(raw)


def test_bool_bytes_other_than_0_or_1():
    batch = PersiaBatch(
        [IDTypeFeatureWithSingleID("a", np.array([1, 2], U64))],
        labels=[Label(np.array([True, False]))],
    )
    _, header, payload = _split(batch.to_bytes())
    start = _entry(header, "label.0")["offset"]
    payload = payload[:start] + b"\x02" + payload[start + 1 :]
    with pytest.raises(BatchError, match="bool bytes must be 0 or 1"):
        PersiaBatch.from_bytes(_join(header, payload))


def test_constructor_checks_run_again():
    batch = PersiaBatch(
        [IDTypeFeatureWithSingleID("a", np.array([1, 2], U64))],
        labels=[Label(np.zeros(2, np.float32))],
    )
    _, header, payload = _split(batch.to_bytes())
    start = _entry(header, "label.0")["offset"]
    payload = payload[:start] + np.float32(np.nan).tobytes() + payload[start + 4 :]
    with pytest.raises(BatchError, match="non-finite"):
        PersiaBatch.from_bytes(_join(header, payload))


# --- hypothesis ---------------------------------------------------------------------------------

_DENSE = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float32, np.float64]


@st.composite
def batches(draw) -> PersiaBatch:
    n = draw(st.integers(1, 6))
    ids = []
    for s in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            values = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n))
            ids.append(IDTypeFeatureWithSingleID(f"s{s}", np.array(values, U64)))
        else:
            rows = draw(
                st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=4), min_size=n, max_size=n)
            )
            ids.append(IDTypeFeature(f"s{s}", [np.array(r, U64) for r in rows]))

    def dense(cls, i):
        dtype = np.dtype(draw(st.sampled_from(_DENSE)))
        width = draw(st.integers(0, 3))
        shape = (n,) if width == 0 else (n, width)
        if dtype.kind == "f":
            data = draw(
                st.lists(
                    st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8),
                    min_size=int(np.prod(shape)),
                    max_size=int(np.prod(shape)),
                )
            )
        elif dtype.kind == "b":
            data = draw(
                st.lists(st.booleans(), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
            )
        else:
            info = np.iinfo(dtype)
            data = draw(
                st.lists(
                    st.integers(int(info.min), int(info.max)),
                    min_size=int(np.prod(shape)),
                    max_size=int(np.prod(shape)),
                )
            )
        name = draw(st.one_of(st.none(), st.just(f"{cls.__name__}{i}")))
        return cls(np.array(data, dtype=dtype).reshape(shape), name=name)

    non_id = [dense(NonIDTypeFeature, i) for i in range(draw(st.integers(0, 2)))]
    labels = [dense(Label, i) for i in range(draw(st.integers(0, 2)))]
    meta = draw(st.one_of(st.none(), st.binary(max_size=20)))
    requires_grad = bool(labels) and draw(st.booleans())
    return PersiaBatch(ids, non_id, labels or None, requires_grad=requires_grad, meta=meta)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_hypothesis_round_trip_is_bit_exact(batch):
    _assert_same(batch, PersiaBatch.from_bytes(batch.to_bytes()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.data())
def test_hypothesis_mutated_bytes_raise_batch_error(batch, data):
    raw = bytearray(batch.to_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[at:]
    else:
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=9))
    with pytest.raises(BatchError):
        PersiaBatch.from_bytes(bytes(raw))
