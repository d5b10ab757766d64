"""The Adult example's data loader (PERSIA's shape): reads the training split and sends it to the
NN workers as PersiaBatch objects with ``DataCtx().send_data``.

Run by the Procfile line ``persia-launcher data-loader data_loader.py --replica-index 0
--replica-size 1``. With several loaders (``--replica-size n``), loader ``i`` sends batches
``i, i + n, i + 2n, ...`` of the one shuffled order, so together they send each batch once.
"""

from __future__ import annotations

from adult import batches, load

from persia.ctx import DataCtx
from persia.env import get_replica_index, get_replica_size
from persia.logger import get_logger

logger = get_logger("data_loader")

BATCH_SIZE = 256
SEED = 3


def main() -> None:
    import numpy as np

    train, _ = load()
    order = np.random.default_rng(SEED).permutation(len(train))
    index, size = get_replica_index(), get_replica_size()
    sent = 0
    with DataCtx() as ctx:
        for i, batch in enumerate(batches(train, BATCH_SIZE, requires_grad=True, order=order)):
            if i % size == index:
                ctx.send_data(batch)
                sent += 1
    logger.info(f"data loader {index} of {size}: sent {sent} batches")


if __name__ == "__main__":
    main()
