"""Several NN workers on the Ray backend: DDP over gloo, rank-strided data, shared PS actors."""

from __future__ import annotations

from pathlib import Path

import pytest

from persia.backends.ray.backend import ClusterConfig
from persia.errors import CheckpointError, ConfigError
from persia.job.runner import _rank_strided

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "examples" / "adult_income" / "job.yaml"


def test_rank_strided_batches_partition_the_stream_and_drop_the_short_tail():
    items = list(range(11))
    parts = [list(_rank_strided(iter(items), r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 9, 10: a group of 2 < 3, dropped
    assert list(_rank_strided(iter(items), 0, 1)) == items


def test_cluster_config_checks_the_nn_worker_fields():
    with pytest.raises(ConfigError) as info:
        ClusterConfig(num_nn_workers=0, nn_num_cpus=-1, attach_ps=True)
    assert len(info.value.problems) == 3


def test_adult_job_with_two_parameter_servers_and_two_ddp_nn_workers(ray_cluster):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    job = load_job(ADULT, ["training.backend=ray", "training.progress=none"])
    result = run_job(job, cluster=ClusterConfig(num_ps=2, num_nn_workers=2, timeout_s=120))
    print("two NN workers:", {k: result[k] for k in ("test_auc", "wall_s", "train_samples")})
    assert result["test_auc"] >= 0.90
    workers = result["nn_workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    # rank-strided halves of one epoch of adult.data (32 561 rows, batch 128: 255 batches,
    # the odd last one dropped)
    assert [w["train_batches"] for w in workers] == [127, 127]
    assert result["train_samples"] == 254 * 128
    # both ranks evaluated the same (allreduced) model on the same shared embeddings
    assert workers[0]["test_auc"] == pytest.approx(workers[1]["test_auc"], abs=1e-6)
    assert all(w["staleness_max"] <= 7 for w in workers)  # staleness 8: at most 7 behind
    assert result["embedding_rows"] > 0


def test_multi_worker_settings_it_cannot_honour_are_refused(ray_cluster, tmp_path):
    from persia.job.config import load_job
    from persia.job.runner import run_job

    with pytest.raises(ConfigError, match="--recover works with one NN worker"):
        run_job(load_job(ADULT, ["training.backend=ray"]),
                cluster=ClusterConfig(num_nn_workers=2, recover=True))  # fmt: skip
    with pytest.raises(CheckpointError, match="does not exist"):
        run_job(load_job(ADULT, ["training.backend=ray"]),
                cluster=ClusterConfig(num_nn_workers=2), resume=tmp_path / "none")  # fmt: skip


def test_two_nn_workers_checkpoint_and_resume(ray_cluster, tmp_path):
    """The ranks evaluate during training and rank 0 writes the checkpoint of a 2-worker job (dense state
    without DDP's prefix, the data position, the worker count); 2 workers resume from it and
    train the rest of the epoch; 1 worker may not resume it (its position counts each rank's
    own batches)."""
    from persia import checkpoint
    from persia.job.config import load_job
    from persia.job.runner import run_job
    from persia.serving import run_and_export

    ckpt = tmp_path / "ckpt"
    common = ["training.backend=ray", "training.progress=none", f"training.checkpoint_dir={ckpt}"]
    cluster = ClusterConfig(num_ps=2, num_nn_workers=2, timeout_s=120)
    # 100 batches of 128: 50 per rank, a checkpoint after 25 of them and one at the end
    first = load_job(ADULT, common + ["training.max_samples=12800", "training.eval_max_samples=4096",
                                      "training.checkpoint_every_batches=25",
                                      "training.eval_every_batches=25"])  # fmt: skip
    result = run_job(first, cluster=cluster)
    assert [w["train_batches"] for w in result["nn_workers"]] == [50, 50]
    # evaluated (by both ranks, between barriers) after each rank's batches 25 and 50
    assert [e["batch"] for e in result["evals"]] == [25, 50]
    assert all(0.5 < e["test_auc"] <= 1.0 for e in result["evals"])
    saved = checkpoint.read(ckpt)
    assert saved.position["nn_workers"] == 2
    assert (saved.position["epoch"], saved.position["batch"]) == (0, 50)
    assert saved.position["samples"] == 50 * 128
    state = saved.dense_model_state()
    assert state and not any(k.startswith("module.") for k in state)
    assert saved.meta["rows"] == result["embedding_rows"]

    served = tmp_path / "served_at_end"
    resumed = run_and_export(load_job(ADULT, common), served, cluster=cluster, resume=ckpt)
    assert resumed["export_dir"] == str(served)
    # the epoch's 255 batches: 127 per rank, 50 of them already trained
    assert [w["train_batches"] for w in resumed["nn_workers"]] == [77, 77]
    assert resumed["resumed_from"]["batch"] == 50
    assert resumed["test_auc"] >= 0.90
    assert checkpoint.read(ckpt).position["batch"] == 127

    with pytest.raises(CheckpointError, match="written by 2 NN worker"):
        run_job(load_job(ADULT, ["training.progress=none"]), resume=ckpt)

    # rank 0's export at the end and an export of the 2-worker checkpoint serve the same model
    import numpy as np

    import persia.serving
    from persia.serving.export import export_from_checkpoint

    export_from_checkpoint(tmp_path / "served", load_job(ADULT, []), ckpt)
    request = [
        {"workclass": "Private", "education": "Bachelors", "marital_status": "Never-married",
         "occupation": "Adm-clerical", "relationship": "Not-in-family", "race": "White",
         "gender": "Male", "native_country": "United-States", "age": 39, "education_num": 13,
         "capital_gain": 2174, "capital_loss": 0, "hours_per_week": 40}
    ]  # fmt: skip
    a = persia.serving.load(served).predict(request)
    b = persia.serving.load(tmp_path / "served").predict(request)
    assert a.shape == (1,) and 0.0 < float(a[0]) < 1.0
    np.testing.assert_array_equal(a, b)


def test_persia_train_options_become_the_cluster_config():
    import argparse

    from persia.cli.train import add_parser, cluster_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "j.yaml", "--num-nn-workers", "3", "--nn-cpus", "0.25"])
    cfg = cluster_config(args, "ray")
    assert (cfg.num_nn_workers, cfg.nn_num_cpus) == (3, 0.25)
    assert cluster_config(parser.parse_args(["train", "j.yaml"]), "ray").num_nn_workers == 1
    with pytest.raises(ConfigError, match="--num-nn-workers need --backend ray"):
        cluster_config(parser.parse_args(["train", "j.yaml", "--num-nn-workers", "2"]), "local")
    assert cluster_config(parser.parse_args(["train", "j.yaml"]), "ray").recover is False
    assert cluster_config(parser.parse_args(["train", "j.yaml", "--recover"]), "ray").recover
    with pytest.raises(ConfigError, match="--recover need --backend ray"):
        cluster_config(parser.parse_args(["train", "j.yaml", "--recover"]), "local")
