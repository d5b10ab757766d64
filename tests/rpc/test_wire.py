"""f16 wire compression (persia.rpc.wire): the codec against a per-row reference, the edge rows,
training through it over the in-process and the ZeroMQ transports, the simulated link's bytes,
and the settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from persia import _settings
from persia.datasets.synthetic import SyntheticStream
from persia.embedding.optim import SGD, Adagrad
from persia.errors import BackendError, ConfigError
from persia.rpc import wire
from persia.rpc.base import PARAMETER_SERVER, ParameterServerClient
from persia.rpc.local import LocalTransport, local_parameter_servers
from persia.rpc.simlink import HEADER_BYTES, SimLinkTransport
from persia.rpc.zmq_transport import ZmqServer, ZmqTransport
from persia.store import Shard, ShardedStore, shard_of
from persia.store.config import Admission, Uniform
from persia.worker.embedding_worker import EmbeddingWorker, SlotSpec

U16 = 2.0**-11  # float16's unit roundoff


def reference(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codec written out per row and element with the standard library: (codes, exps)."""
    codes = np.empty(rows.shape, np.float16)
    exps = np.empty(rows.shape[0], np.int8)
    for i, row in enumerate(rows.astype(np.float64)):
        top = max((abs(v) for v in row if math.isfinite(v)), default=0.0)
        e = min(max(math.frexp(top)[1] - 15, -127), 127)
        exps[i] = e
        for j, v in enumerate(row):
            codes[i, j] = np.float16(v * 2.0**-e if math.isfinite(v) else v)
    return codes, exps


def split(message: np.ndarray, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return message[: 2 * n * d].view(np.float16).reshape(n, d), message[2 * n * d :].view(np.int8)


def test_codec_matches_the_reference_and_its_error_bound():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 16)).astype(np.float32)
    rows *= (10.0 ** rng.uniform(-30, 30, size=(64, 1))).astype(np.float32)  # any row scale
    rows[5] *= (10.0 ** np.linspace(0, -12, 16)).astype(np.float32)  # one row, many scales
    rows[7, :8] *= np.float32(1e-7)  # small elements beside large ones in one row
    message = wire.encode_rows(rows)
    assert message.dtype == np.uint8 and message.shape == (wire.message_size(64, 16),)
    codes, exps = split(message, 64, 16)
    want_codes, want_exps = reference(rows)
    np.testing.assert_array_equal(exps, want_exps)
    np.testing.assert_array_equal(codes.view(np.uint16), want_codes.view(np.uint16))
    back = wire.decode_rows(message, 64, 16)
    assert back.dtype == np.float32 and back.shape == rows.shape
    scale = np.ldexp(1.0, exps.astype(np.int64))[:, None]
    err = np.abs(back.astype(np.float64) - rows)
    assert (err <= U16 * np.abs(rows) + 2.0**-25 * scale).all()
    # elements within 2**28 of their row's largest are within float16's relative precision
    top = np.abs(rows).max(axis=1, keepdims=True)
    normal = np.abs(rows) >= top * 2.0**-28
    assert normal[7, :8].all() and normal.sum() > 64 * 15
    assert (err[normal] <= U16 * np.abs(rows[normal])).all()
    assert np.abs(codes.astype(np.float32)).max(axis=1).max() < 2.0**15  # never near overflow


def test_zero_rows_extremes_and_non_finite_values():
    f32 = np.finfo(np.float32)
    rows = np.array(
        [
            [0.0, -0.0, 0.0, 0.0],  # all zero: exact, signs kept
            [np.nan, 1.0, -2.0, 0.5],  # NaN stays NaN, the rest coded
            [np.inf, -np.inf, 3.0, 0.0],
            [np.nan, np.nan, np.inf, -np.inf],  # nothing finite
            [f32.max, -f32.max, 1e36, 0.0],  # the largest finite magnitude stays finite
            [f32.smallest_subnormal, -(2.0**-140), 2.0**-130, 0.0],  # subnormal float32s
        ],
        dtype=np.float32,
    )
    back = wire.decode_rows(wire.encode_rows(rows), 6, 4)
    np.testing.assert_array_equal(back[0], rows[0])
    assert np.signbit(back[0]).tolist() == [False, True, False, False]
    assert np.isnan(back[1, 0]) and np.isnan(back[3, :2]).all()
    assert back[2, 0] == np.inf and back[2, 1] == -np.inf and back[3, 2] == np.inf
    np.testing.assert_allclose(back[1, 1:], rows[1, 1:], rtol=U16)
    np.testing.assert_allclose(back[2, 2:], rows[2, 2:], rtol=U16)
    assert np.isfinite(back[4]).all()
    np.testing.assert_allclose(back[4], rows[4], rtol=2 * U16)  # rounded down: still finite
    np.testing.assert_allclose(back[5], rows[5], rtol=U16, atol=2.0**-149)
    # a finite row never decodes to a non-finite one, a non-finite row never to a finite one
    assert np.isfinite(back).all(axis=1).tolist() == np.isfinite(rows).all(axis=1).tolist()


def test_empty_and_malformed_messages():
    assert wire.encode_rows(np.zeros((0, 8), np.float32)).shape == (0,)
    assert wire.decode_rows(np.zeros(0, np.uint8), 0, 8).shape == (0, 8)
    message = wire.encode_rows(np.ones((3, 4), np.float32))
    with pytest.raises(BackendError, match="3 rows of dim 5 has 33 bytes, got 27"):
        wire.decode_rows(message, 3, 5)
    with pytest.raises(BackendError, match="1-D uint8"):
        wire.decode_rows(np.ones((3, 4), np.float32), 3, 4)
    with pytest.raises(BackendError, match="2-D"):
        wire.encode_rows(np.ones(4, np.float32))


def _store(seed: int = 7) -> ShardedStore:
    return ShardedStore(
        num_shards=2,
        capacity=100_000,
        optimizer=Adagrad(lr=0.1),
        init=Uniform(-0.1, 0.1),
        admission=Admission(probability=1.0),
        seed=seed,
        weight_bound=10.0,
        dims=[4, 8],
    )


def _train(client: ParameterServerClient, steps: int = 6) -> tuple[list[np.ndarray], list]:
    """A few training steps of an embedding worker over ``client`` (a dim-4 and a dim-8 group,
    one slot pooled with sum and one raw); returns each step's pooled output and counts."""
    stream = SyntheticStream((50, 1000, 7, 5000), ids_per_sample=[1, 3, 1, 2], seed=2)
    names = stream.slot_names()
    slots = [
        SlotSpec(names[0], 4, prefix=1),
        SlotSpec(names[1], 8, pooling="mean", prefix=2),
        SlotSpec(names[2], 4, prefix=3),
        SlotSpec(names[3], 8, pooling="raw", prefix=4, sample_fixed_size=2),
    ]
    worker = EmbeddingWorker(slots, 8, client)
    rng = np.random.default_rng(0)
    outs, counts = [], []
    for i in range(steps):
        lookup = worker.forward(stream.batch(i % 3, 64).to_persia_batch(names), True)
        outs.append(lookup.summed.copy())
        grad = rng.standard_normal(lookup.summed.shape).astype(np.float32)
        grad[3, 1] = np.nan  # one non-finite gradient: counted by the worker, skipped by a shard
        raw = {3: rng.standard_normal(lookup.raw[3].shape).astype(np.float32)}
        counts.append(worker.backward(lookup, grad, raw).tolist())
    pb = stream.batch(99, 64).to_persia_batch(names, requires_grad=False)
    outs.append(worker.forward(pb, False).summed)
    assert worker.nonfinite_gradients == steps
    return outs, counts


def _assert_close(got: tuple[list, list], want: tuple[list, list]) -> None:
    """Same counts (the non-finite gradient skipped alike); outputs within float16 precision
    of the values plus what a few steps of float16 gradients drift them by."""
    assert got[1] == want[1]
    assert all(c[2] == 1 for c in got[1])  # the NaN row was skipped, not made finite
    for a, b in zip(got[0], want[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * max(1.0, np.abs(b).max()))
    assert any(not np.array_equal(a, b) for a, b in zip(got[0], want[0], strict=True))


def test_training_over_the_local_transport_matches_uncompressed():
    plain = _train(local_parameter_servers(_store()))
    client = local_parameter_servers(_store())
    client.wire = "f16"
    _assert_close(_train(client), plain)


def test_training_over_zeromq_matches_uncompressed():
    from persia.backends.ray.backend import ParameterServer

    plain = _train(local_parameter_servers(_store()))
    store = _store()
    servers = [
        ParameterServer(i, {}, "127.0.0.1", security="null", shard=s)
        for i, s in enumerate(store.shards)
    ]
    transport = ZmqTransport({PARAMETER_SERVER: [ps.access() for ps in servers]}, timeout_s=10)
    try:
        client = ParameterServerClient(transport, shard_of, wire="f16")
        _assert_close(_train(client), plain)
        # the server refuses a codec it does not know, as the caller's own ConfigError
        with pytest.raises(ConfigError, match="wire codec 'f8'"):
            transport.call(PARAMETER_SERVER, 0, "lookup_wire", np.arange(3, dtype=np.uint64),
                           4, False, "f8")  # fmt: skip
    finally:
        transport.close()
        for ps in servers:
            ps.close()


def test_a_server_without_the_wire_methods_fails_the_call_clearly():
    shard = Shard(1000, SGD(lr=0.5), dims=[4])

    def old_dispatch(method, args):  # a server that serves only the plain calls
        if method not in ("lookup", "apply_gradients"):
            raise BackendError(f"method {method!r} is not served on the data channel")
        return getattr(shard, method)(*args)

    server = ZmqServer(old_dispatch, security="null")
    transport = ZmqTransport({PARAMETER_SERVER: [server.endpoint]}, timeout_s=5)
    try:
        client = ParameterServerClient(transport, shard_of, wire="f16")
        keys = np.arange(4, dtype=np.uint64)
        with pytest.raises(BackendError, match="'lookup_wire' is not served"):
            client.lookup(0, keys, 4, True)
        client.wire = "none"
        assert client.lookup(0, keys, 4, True).shape == (4, 4)
    finally:
        transport.close()
        server.close()


def test_the_simulated_link_counts_the_compressed_bytes():
    shard = Shard(1000, SGD(lr=0.5), dims=[16])
    link = SimLinkTransport(LocalTransport({PARAMETER_SERVER: [shard]}), 1e12, 0.0)
    keys = np.arange(100, dtype=np.uint64)
    grads = np.ones((100, 16), np.float32)
    sizes = {}
    for codec in ("none", "f16"):
        client = ParameterServerClient(link, shard_of, wire=codec)
        before = (link.stats.bytes_out, link.stats.bytes_in)
        client.lookup(0, keys, 16, True)
        client.apply_gradients(0, keys, grads)
        sizes[codec] = (link.stats.bytes_out - before[0], link.stats.bytes_in - before[1])
    # plain: keys + dim + training + "lookup", then keys + f32 grads + "apply_gradients"
    assert sizes["none"] == (800 + 16 + 6 + 800 + 6400 + 15 + 2 * HEADER_BYTES,
                             6400 + 24 + 2 * HEADER_BYTES)  # fmt: skip
    # f16: 33 bytes a row instead of 64; the codec's name and dim ride along
    rows = wire.message_size(100, 16)
    assert rows == 3300
    assert sizes["f16"] == (800 + 16 + 3 + 11 + 800 + rows + 8 + 3 + 20 + 2 * HEADER_BYTES,
                            rows + 24 + 2 * HEADER_BYTES)  # fmt: skip
    total = {k: sum(v) for k, v in sizes.items()}
    assert total["f16"] / total["none"] < 0.62


def test_settings_are_checked(monkeypatch):
    from persia.backends.ray.config import ClusterConfig

    client = local_parameter_servers(_store())
    assert client.wire == "none"
    with pytest.raises(ConfigError, match="wire_compression must be one of none, f16, got 'f32'"):
        client.wire = "f32"
    monkeypatch.delenv(_settings.PERSIA_WIRE_COMPRESSION, raising=False)
    assert ClusterConfig().wire_compression == "none"
    assert ClusterConfig(wire_compression="F16").wire_compression == "f16"
    with pytest.raises(ConfigError, match="wire_compression must be one of"):
        ClusterConfig(wire_compression="bf16")
    monkeypatch.setenv(_settings.PERSIA_WIRE_COMPRESSION, " F16 ")
    cluster = ClusterConfig()
    assert cluster.wire_compression == "f16"
    assert cluster.replace(num_ps=2).wire_compression == "f16"
    monkeypatch.setenv(_settings.PERSIA_WIRE_COMPRESSION, "zstd")
    with pytest.raises(ConfigError, match="PERSIA_WIRE_COMPRESSION: expected none or f16"):
        ClusterConfig()


def test_persia_train_option_needs_the_cluster_backend():
    import argparse

    from persia.cli.train import cluster_config

    args = argparse.Namespace(wire_compression="f16")
    with pytest.raises(ConfigError, match="--wire-compression need --backend ray"):
        cluster_config(args, "local")


def test_the_float16_rounding_kernel_is_numpys_bit_for_bit():
    from persia.rpc.kernels import encode_kernel

    rng = np.random.default_rng(3)
    # random float32 patterns (every class: NaN, infinities, subnormals, overflow), and values
    # around every float16 binade in steps of half a float16 ulp (the ties) and less
    random = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    steps = 1 + np.arange(-64, 65, dtype=np.float64)[None, :] * 2.0**-12
    near = (np.ldexp(1.0, np.arange(-26, 17))[:, None] * steps).astype(np.float32).ravel()
    values = np.concatenate([random, near, -near])
    rows = values.reshape(-1, 1)
    codes = np.empty(rows.shape, np.uint16)
    exps = np.empty(rows.shape[0], np.int8)
    encode_kernel(rows, codes, exps, 15, 0, 0)  # the exponent clipped to 0: plain casts
    with np.errstate(over="ignore", invalid="ignore"):
        want = rows.astype(np.float16).view(np.uint16)
    nan = np.isnan(rows)
    assert nan.any() and np.isinf(rows).sum() + (np.abs(rows) >= 65520).sum() > 0
    np.testing.assert_array_equal(codes[~nan], want[~nan])
    assert np.isnan(codes.view(np.float16)[nan]).all()


def test_recovery_counts_compressed_calls_as_the_plain_ones():
    """The recovering channel notes which calls changed a shard (what a restore must replay
    past); a compressed gradient or training lookup is one, an evaluation lookup is not."""
    from persia.backends.ray.recovery import RecoveringTransport

    class Recovery:
        generation = [0]
        updates: list[int] = []

        def note_update(self, rank):
            self.updates.append(rank)

        def recover(self, rank, seen):
            return False

    store = _store()
    rec = Recovery()
    inner = LocalTransport({PARAMETER_SERVER: store.shards[:1]})
    client = ParameterServerClient(RecoveringTransport(rec, inner), shard_of, wire="f16")  # type: ignore[arg-type]
    keys = np.arange(5, dtype=np.uint64)
    client.lookup(0, keys, 4, False)
    assert rec.updates == []
    client.lookup(0, keys, 4, True)
    client.apply_gradients(0, keys, np.ones((5, 4), np.float32))
    assert rec.updates == [0, 0]
