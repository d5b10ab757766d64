"""The parameter-server core: table, eviction, sharding, checkpoint files."""

from persia.store.config import Admission, Normal, Uniform
from persia.store.shard import Shard, shard_of
from persia.store.sharded import ShardedStore
from persia.store.table import EmbeddingTable

__all__ = ["Admission", "Normal", "Uniform", "Shard", "shard_of", "ShardedStore", "EmbeddingTable"]
