"""Every import path and public name a script can use today keeps working: PERSIA's module paths
(scripts written for PERSIA import them unchanged) and persia's own documented ones. Moving code
between floors must not break any of them (names may only be added)."""

from __future__ import annotations

import importlib

import pytest

#: module -> the public names it provides (PERSIA's paths first).
PUBLIC: dict[str, list[str]] = {
    # PERSIA's Python API
    "persia.ctx": [
        "BaseCtx",
        "DataCtx",
        "EmbeddingCtx",
        "InferCtx",
        "PreprocessMode",
        "TrainCtx",
        "cnt_ctx",
        "eval_ctx",
    ],
    "persia.data": ["DataLoader", "IterableDataset", "IterableDatasetBase", "StreamingDataset"],
    "persia.distributed": [
        "BaguaDistributedOption",
        "DDPOption",
        "DistributedBaseOption",
        "get_default_distributed_option",
    ],
    "persia.version": ["__version__"],
    "persia.service": ["get_embedding_worker_services"],
    "persia.embedding": ["EmbeddingConfig", "get_default_embedding_config"],
    "persia.embedding.data": [
        "IDTypeFeature",
        "IDTypeFeatureWithSingleID",
        "Label",
        "NdarrayDataBase",
        "NonIDTypeFeature",
        "PersiaBatch",
    ],
    "persia.embedding.optim": ["Adagrad", "Adam", "EmbeddingOptimizer", "SGD"],
    "persia.env": [
        "get_local_rank",
        "get_rank",
        "get_replica_index",
        "get_replica_size",
        "get_world_size",
        "reload_env",
        "set_env",
    ],
    "persia.utils": ["dump_yaml", "embedding_seed", "find_free_port", "load_yaml", "setup_seed"],
    "persia.logger": [
        "COLOR_FORMATTER",
        "DEFAULT_LOGGER_NAME",
        "FILE_LOG_FORMAT",
        "FORMATTER",
        "LOG_COLOR",
        "LOG_FORMAT",
        "STREAM_LOG_FORMAT",
        "levelFilter",
        "get_default_logger",
        "get_logger",
        "reset_warn_once",
        "setLogger",
        "set_logger",
        "warn_once",
    ],
    # persia's own documented paths
    "persia": [
        "BackendError",
        "BatchError",
        "CheckpointError",
        "ConfigError",
        "PersiaError",
        "StoreError",
        "__version__",
    ],
    "persia.errors": [
        "BackendError",
        "BatchError",
        "CheckpointError",
        "ConfigError",
        "PersiaError",
        "StoreError",
    ],
    "persia.config": [
        "CheckpointingConfig",
        "CommonConfig",
        "DEFAULT_FEATURE_INDEX_PREFIX_BIT",
        "EmbeddingFileConfig",
        "EmbeddingParameterServerConfig",
        "EmbeddingWorkerConfig",
        "GlobalConfig",
        "HashStackConfig",
        "InferConfig",
        "MetricsConfig",
        "POOLINGS",
        "SlotConfig",
        "load_embedding_config",
        "load_global_config",
        "parse_embedding_config",
        "parse_global_config",
    ],
    "persia.checkpoint": [
        "DumpReport",
        "JOB_FORMAT",
        "JobCheckpoint",
        "KIND",
        "dump",
        "is_job_checkpoint",
        "read",
        "restore_store",
    ],
    "persia.serving": [
        "KIND",
        "Predictor",
        "SERVING_FORMAT",
        "export",
        "export_from_checkpoint",
        "export_from_ctx",
        "load",
        "serving_meta",
    ],
    "persia.store": [
        "Admission",
        "EmbeddingTable",
        "Normal",
        "Shard",
        "ShardedStore",
        "Uniform",
        "shard_of",
    ],
    "persia.datasets": ["CRITEO_CARDINALITIES", "SyntheticStream"],
    "persia.hashing": [
        "FNV_OFFSET",
        "FNV_PRIME",
        "hash_ints",
        "hash_strings",
        "hash_value",
        "mix64_py",
    ],
    "persia.metrics": ["log_loss", "roc_auc"],
    "persia.job.config": ["JobConfig", "load_job"],
    "persia.job.runner": ["run_job", "summary_lines", "dumps"],
    # docs/cluster.md's paths of the Ray backend's settings (old and new)
    "persia.cluster.ray_backend": ["ClusterConfig"],
    "persia.cluster.ray_recovery": ["RecoveryConfig"],
    "persia.backends.ray": ["ClusterConfig", "RecoveryConfig"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert missing == []
    exported = getattr(mod, "__all__", None)
    if exported is not None and module not in ("persia.job.config", "persia.job.runner"):
        assert set(PUBLIC[module]) <= set(exported) | {"__version__"}


def test_old_paths_are_the_same_objects():
    import persia.config
    from persia.backends.ray.backend import ClusterConfig
    from persia.backends.ray.recovery import RecoveryConfig
    from persia.cluster import ray_backend, ray_recovery
    from persia.embedding import config

    assert ray_backend.ClusterConfig is ClusterConfig
    assert ray_recovery.RecoveryConfig is RecoveryConfig
    assert persia.config.parse_embedding_config is config.parse_embedding_config
