"""Inference-mode parameter servers (``job_type: Infer`` in ``global_config.yml``), as PERSIA's
configuration describes them: the read-only runtime of :class:`persia.ctx.InferCtx` and of
``eval_ctx`` under ``job_type: Infer``."""

from __future__ import annotations

import os

from persia import _settings
from persia.checkpoint.follow import ServingRuntime
from persia.embedding import EmbeddingConfig
from persia.embedding.config import EmbeddingFileConfig, GlobalConfig
from persia.embedding.spec import EmbeddingSpec
from persia.errors import ConfigError

__all__ = ["given_spec", "infer_sources", "serving_runtime"]


def given_spec(
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None,
    global_config: GlobalConfig,
    embedding_config: EmbeddingConfig | None = None,
) -> EmbeddingSpec | None:
    """The embedding layer of the YAML files given (as paths, parsed objects, or
    ``$PERSIA_EMBEDDING_CONFIG``); None when no embedding config is given at all (serve with the
    one the checkpoint records).

    Raises:
        ConfigError: a bad file.
    """
    from persia.embedding.config import load_spec

    if embedding_config_file is None and (
        _settings.env_path(_settings.PERSIA_EMBEDDING_CONFIG) is None
    ):
        return None
    return load_spec(embedding_config_file, global_config, embedding_config, None)


def infer_sources(
    global_config: GlobalConfig,
    embedding_checkpoint: str | os.PathLike | None,
    incremental_dir: str | os.PathLike | None,
    follow_checkpoint: bool | None,
) -> tuple[str | os.PathLike, str | os.PathLike | None, bool]:
    """What inference serves, as PERSIA's ``global_config.yml`` says unless given: the checkpoint
    (``infer_config.embedding_checkpoint``), the deltas (``incremental_dir`` when
    ``enable_incremental_update`` is on) and whether new generations are followed (default:
    while deltas are).

    Raises:
        ConfigError: no checkpoint named.
    """
    infer = global_config.common_config.infer_config
    if embedding_checkpoint is None and infer is not None:
        embedding_checkpoint = infer.embedding_checkpoint
    if embedding_checkpoint is None:
        raise ConfigError(
            "inference needs an embedding checkpoint: pass embedding_checkpoint=... or set "
            "common_config.infer_config.embedding_checkpoint in global_config.yml",
            source=global_config.source,
        )
    ps = global_config.embedding_parameter_server_config
    if incremental_dir is None and ps.enable_incremental_update:
        incremental_dir = ps.incremental_dir
    if follow_checkpoint is None:
        follow_checkpoint = incremental_dir is not None
    return embedding_checkpoint, incremental_dir, bool(follow_checkpoint)


def serving_runtime(
    embedding_config_file: str | os.PathLike | EmbeddingFileConfig | None,
    global_config: GlobalConfig,
    embedding_config: EmbeddingConfig | None = None,
    *,
    embedding_checkpoint: str | os.PathLike | None = None,
    incremental_dir: str | os.PathLike | None = None,
    follow_checkpoint: bool | None = None,
    poll_interval_s: float = 1.0,
) -> ServingRuntime:
    """The read-only runtime of inference-mode parameter servers (``job_type: Infer``), as
    PERSIA's configuration describes them: the checkpoint ``infer_config.embedding_checkpoint``
    names (or ``embedding_checkpoint``), following the deltas of ``incremental_dir`` when
    ``enable_incremental_update`` is on (or ``incremental_dir`` is given) and then, unless
    ``follow_checkpoint`` is False, the new generations of the checkpoint directory.

    Raises:
        ConfigError: no checkpoint named, a bad YAML file, or an embedding config that forms
            keys differently from the checkpoint's.
        CheckpointError: a missing, corrupt or mismatching checkpoint.
    """
    embedding_checkpoint, incremental_dir, follow_checkpoint = infer_sources(
        global_config, embedding_checkpoint, incremental_dir, follow_checkpoint
    )
    return ServingRuntime(
        embedding_checkpoint,
        given_spec(embedding_config_file, global_config, embedding_config),
        incremental_dir=incremental_dir,
        follow_checkpoint=follow_checkpoint,
        poll_interval_s=poll_interval_s,
    )
