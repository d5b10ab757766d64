"""Inference-mode parameter servers on the Ray backend (job_type: Infer): actors that load their
rows of the checkpoint read-only and follow the training job's deltas; an eval_ctx starts them,
and an InferCtx given PERSIA's embedding-worker services looks up through them by job name."""

from __future__ import annotations

import time

import numpy as np
import pytest
from runtime._jobs import Net, make_batches, run, to_persia, train_ctx

from persia.backends.ray.backend import ClusterConfig
from persia.backends.ray.serving import RayServingRuntime
from persia.ctx import InferCtx, eval_ctx
from persia.embedding.config import parse_global_config
from persia.errors import PersiaError

TIMEOUT_S = 60.0  # generous: order and content are asserted, never a time bound


def _probe():
    return to_persia(make_batches(1, batch_size=64, seed=11)[0], requires_grad=False)


def _trained(ctx) -> np.ndarray:
    ctx.runtime.flush()
    return ctx.runtime.lookup(_probe(), False, 0, None).lookup.summed


def test_inference_mode_servers_load_the_checkpoint_and_follow_deltas(
    ray_cluster, tmp_path, monkeypatch
):
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
    cluster = ClusterConfig(num_ps=2, job_name="serving-test", timeout_s=TIMEOUT_S)
    runtime = None
    with train_ctx(Net(), global_config_file=train_config) as train:  # trains in this process
        run(train, make_batches(8))
        train.dump_embedding(ckpt)
        try:
            with eval_ctx(backend="ray", cluster=cluster, global_config_file=infer_config) as ectx:
                runtime = ectx.runtime
                assert isinstance(runtime, RayServingRuntime)
                served = ectx.get_embedding_from_data(_probe()).lookup.summed
                np.testing.assert_array_equal(served, _trained(train))
                assert sum(ectx.get_embedding_size()) == sum(train.get_embedding_size())
                with pytest.raises(PersiaError, match="read-only"):
                    ectx.clear_embeddings()

            # PERSIA's handler shape: embedding-worker services, no YAML: the job's servers
            monkeypatch.setenv("PERSIA_JOB_NAME", "serving-test")
            infer = InferCtx(["embedding_worker:8887"])
            np.testing.assert_array_equal(
                infer.get_embedding_from_data(_probe()).lookup.summed, served
            )

            run(train, make_batches(6, seed=1))  # training goes on: a delta
            train.runtime.flush()
            seq = train._delta_writer.flush().seq
            after = _trained(train)
            assert not np.array_equal(after, served)
            deadline = time.monotonic() + TIMEOUT_S
            while infer.freshness()["last_delta_seq"] < seq:
                assert time.monotonic() < deadline, infer.freshness()
                time.sleep(0.05)
            assert infer.freshness()["last_error"] is None
            np.testing.assert_array_equal(
                infer.get_embedding_from_data(_probe()).lookup.summed, after
            )
            infer.close()
            with eval_ctx(backend="ray", cluster=cluster, global_config_file=infer_config) as again:
                assert again.runtime is runtime  # the servers outlive a context
        finally:
            if runtime is not None:
                runtime.close()  # stops the actors the eval_ctx started


def test_a_launched_inference_server_is_found_by_job_name(ray_cluster, tmp_path, monkeypatch):
    """What persia-launcher embedding-parameter-server starts under job_type: Infer."""
    from persia.backends.ray.launch import stop_parameter_server
    from persia.backends.ray.serving import serving_options, start_serving_parameter_server

    ckpt = tmp_path / "ckpt"
    with train_ctx(Net()) as train:
        run(train, make_batches(4))
        train.dump_embedding(ckpt)
        expected = _trained(train)
    glob = parse_global_config(
        {
            "common_config": {
                "job_type": "Infer",
                "infer_config": {"embedding_checkpoint": str(ckpt)},
            }
        }
    )
    monkeypatch.setenv("PERSIA_JOB_NAME", "launched-serving")
    actor, name, _ = start_serving_parameter_server(
        0, 1, serving_options(glob, None), "127.0.0.1", num_cpus=0
    )
    try:
        assert name == "persia-launched-serving-ps-0"
        infer = InferCtx(["embedding_worker:8887"])
        np.testing.assert_array_equal(
            infer.get_embedding_from_data(_probe()).lookup.summed, expected
        )
        assert infer.freshness()["last_delta_seq"] == 0
        infer.close()
    finally:
        stop_parameter_server(actor)
