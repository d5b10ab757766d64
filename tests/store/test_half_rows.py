"""Half-precision rows (float16, bfloat16): the conversions, lookups and every optimizer against
the NumPy twins in tests/naive.py, both roundings, config, checkpoints, re-sharding, deltas and
serving exports carrying the row dtype."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import naive
import naive_optim
import numpy as np
import pytest

from persia import checkpoint
from persia.embedding.config import embedding_spec, parse_embedding_config
from persia.embedding.optim import SGD, Adagrad, Adam
from persia.embedding.spec import EmbeddingSpec, SlotSpec, spec_from_dict, spec_to_dict
from persia.errors import ConfigError, StoreError
from persia.store import ShardedStore
from persia.store.build import store_options
from persia.store.delta import DeltaReader, DeltaWriter
from persia.store.kernels import half as H
from persia.store.table import EmbeddingTable, decode_rows, encode_rows, row_dtype_of

HALVES = ["float16", "bfloat16"]
OPTIMIZERS = [
    SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
    Adagrad(lr=0.1, weight_decay=0.01),
    Adagrad(lr=0.1, vectorwise_shared=True),
    Adam(lr=0.05),
]


def u64(xs) -> np.ndarray:
    return np.asarray(xs, dtype=np.uint64)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


# --------------------------------------------------------------------------- conversions
def test_every_float16_widens_exactly_and_float32_narrows_as_numpy_does():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    wide = decode_rows(every)
    out = np.empty((256, 256), np.float32)
    H.widen_kernel(every.view(np.int16), out)
    ref = every.astype(np.float32)
    same = (out.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ref) & np.isnan(out))
    assert same.all() and np.array_equal(wide[~np.isnan(ref)], ref[~np.isnan(ref)])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = [65504, 65519.99, 65520, 65536, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 0, -0.0]
    x = np.concatenate([x[np.isfinite(x)], np.float32(edges), np.float32([np.inf, -np.inf])])
    x = x.reshape(-1, 1)
    for dt in HALVES:
        got = encode_rows(x, dt)
        np.testing.assert_array_equal(bits(got), bits(naive.half_encode(x, dt)))
        assert row_dtype_of(got) == dt
        back = decode_rows(got)
        np.testing.assert_array_equal(bits(back), bits(naive.half_decode(got)))


@pytest.mark.parametrize("dt", HALVES)
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(dt):
    """Each value sits between two half neighbours; the mean of many stochastic roundings is
    the value (within 5 standard errors), while round-to-nearest always gives the nearer one."""
    n = 100_000
    storage = naive.HALF_STORAGE[dt]
    kview = np.int16 if dt == "float16" else np.uint16
    none = np.zeros((n, 0), np.float32)  # no optimizer state
    for x in (1.0 + 2.0**-12 * 3, -0.3, 1e-6 if dt == "float16" else 1e-30, 7.123):
        block = np.full((n, 1), x, np.float32)
        lo_hi = decode_rows(encode_rows(block[:1], dt))[0, 0]
        values = np.zeros((n, 1), storage)
        H.scatter_rows_kernel(block, none, np.arange(n, dtype=np.int32), values.view(kview), none,
                              True, np.uint64(12345))  # fmt: skip
        got = decode_rows(values)[:, 0].astype(np.float64)
        assert len(np.unique(got)) == 2  # the two neighbours, never a third value
        spacing = got.max() - got.min()
        assert abs(got.mean() - float(np.float32(x))) < 5 * 0.5 * spacing / np.sqrt(n)
        nearest = np.zeros((n, 1), storage)
        H.scatter_rows_kernel(block, none, np.arange(n, dtype=np.int32), nearest.view(kview), none,
                              False, np.uint64(0))  # fmt: skip
        assert (decode_rows(nearest)[:, 0] == lo_hi).all()
        # the twin (same random bits) gives the very same roundings
        rnd = naive.sr_random_bits(12345, n)
        twin = naive.half_encode_stochastic(block, dt, rnd.reshape(n, 1))
        np.testing.assert_array_equal(bits(values), bits(twin))


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("capacity", [1000, 50])  # room for all (fast path) / evictions
def test_lookups_match_the_twin_rounded(dt, capacity):
    rng = np.random.default_rng(1)
    table = EmbeddingTable(4, capacity, SGD(lr=0.1), row_dtype=dt)
    twin = naive.NaiveTable(4, capacity, SGD(lr=0.1))
    assert table.values.dtype == naive.HALF_STORAGE[dt]
    for _ in range(6):
        keys = rng.integers(0, 120, 40).astype(np.uint64)  # repeats within a batch too
        got = table.lookup(keys, True)
        want = naive.half_decode(naive.half_encode(twin.lookup(keys, True), dt))
        np.testing.assert_array_equal(bits(got), bits(want))
        np.testing.assert_array_equal(bits(table.lookup(keys, False)), bits(want))
    exp = table.export_rows()
    assert exp["values"].dtype == naive.HALF_STORAGE[dt] and exp["state"].dtype == np.float32
    assert exp["keys"].tolist() == list(twin.lru)  # LRU order kept


@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_matches_the_twin_for_every_optimizer(dt, optimizer, rounding):
    rng = np.random.default_rng(2)
    table = EmbeddingTable(4, 1000, optimizer, row_dtype=dt, rounding=rounding, seed=9)
    keys = u64(np.arange(1, 200))
    table.lookup(keys, True)
    values, state = table.values.copy(), table.state.copy()
    twin_apply = functools.partial(naive_optim.apply, optimizer)
    for step in range(1, 4):
        rows = table.probe(keys[rng.integers(0, 199, 300)])  # repeated rows: applied in order
        rows[5] = -1  # an absent key
        grads = rng.normal(size=(300, 4)).astype(np.float32)
        grads[7, 2] = np.nan  # skipped
        counts = table.apply_rows(rows, grads)
        seed = None
        if rounding == "stochastic":
            seed = (9 * 0xD6E8FEB86659FD93 + step * 0x9E3779B97F4A7C15) & (2**64 - 1)
        want = naive.half_apply(twin_apply, values, state, rows, grads, 10.0, seed)
        np.testing.assert_array_equal(counts, want)
        np.testing.assert_array_equal(bits(table.values), bits(values))
        np.testing.assert_array_equal(table.state, state)
    assert table.lookup(keys, False).dtype == np.float32


def test_stochastic_rounding_keeps_training_tiny_updates_that_nearest_loses():
    """Updates far below half a bfloat16 step: round-to-nearest never moves the row, stochastic
    rounding moves it by the expected amount on average."""
    keys = u64(np.arange(1, 2001))
    moved = {}
    for rounding in ("nearest", "stochastic"):
        t = EmbeddingTable(1, 10_000, SGD(lr=1.0), row_dtype="bfloat16", rounding=rounding)
        t.import_rows(keys, np.ones((2000, 1), np.float32))
        for _ in range(20):
            t.apply_gradients(keys, np.full((2000, 1), 2.0**-12, np.float32))  # step 1/32 ulp
        moved[rounding] = float(1.0 - t.lookup(keys, False).mean())
    assert moved["nearest"] == 0.0
    assert abs(moved["stochastic"] - 20 * 2.0**-12) < 0.1 * 20 * 2.0**-12


def test_bad_row_dtype_and_rounding_are_named():
    with pytest.raises(StoreError, match="row_dtype must be one of float32, float16, bfloat16"):
        EmbeddingTable(4, 10, SGD(lr=0.1), row_dtype="float8")
    with pytest.raises(StoreError, match="rounding must be one of nearest, stochastic"):
        EmbeddingTable(4, 10, SGD(lr=0.1), row_dtype="float16", rounding="up")
    with pytest.raises(StoreError, match=r"row_dtype\[4\] must be one of"):
        ShardedStore(1, 100, SGD(lr=0.1), dims=[4], row_dtype={4: "half"})
    t = EmbeddingTable(2, 10, SGD(lr=0.1), row_dtype="float16")
    with pytest.raises(StoreError, match="finite"):
        t.import_rows(u64([1]), np.float16([[np.inf, 0]]))
    with pytest.raises(StoreError, match="float32, float16 or uint16"):
        row_dtype_of(np.zeros((1, 2), np.int8))


def test_importing_another_row_dtype_converts_with_a_warning(caplog):
    src = EmbeddingTable(4, 100, SGD(lr=0.1), row_dtype="float16")
    src.lookup(u64([1, 2, 3]), True)
    rows = src.export_rows()
    dst = EmbeddingTable(4, 100, SGD(lr=0.1), row_dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        dst.import_rows(rows["keys"], rows["values"], rows["state"])
    assert "rows stored as float16 imported into a bfloat16 table" in caplog.text
    want = naive.half_encode(decode_rows(rows["values"]), "bfloat16")
    np.testing.assert_array_equal(dst.export_rows()["values"], want)
    wide = EmbeddingTable(4, 100, SGD(lr=0.1))  # float32: widened exactly
    wide.import_rows(rows["keys"], rows["values"], rows["state"])
    np.testing.assert_array_equal(wide.export_rows()["values"], decode_rows(rows["values"]))


def test_float16_dim16_rowwise_adagrad_bytes_per_parameter():
    """The layout the 4e9-parameter target needs: <= 5 bytes per parameter at capacity (values
    32 B + row-wise state 4 B + key/links 16 B + index)."""
    t = EmbeddingTable(16, 1 << 16, Adagrad(vectorwise_shared=True), row_dtype="float16")
    t.reserve(1 << 16)
    assert t.values.nbytes == (1 << 16) * 32 and t.state.nbytes == (1 << 16) * 4
    assert t.bytes_used / ((1 << 16) * 16) <= 5.0


# --------------------------------------------------------------------------- config
def test_embedding_config_row_dtype_globally_and_per_slot():
    cfg = parse_embedding_config(
        {
            "row_dtype": "float16",
            "row_rounding": "stochastic",
            "slots_config": {
                "a": {"dim": 8},
                "b": {"dim": 8},
                "c": {"dim": 4, "row_dtype": "bfloat16"},
                "d": {"dim": 16, "row_dtype": "float32"},
            },
        }
    )
    spec = embedding_spec(cfg)
    assert spec.row_dtypes == {8: "float16", 4: "bfloat16", 16: "float32"}
    assert spec.row_rounding == "stochastic"
    assert parse_embedding_config(cfg.to_dict()) == cfg
    assert store_options(spec)["row_dtype"] == {8: "float16", 4: "bfloat16", 16: "float32"}
    assert spec_from_dict(spec_to_dict(spec)) == spec
    store = ShardedStore(2, 1000, SGD(lr=0.1), **{k: v for k, v in store_options(spec).items()
                                                  if k not in ("capacity", "optimizer")})  # fmt: skip
    assert {d: t.values.dtype for d, t in store.shards[0]._tables.items()} == {
        4: np.uint16,
        8: np.float16,
        16: np.float32,
    }
    assert store.shards[0]._tables[8].rounding == "stochastic"
    assert embedding_spec(
        parse_embedding_config({"slots_config": {"a": {"dim": 8}}})
    ).row_dtypes == {8: "float32"}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"row_dtype": "fp16", "slots_config": {"a": {"dim": 8}}}, "row_dtype: expected one of"),
        ({"slots_config": {"a": {"dim": 8, "row_dtype": 16}}}, "slots_config.a.row_dtype"),
        ({"row_rounding": "down", "slots_config": {"a": {"dim": 8}}}, "row_rounding"),
        (
            {"slots_config": {"a": {"dim": 8}, "b": {"dim": 8, "row_dtype": "float16"}}},
            "slots_config.b.row_dtype: expected float32, as slot 'a' of the same dim 8",
        ),
    ],
)
def test_embedding_config_bad_row_dtype_names_the_field(doc, message):
    with pytest.raises(ConfigError, match=message):
        parse_embedding_config(doc)


def test_spec_checks_and_reads_old_dicts():
    with pytest.raises(ConfigError, match="slot 'b': row_dtype float16 differs from slot 'a'"):
        EmbeddingSpec(slots=(SlotSpec("a", 4, prefix=1), SlotSpec("b", 4, prefix=2,
                                                                  row_dtype="float16")))  # fmt: skip
    with pytest.raises(ConfigError, match="row_rounding must be one of"):
        EmbeddingSpec(slots=(SlotSpec("a", 4, prefix=1),), row_rounding="x")
    spec = EmbeddingSpec(slots=(SlotSpec("a", 4, prefix=1, row_dtype="bfloat16"),))
    old = spec_to_dict(spec)
    del old["slots"][0]["row_dtype"], old["row_rounding"]  # written before row dtypes existed
    assert spec_from_dict(old).row_dtypes == {4: "float32"}


def test_job_file_row_dtype(tmp_path):
    from persia.job.config import parse_job

    base = {
        "data": {
            "train": str(tmp_path / "x.csv"),
            "ids": ["a", "b"],
            "dense": ["x"],
            "label": "y",
        },  # fmt: skip
        "embedding": {
            "dim": 4,
            "row_dtype": "bfloat16",
            "slots": {"b": {"dim": 8, "row_dtype": "float16"}},
        },  # fmt: skip
    }
    job = parse_job(base)
    assert job.embedding.row_dtypes == {4: "bfloat16", 8: "float16"}
    bad = {**base, "embedding": {"dim": 4, "row_dtype": "half"}}
    with pytest.raises(ConfigError, match="embedding.row_dtype: expected one of float32"):
        parse_job(bad)
    bad = {**base, "embedding": {"dim": 4, "slots": {"b": {"row_dtype": "bfloat16"}}}}
    with pytest.raises(ConfigError, match="embedding.slots.b.row_dtype: expected float32, as"):
        parse_job(bad)


# --------------------------------------------------------------------------- persistence
def filled(shards: int, dt, n: int = 1500, seed: int = 0) -> ShardedStore:
    store = ShardedStore(shards, 100_000, Adam(lr=0.1), dims=[4, 8], row_dtype=dt)
    rng = np.random.default_rng(seed)
    for dim in (4, 8):
        keys = rng.choice(1 << 40, n, replace=False).astype(np.uint64) * np.uint64(2)
        keys += np.uint64(dim == 8)
        store.lookup(keys, dim, True)
        for _ in range(2):
            store.apply_gradients(keys, rng.normal(size=(n, dim)).astype(np.float32))
    return store


def rows_by_key(store: ShardedStore) -> dict[int, tuple[np.ndarray, ...]]:
    out = {}
    for dim in (4, 8):
        parts = [s.export_rows(dim)[dim] for s in store.shards if dim in s.dims]
        keys = np.concatenate([p["keys"] for p in parts])
        o = np.argsort(keys)
        out[dim] = tuple(np.concatenate([p[w] for p in parts])[o] for w in ("keys", "values",
                                                                            "state"))  # fmt: skip
    return out


def assert_same(a, b) -> None:
    for dim in a:
        for x, y in zip(a[dim], b[dim], strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(bits(x), bits(y))


@pytest.mark.parametrize("dt", [*HALVES, {4: "bfloat16", 8: "float16"}], ids=str)
@pytest.mark.parametrize(("n", "m"), [(2, 3), (3, 1)])
def test_checkpoint_round_trip_and_reshard_are_bit_identical(tmp_path, dt, n, m):
    src = filled(n, dt)
    checkpoint.dump(tmp_path, src)
    ckpt = checkpoint.read(tmp_path)
    want = {"4": dt, "8": dt} if isinstance(dt, str) else {str(k): v for k, v in dt.items()}
    assert ckpt.meta["row_dtypes"] == want
    dst = ShardedStore(m, 100_000, Adam(lr=0.1), dims=[4, 8], row_dtype=dt)
    checkpoint.restore_store(dst, ckpt)
    assert_same(rows_by_key(dst), rows_by_key(src))
    for dim in (4, 8):
        keys = rows_by_key(src)[dim][0]
        np.testing.assert_array_equal(dst.lookup(keys, dim, False), src.lookup(keys, dim, False))
    # an evaluation store (adopts the checkpoint) keeps the saved dtype; a float32 training job
    # loads the rows widened (exact), with a warning
    ev = ShardedStore(1, 100_000, SGD(lr=0.1), dims=[4, 8], adopt_optimizer=True)
    checkpoint.restore_store(ev, ckpt)
    assert_same(rows_by_key(ev), rows_by_key(src))
    wide = ShardedStore(2, 100_000, Adam(lr=0.1), dims=[4, 8])
    checkpoint.restore_store(wide, ckpt)
    for dim, (keys, values, _) in rows_by_key(src).items():
        np.testing.assert_array_equal(wide.lookup(keys, dim, False), decode_rows(values))


def test_deltas_carry_the_row_dtype(tmp_path: Path):
    rng = np.random.default_rng(3)
    store = filled(2, "float16")
    writer = DeltaWriter(store, tmp_path / "inc").start()
    checkpoint.dump(tmp_path / "ckpt", store, delta_seq=writer.last_seq)
    for _ in range(2):
        keys = np.unique(rng.integers(0, 3000, 300).astype(np.uint64) * np.uint64(2))
        store.lookup(keys, 4, True)
        store.apply_gradients(keys, rng.normal(size=(keys.size, 4)).astype(np.float32))
        writer.flush()
    writer.close()
    replica = ShardedStore(3, 100_000, Adam(lr=0.1), dims=[4, 8], row_dtype="float16")
    checkpoint.restore_store(replica, checkpoint.read(tmp_path / "ckpt"))
    assert DeltaReader(tmp_path / "inc").apply_pending(replica) == [1, 2]
    assert_same(rows_by_key(replica), rows_by_key(store))


def test_serving_export_keeps_half_rows_and_widens_on_lookup():
    from persia.serving.model import _SortedRows

    store = filled(1, "bfloat16")
    keys, values, _ = rows_by_key(store)[4]
    assert values.dtype == np.uint16
    table = _SortedRows({4: (keys, values)})
    probe = np.concatenate([keys[:50], u64([1, 3])])  # two unknown keys: zeros
    got = table.lookup(probe, 4, False)
    np.testing.assert_array_equal(got[:50], store.lookup(keys[:50], 4, False))
    assert (got[50:] == 0).all()


def test_a_float16_job_exports_float16_rows_and_serves_what_it_trained(tmp_path):
    """The adult-income job with float16 rows: its checkpoint and serving export hold float16
    rows (meta ``row_dtypes``), and the export serves the training path's predictions."""
    import pyarrow as pa
    from serving.test_serving import ADULT, _raw_test_table, _training_predictions

    import persia.serving as serving
    from persia.job.config import load_job
    from persia.store.checkpoint import read_current

    job = load_job(ADULT, [
        "training.max_samples=1024", "training.progress=none",
        f"training.checkpoint_dir={tmp_path / 'ckpt'}", "embedding.row_dtype=float16",
    ])  # fmt: skip
    assert set(job.embedding.row_dtypes.values()) == {"float16"}
    serving.run_and_export(job, tmp_path / "export")
    ckpt = checkpoint.read(tmp_path / "ckpt")
    assert set(ckpt.meta["row_dtypes"].values()) == {"float16"}
    arrays, meta = read_current(tmp_path / "export", kind=serving.KIND)
    assert set(meta["row_dtypes"].values()) == {"float16"}
    assert all(arrays[f"d{d}.values"].dtype == np.float16 for d in meta["row_dtypes"])
    expected = _training_predictions(job, tmp_path / "ckpt")
    request = _raw_test_table(job).drop_columns(["income_bracket"])
    served = serving.load(tmp_path / "export").predict(request)
    assert isinstance(request, pa.Table)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
