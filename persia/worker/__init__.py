"""The embedding worker: stateless per-batch work between the data loader, the parameter-server
shards and the NN worker (docs/ARCHITECTURE.md, "The path of one training batch", steps 2 and 5).

Forward, per batch: prefix each slot's IDs into keys, de-duplicate the keys of each embedding dim
in one hash pass, route the unique keys to their shards, gather the rows and pool them per sample
(sum, mean, 1/sqrt(n) scaling, or PERSIA's raw padded layout with a mask). Backward: turn the
per-sample gradients into one gradient per unique key (a segment sum that undoes the pooling's
scaling), count the non-finite rows (the shards skip them), and send them to the shards.

Modules: ``embedding_worker`` (:class:`~persia.worker.embedding_worker.EmbeddingWorker`),
``protocol`` (:class:`~persia.worker.protocol.EmbeddingWorkerProtocol`: what the runtime needs of
any embedding worker, this one or a backend's proxy), ``kernels`` (numba kernels, no
validation), ``pooling`` (validated wrappers: prefixing, :class:`~persia.worker.pooling.Deduper`,
pooling forward and backward).
"""
