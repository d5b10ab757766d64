"""The store's builders: an :class:`~persia.embedding.spec.EmbeddingSpec` -> the keyword arguments
of a :class:`~persia.store.Shard` or :class:`~persia.store.ShardedStore`, or the store itself.

Every backend builds its parameter servers from these (the embedded store, the Ray backend's
actors, ``persia-launcher embedding-parameter-server``), so a shard holds the same rows with the
same optimizer, initialisation, admission, seed and weight bound wherever it runs.
"""

from __future__ import annotations

from typing import Any

from persia.embedding.optim import SGD, EmbeddingOptimizer, build_optimizer
from persia.embedding.spec import EmbeddingSpec
from persia.errors import ConfigError
from persia.store.config import Admission, Uniform
from persia.store.disk import DiskTierConfig
from persia.store.sharded import ShardedStore
from persia.utils import embedding_seed

__all__ = ["store_optimizer", "store_options", "shard_options", "build_store"]


def store_optimizer(spec: EmbeddingSpec) -> EmbeddingOptimizer:
    """The optimizer the spec names; an SGD placeholder when it names none (an evaluation store
    adopts a checkpoint's optimizer)."""
    if spec.optimizer is None:
        return SGD(lr=0.01)
    return build_optimizer(spec.optimizer, spec.optimizer_args)


def store_options(spec: EmbeddingSpec) -> dict[str, Any]:
    """Keyword arguments of the job's whole store (a ``ShardedStore`` without ``num_shards``):
    capacity, optimizer, init, admission, seed (:func:`persia.utils.embedding_seed` unless the
    spec gives one), weight bound, dims, row dtype per dim and rounding."""
    low, high = spec.init
    return {
        "capacity": spec.capacity,
        "optimizer": store_optimizer(spec),
        "init": Uniform(float(low), float(high)),
        "admission": Admission(
            probability=float(spec.admit_probability), min_count=int(spec.admit_min_count)
        ),
        "seed": embedding_seed() if spec.seed is None else spec.seed,
        "weight_bound": float(spec.weight_bound),
        "dims": list(spec.dims),
        "row_dtype": spec.row_dtypes,
        "rounding": spec.row_rounding,
    }


def shard_options(spec: EmbeddingSpec, num_shards: int) -> dict[str, Any]:
    """Keyword arguments of one :class:`~persia.store.Shard` of ``num_shards``: as
    :func:`store_options` with the capacity split among them (as ``ShardedStore`` splits it).

    Raises:
        ConfigError: the spec asks for a disk tier (only the embedded store has one yet)."""
    if spec.disk_tier_dir is not None:
        raise ConfigError(
            [
                "embedding_parameter_server_config.disk_tier_dir: the disk tier is supported by "
                "the embedded (local) backend only, not by parameter servers in their own "
                "processes (the Ray backend, persia-launcher); unset it"
            ],
            source="disk tier",
        )
    return {**store_options(spec), "capacity": spec.shard_capacity(num_shards)}


def build_store(spec: EmbeddingSpec, num_shards: int | None = None) -> ShardedStore:
    """The embedded store: ``num_shards`` (default ``spec.shards``) shards holding
    ``spec.capacity`` rows in all; it adopts a checkpoint's optimizer when the spec names none."""
    return ShardedStore(
        num_shards=spec.shards if num_shards is None else num_shards,
        adopt_optimizer=spec.optimizer is None,
        disk_tier=(
            None
            if spec.disk_tier_dir is None or spec.disk_tier_capacity is None
            else DiskTierConfig(spec.disk_tier_dir, spec.disk_tier_capacity)
        ),
        **store_options(spec),
    )
