"""The cluster backend on Ray: parameter-server shards, embedding workers, data loaders and NN
workers as Ray actors (docs/cluster.md). The only package of persia that imports Ray."""
