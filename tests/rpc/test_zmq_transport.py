"""The ZeroMQ data channel: wire format, errors, timeouts, liveness (no Ray needed)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from persia.embedding.optim import SGD
from persia.errors import BackendError, StoreError
from persia.rpc.base import PARAMETER_SERVER, ParameterServerClient
from persia.rpc.zmq_transport import ZmqServer, ZmqTransport, decode, encode
from persia.store import Shard, shard_of


@pytest.fixture
def shard_server():
    shard = Shard(1000, SGD(lr=0.5), dims=[4])
    server = ZmqServer(lambda m, a: getattr(shard, m)(*a))
    yield shard, server
    server.close()


def test_encode_decode_round_trip_keeps_dtypes_shapes_and_scalars():
    arrays = [
        np.arange(7, dtype=np.uint64),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],  # not contiguous
        np.array([True, False]),
    ]
    frames = encode({"id": 3, "m": "x"}, [*arrays, 5, 2.5, True, "s", None, np.int64(9)])
    head, values = decode(frames)
    assert head["id"] == 3 and head["m"] == "x"
    for a, b in zip(arrays, values[:4], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert values[4:] == [5, 2.5, True, "s", None, 9]


def test_objects_are_refused_both_ways():
    with pytest.raises(BackendError, match="dtype object"):
        encode({}, [np.array([object()], dtype=object)])
    with pytest.raises(BackendError, match="cannot send a dict"):
        encode({}, [{"a": 1}])
    frames = encode({}, [np.arange(3)])
    frames[0] = frames[0].replace(b"<i8", b"|O")
    with pytest.raises(BackendError, match="refusing"):
        decode(frames)


def test_client_over_zmq_matches_the_shard_and_store_errors_come_back(shard_server):
    shard, server = shard_server
    reference = Shard(1000, SGD(lr=0.5), dims=[4])
    transport = ZmqTransport({PARAMETER_SERVER: [server.access]}, timeout_s=5)
    client = ParameterServerClient(transport, shard_of)
    keys = np.array([5, 9, 5, 1 << 40], dtype=np.uint64)
    got = client.lookup(0, keys, 4, True)
    np.testing.assert_array_equal(got, reference.lookup(keys, 4, True))
    grads = np.ones((4, 4), dtype=np.float32)
    np.testing.assert_array_equal(
        client.apply_gradients(0, keys, grads), reference.apply_gradients(keys, grads)
    )
    np.testing.assert_array_equal(
        client.lookup(0, keys, 4, False), reference.lookup(keys, 4, False)
    )
    with pytest.raises(StoreError, match="dim"):
        client.lookup(0, keys, 5, True)  # a dim the shard does not hold
    with pytest.raises(BackendError, match=r"parameter-server\[3\]: no such replica"):
        client.lookup(3, keys, 4, True)
    transport.close()


def test_threads_use_their_own_sockets(shard_server):
    _, server = shard_server
    transport = ZmqTransport({PARAMETER_SERVER: [server.access]}, timeout_s=5)
    errors = []

    def work(seed):
        try:
            keys = np.arange(seed * 100, seed * 100 + 50, dtype=np.uint64)
            for _ in range(30):
                out = transport.call(PARAMETER_SERVER, 0, "lookup", keys, 4, True)
                assert out.shape == (50, 4)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    transport.close()


def test_a_silent_server_is_a_typed_error_within_the_timeout():
    server = ZmqServer(lambda m, a: time.sleep(1.2))
    transport = ZmqTransport({PARAMETER_SERVER: [server.access]}, timeout_s=0.6)
    start = time.perf_counter()
    with pytest.raises(BackendError, match=r"parameter-server\[0\]: no reply to lookup within 0.6"):
        transport.call(PARAMETER_SERVER, 0, "lookup", np.arange(3, dtype=np.uint64), 4, True)
    assert time.perf_counter() - start < 1.5
    transport.close()
    server.close()


def test_liveness_check_ends_the_wait_early():
    server = ZmqServer(lambda m, a: time.sleep(1.2))

    def dead(role, rank):
        raise BackendError("actor is dead", role, rank)

    transport = ZmqTransport({PARAMETER_SERVER: [server.access]}, timeout_s=30, liveness=dead)
    start = time.perf_counter()
    with pytest.raises(BackendError) as info:
        transport.call(PARAMETER_SERVER, 0, "ping")
    assert (info.value.role, info.value.rank) == (PARAMETER_SERVER, 0)
    assert time.perf_counter() - start < 2
    transport.close()
    server.close()
