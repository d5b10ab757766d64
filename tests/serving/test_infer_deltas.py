"""InferCtx follows the training job's incremental deltas: rows changed by training reach
inference in order, whole deltas only; a corrupt delta is refused (and the later ones wait behind
it) while serving goes on; an incomplete one is never read."""

import shutil
import time

import numpy as np
import pytest
from runtime._jobs import Net, embedding_file, make_batches, run, to_persia, train_ctx

from persia.ctx import InferCtx
from persia.embedding.config import parse_global_config

TIMEOUT_S = 30.0  # generous: the test asserts order and content, not a time bound


def _probe():
    """IDs of every slot the training batches touch (slot a: 0-29, slot b: 0-19)."""
    return to_persia(make_batches(1, batch_size=64, seed=11)[0], requires_grad=False)


def _served(ctx: InferCtx) -> np.ndarray:
    return ctx.get_embedding_from_data(_probe()).lookup.summed


def _trained(ctx) -> np.ndarray:
    ctx.runtime.flush()
    return ctx.runtime.lookup(_probe(), False, 0, None).lookup.summed


def _wait_for(ctx: InferCtx, seq: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while ctx.freshness()["last_delta_seq"] < seq:
        if time.monotonic() > deadline:
            pytest.fail(f"delta {seq} not applied within {TIMEOUT_S} s: {ctx.freshness()}")
        time.sleep(0.02)


def _flush(ctx) -> int:
    ctx.runtime.flush()  # every gradient applied before the changed rows are taken
    info = ctx._delta_writer.flush()
    assert info is not None
    return info.seq


def _corrupt(gen) -> None:
    path = next(gen.glob("d*.values.npy"))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_inference_follows_training_deltas_in_order(tmp_path, caplog):
    deltas, ckpt = tmp_path / "deltas", tmp_path / "ckpt"
    server = {
        "enable_incremental_update": True,
        "incremental_dir": str(deltas),
        "incremental_buffer_size": 10**9,  # flushed by hand below
    }
    train_config = parse_global_config({"embedding_parameter_server_config": server})
    infer_config = parse_global_config(
        {
            "common_config": {
                "job_type": "Infer",
                "infer_config": {"embedding_checkpoint": str(ckpt)},
            },
            "embedding_parameter_server_config": server,
        }
    )
    batches = make_batches(24)
    model = Net()
    with train_ctx(model, global_config_file=train_config) as train:
        run(train, batches[:8])
        train.dump_embedding(ckpt)
        at_dump = _trained(train)
        # job_type: Infer + infer_config + enable_incremental_update of global_config.yml
        infer = InferCtx(
            [],
            embedding_config_file=embedding_file(),
            global_config_file=infer_config,
            poll_interval_s=0.02,
        )
        fresh = infer.freshness()
        assert fresh["incremental_dir"] == str(deltas) and fresh["last_delta_seq"] == 0
        np.testing.assert_array_equal(_served(infer), at_dump)

        run(train, batches[8:14])
        first = _flush(train)
        assert first == 1
        after_first = _trained(train)
        assert not np.array_equal(after_first, at_dump)  # training changed rows
        _wait_for(infer, first)
        np.testing.assert_array_equal(_served(infer), after_first)
        fresh = infer.freshness()
        assert fresh["last_error"] is None and fresh["age_s"] is not None and fresh["age_s"] >= 0

        run(train, batches[14:19])
        second = _flush(train)
        after_second = _trained(train)
        run(train, batches[19:])
        third = _flush(train)
        after_third = _trained(train)
        _wait_for(infer, third)
        np.testing.assert_array_equal(_served(infer), after_third)
        infer.close()

    # a follower of a copy whose delta 2 is corrupt: delta 1 only, then it waits at 2
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(deltas / "gen-000001", copy / "gen-000001")
    shutil.copytree(deltas / "gen-000002", copy / "gen-000002")
    _corrupt(copy / "gen-000002")
    shutil.copytree(deltas / "gen-000003", copy / "gen-000003")
    caplog.set_level("WARNING", logger="persia")
    follower = InferCtx(
        [],
        embedding_checkpoint=ckpt,
        embedding_config_file=embedding_file(),
        incremental_dir=copy,
        poll_interval_s=0.02,
    )
    fresh = follower.freshness()
    assert fresh["last_delta_seq"] == first and "gen-000002" in fresh["last_error"]
    assert "delta 2 refused" in caplog.text
    time.sleep(0.2)  # several polls: still refused, delta 3 never applied over it
    assert follower.freshness()["last_delta_seq"] == first
    np.testing.assert_array_equal(_served(follower), after_first)  # serving goes on

    # an incomplete delta (not yet renamed to gen-NNNNNN) is never read
    shutil.rmtree(copy / "gen-000002")
    shutil.copytree(deltas / "gen-000002", copy / f".tmp-gen-000002-{second}")
    time.sleep(0.2)
    assert follower.freshness()["last_delta_seq"] == first
    assert "delta 2 is missing" in follower.freshness()["last_error"]

    # the complete delta 2 appears: 2 and 3 are applied, in order
    (copy / f".tmp-gen-000002-{second}").rename(copy / "gen-000002")
    _wait_for(follower, third)
    assert follower.freshness()["last_error"] is None
    np.testing.assert_array_equal(_served(follower), after_third)
    assert not np.array_equal(after_second, after_third)
    follower.close()


def test_a_request_sees_whole_deltas_only(tmp_path):
    """Lookups and delta application take the same lock: while a delta's rows are being
    written (held here mid-delta), a lookup waits instead of seeing half of it."""
    import threading

    from persia.store import delta as delta_module

    deltas, ckpt = tmp_path / "deltas", tmp_path / "ckpt"
    server = {"enable_incremental_update": True, "incremental_dir": str(deltas)}
    config = parse_global_config({"embedding_parameter_server_config": server})
    with train_ctx(Net(), global_config_file=config) as train:
        run(train, make_batches(4))
        train.dump_embedding(ckpt)
        infer = InferCtx(
            [],
            embedding_checkpoint=ckpt,
            embedding_config_file=embedding_file(),
            incremental_dir=deltas,
            poll_interval_s=0.02,
        )
        before = _served(infer)
        run(train, make_batches(4, seed=3))
        writing, release = threading.Event(), threading.Event()
        original = delta_module.apply_rows

        def slow_apply_rows(*args):
            writing.set()
            release.wait(5)
            return original(*args)

        delta_module.apply_rows = slow_apply_rows
        try:
            _flush(train)
            after = _trained(train)
            assert writing.wait(TIMEOUT_S)
            seen = []
            reader = threading.Thread(target=lambda: seen.append(_served(infer)))
            reader.start()
            reader.join(0.2)
            assert reader.is_alive() and not seen  # the lookup waits for the whole delta
            release.set()
            reader.join(TIMEOUT_S)
        finally:
            delta_module.apply_rows = original
            release.set()
        assert len(seen) == 1
        np.testing.assert_array_equal(seen[0], after)
        assert not np.array_equal(before, after)
        infer.close()


CHILD = """
import hashlib, sys
from persia.embedding.config import parse_global_config
from runtime._jobs import Net, make_batches, run, to_persia, train_ctx

deltas, ckpt = sys.argv[1], sys.argv[2]
config = parse_global_config({"embedding_parameter_server_config": {
    "enable_incremental_update": True, "incremental_dir": deltas,
    "incremental_buffer_size": 10**9}})
probe = to_persia(make_batches(1, batch_size=64, seed=11)[0], requires_grad=False)
with train_ctx(Net(), global_config_file=config) as ctx:
    run(ctx, make_batches(6))
    ctx.dump_embedding(ckpt)
    print("ready", flush=True)
    for i in range(1, 1000):
        run(ctx, make_batches(4, seed=100 + i))
        ctx.runtime.flush()
        seq = ctx._delta_writer.flush().seq
        summed = ctx.runtime.lookup(probe, False, 0, None).lookup.summed
        print(seq, hashlib.sha256(summed.tobytes()).hexdigest(), flush=True)
        sys.stdin.readline()  # the parent says when to go on (or kills this process)
"""


def test_a_training_process_followed_then_killed(tmp_path):
    """Training in another process: each delta it writes reaches this process's InferCtx with
    the rows training had when it wrote it; after the training process is killed (SIGKILL)
    inference stays at its last complete delta, with no error, and keeps serving."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests")])
    deltas, ckpt = tmp_path / "deltas", tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(deltas), str(ckpt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        infer = InferCtx(
            [],
            embedding_checkpoint=ckpt,
            embedding_config_file=embedding_file(),
            incremental_dir=deltas,
            poll_interval_s=0.02,
        )
        for expected_seq in (1, 2, 3):
            seq, digest = child.stdout.readline().split()
            assert int(seq) == expected_seq
            _wait_for(infer, expected_seq)
            assert hashlib.sha256(_served(infer).tobytes()).hexdigest() == digest
            if expected_seq < 3:
                child.stdin.write("\n")
                child.stdin.flush()
        child.kill()
        child.wait(TIMEOUT_S)
        time.sleep(0.1)  # a few polls after the kill
        fresh = infer.freshness()
        assert fresh["last_delta_seq"] == 3 and fresh["last_error"] is None
        assert hashlib.sha256(_served(infer).tobytes()).hexdigest() == digest
        infer.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_rows_evicted_by_training_read_as_zeros_when_served(tmp_path):
    """A training store at capacity evicts; the next delta removes those rows from InferCtx."""
    from persia.embedding.data import IDTypeFeature, PersiaBatch

    deltas, ckpt = tmp_path / "deltas", tmp_path / "ckpt"
    server = {
        "capacity": 24,  # fewer rows than the 50 IDs the batches touch: training evicts
        "enable_incremental_update": True,
        "incremental_dir": str(deltas),
        "incremental_buffer_size": 10**9,
    }
    config = parse_global_config({"embedding_parameter_server_config": server})
    with train_ctx(Net(), global_config_file=config) as train:
        run(train, make_batches(2))
        train.dump_embedding(ckpt)
        # a serving store with room for every row: only the deltas' removals drop rows
        roomy = parse_global_config({"embedding_parameter_server_config": {"capacity": 10**6}})
        infer = InferCtx(
            [],
            embedding_checkpoint=ckpt,
            embedding_config_file=embedding_file(),
            global_config_file=roomy,
            incremental_dir=deltas,
            poll_interval_s=0.02,
        )
        every = np.arange(30, dtype=np.uint64)  # each ID of slot a, one per sample
        probe = PersiaBatch(
            [
                IDTypeFeature.from_columnar("a", every, np.ones(30, np.int64)),
                IDTypeFeature.from_columnar("b", np.zeros(0, np.uint64), np.zeros(30, np.int64)),
            ],
            requires_grad=False,
        )
        before = infer.get_embedding_from_data(probe).lookup.summed[:, :4]
        run(train, make_batches(6, seed=3))
        _wait_for(infer, _flush(train))
        trained = train.runtime.lookup(probe, False, 0, None).lookup.summed[:, :4]
        served = infer.get_embedding_from_data(probe).lookup.summed[:, :4]
        np.testing.assert_array_equal(served, trained)
        gone = before.any(axis=1) & ~trained.any(axis=1)
        assert gone.any()  # rows served before, evicted by training, now zeros on both sides
        assert sum(infer.get_embedding_size()) == sum(train.get_embedding_size())
        infer.close()
