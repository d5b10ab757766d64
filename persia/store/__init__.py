"""The parameter-server core: table, eviction, sharding, checkpoint files."""
