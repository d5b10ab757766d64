"""The parameter-server core: table, eviction, sharding, checkpoint files.

``Shard`` is one parameter server's part of the key space (an ``EmbeddingTable`` per dim behind
a lock); ``shard_of`` routes keys to shards. See docs/CONTRACTS.md.
"""

from persia.store.config import Admission, Normal, Uniform
from persia.store.shard import Shard, shard_of, split_capacity
from persia.store.table import EmbeddingTable

__all__ = [
    "Admission",
    "EmbeddingTable",
    "Normal",
    "Shard",
    "Uniform",
    "shard_of",
    "split_capacity",
]
