"""persia.hashing: pinned test vectors (the hash is a file format), input kinds, missing values."""

from __future__ import annotations

import naive_worker as naive
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persia.errors import BatchError, ConfigError
from persia.hashing import hash_ints, hash_strings, hash_value, mix64_py

# Pinned: these must never change (IDs in checkpoints and serving depend on them).
STRING_VECTORS = [
    ("", 0, 0xC3817C016BA4FF30),
    ("a", 0, 0x5F29C2AADD9B8527),
    ("foobar", 0, 0x5DF295413403DE4F),
    ("héllo", 0, 0x4019771FFD0488F9),
    ("a", 1, 0x17A6B6692246BD10),
]
INT_VECTORS = [
    (0, 0xE220A8397B1DCDAF),
    (1, 0x910A2DEC89025CC1),
    (-1, 0xE4D971771B652C20),
    (0x9E3779B97F4A7C15, 0x6E789E6AA1B965F4),
]


def test_published_building_blocks():
    """FNV-1a-64 and splitmix64 reference values from their authors' published outputs."""
    h = 0xCBF29CE484222325
    for byte in b"a":
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    assert h == 0xAF63DC4C8601EC8C
    assert mix64_py(0) == 0xE220A8397B1DCDAF  # splitmix64(seed 0), first output
    assert mix64_py(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4  # second output
    assert naive.hash_bytes(b"a") == mix64_py(0xAF63DC4C8601EC8C)
    assert naive.hash_bytes(b"foobar") == mix64_py(0x85944171F73967E8)


@pytest.mark.parametrize(("value", "salt", "want"), STRING_VECTORS)
def test_string_vectors(value, salt, want):
    assert hash_strings([value], salt=salt).tolist() == [want]
    assert hash_value(value, salt=salt) == want
    assert naive.hash_bytes(value.encode(), salt) == want


@pytest.mark.parametrize(("value", "want"), INT_VECTORS)
def test_int_vectors(value, want):
    assert hash_ints([value]).tolist() == [want]
    assert hash_value(value) == want
    assert naive.hash_int(value) == want


def test_string_input_kinds_agree():
    values = ["Private", "Self-emp", "", "ñandú", "x" * 300, "Private"]
    want = np.array([naive.hash_bytes(v.encode(), 7) for v in values], np.uint64)
    kinds = {
        "list": values,
        "tuple": tuple(values),
        "generator": (v for v in values),
        "bytes": [v.encode() for v in values],
        "numpy U": np.array(values),
        "numpy S": np.array([v.encode() for v in values], dtype="S"),
        "numpy object": np.array(values, dtype=object),
        "numpy StringDType": np.array(values, dtype=np.dtypes.StringDType()),
        "arrow string": pa.array(values, pa.string()),
        "arrow large_string": pa.array(values, pa.large_string()),
        "arrow binary": pa.array([v.encode() for v in values], pa.binary()),
        "arrow string_view": pa.array(values, pa.string_view()),
        "arrow chunked": pa.chunked_array([values[:2], [], values[2:]]),
        "arrow sliced": pa.array(["zz"] + values + ["q"]).slice(1, len(values)),
    }
    for name, v in kinds.items():
        got = hash_strings(v, salt=7)
        assert got.dtype == np.uint64, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_empty_inputs():
    assert hash_strings([]).shape == (0,)
    assert hash_strings(pa.array([], pa.string())).shape == (0,)
    assert hash_strings(np.array([], dtype="S3")).shape == (0,)
    assert hash_ints([]).shape == (0,)
    assert hash_ints(np.zeros(0, np.int32)).shape == (0,)


def test_all_empty_strings_arrow_without_data_buffer():
    got = hash_strings(pa.array(["", ""]))
    assert got.tolist() == [0xC3817C016BA4FF30] * 2


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=20), max_size=30),
    st.integers(0, 2**64 - 1),
)
def test_strings_against_twin(values, salt):
    got = hash_strings(values, salt=salt)
    want = [naive.hash_bytes(v.encode(), salt) for v in values]
    assert got.tolist() == want
    np.testing.assert_array_equal(hash_strings(pa.array(values, pa.large_string()), salt=salt), got)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**64 - 1), max_size=30), st.integers(0, 2**64 - 1))
def test_ints_against_twin(values, salt):
    got = hash_ints(values, salt=salt)
    assert got.tolist() == [naive.hash_int(v, salt) for v in values]


def test_int_input_kinds_agree():
    values = [0, 5, -3, 2**31, 2**40 + 1]
    want = hash_ints(values)
    np.testing.assert_array_equal(hash_ints(np.array(values, np.int64)), want)
    np.testing.assert_array_equal(hash_ints(pa.array(values, pa.int64())), want)
    np.testing.assert_array_equal(hash_ints(np.array(values, object)), want)
    small = [0, 5, -3]
    for dt in (np.int8, np.int16, np.int32):
        np.testing.assert_array_equal(hash_ints(np.array(small, dt)), hash_ints(small))
    np.testing.assert_array_equal(hash_ints(np.array([0, 5], np.uint32)), hash_ints([0, 5]))
    # two's complement: -1 and 2**64 - 1 are the same uint64
    assert hash_ints([-1]).tolist() == hash_ints([2**64 - 1]).tolist()
    assert (
        hash_ints([2**63, -(2**63)]).tolist()
        == hash_ints(np.array([2**63] * 2, np.uint64)).tolist()
    )


def test_different_values_differ():
    words = [f"value-{i}" for i in range(20_000)] + ["", " ", "a", "A", "a ", "ab", "ba"]
    ids = hash_strings(words)
    assert len(set(ids.tolist())) == len(words)
    ints = hash_ints(np.arange(-10_000, 10_000))
    assert len(set(ints.tolist())) == 20_000
    assert hash_strings(["a"], salt=1)[0] != hash_strings(["a"])[0]
    # str and bytes of the same UTF-8 content are the same value
    assert hash_value("é") == hash_value("é".encode())


def test_missing_values():
    with pytest.raises(BatchError, match=r"values\[1\] is missing"):
        hash_strings(["a", None])
    with pytest.raises(BatchError, match=r"values\[2\] is missing"):
        hash_strings(pa.array(["a", "b", None]))
    with pytest.raises(BatchError, match=r"values\[0\] is missing"):
        hash_ints([None, 1])
    with pytest.raises(BatchError, match=r"values\[1\] is missing"):
        hash_ints(pa.array([1, None]))
    got = hash_strings(["a", None, "b"], missing="<NA>")
    assert got.tolist() == hash_strings(["a", "<NA>", "b"]).tolist()
    got = hash_strings(pa.chunked_array([["a"], [None, "b"]]), missing="<NA>", salt=3)
    assert got.tolist() == hash_strings(["a", "<NA>", "b"], salt=3).tolist()
    assert hash_ints([1, None], missing=-1).tolist() == hash_ints([1, -1]).tolist()
    assert hash_ints(pa.array([1, None]), missing=-1).tolist() == hash_ints([1, -1]).tolist()


def test_bad_values():
    with pytest.raises(BatchError, match=r"values\[1\] must be str or bytes, got int"):
        hash_strings(["a", 3])
    with pytest.raises(BatchError, match=r"values\[0\] must be str or bytes, got float"):
        hash_strings([float("nan")])
    with pytest.raises(BatchError, match="UTF-8"):
        hash_strings(["\udc80"])
    with pytest.raises(BatchError, match="hash_value"):
        hash_strings("abc")
    with pytest.raises(BatchError, match="float64"):
        hash_strings(np.zeros(3))
    with pytest.raises(BatchError, match="integer dtype, got float64"):
        hash_ints(np.zeros(3))
    with pytest.raises(BatchError, match="must be an int, got bool"):
        hash_ints([True, 2])
    with pytest.raises(BatchError, match="must be an int, got float"):
        hash_ints([1.5])
    with pytest.raises(BatchError, match=r"\[-2\*\*63, 2\*\*64\)"):
        hash_ints([2**64])
    with pytest.raises(BatchError, match="integer dtype, got bool"):
        hash_ints(np.array([True]))
    with pytest.raises(BatchError, match="integer arrow array"):
        hash_ints(pa.array(["a"]))
    with pytest.raises(BatchError, match="got NoneType"):
        hash_value(None)  # type: ignore[arg-type]
    with pytest.raises(BatchError, match="got bool"):
        hash_value(True)
    with pytest.raises(ConfigError, match="salt"):
        hash_strings(["a"], salt=-1)
    with pytest.raises(ConfigError, match="salt"):
        hash_ints([1], salt=2**64)


def test_not_pythons_hash():
    """Stable across processes: the same pinned value as in the docstring, not hash()'s."""
    assert hash_value("a") == 0x5F29C2AADD9B8527
    assert hash_value("a") != hash("a") % 2**64
