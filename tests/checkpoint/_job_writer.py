"""Writes job checkpoints in a loop until killed; run by the kill test of test_job.py.

Usage: ``python _job_writer.py DIRECTORY``. Generation ``seq`` holds rows whose values all equal
``seq`` and position ``{"batch": seq}``, so a reader can check it loaded one whole checkpoint.
Prints ``ready`` once imports are done and ``committed SEQ`` after each dump returned.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> None:
    from persia import checkpoint
    from persia.embedding.optim import Adam
    from persia.errors import CheckpointError
    from persia.store import ShardedStore

    directory = sys.argv[1]
    try:
        seq = int(checkpoint.read(directory).position["batch"])
    except CheckpointError:
        seq = 0
    store = ShardedStore(3, 100_000, Adam(lr=0.1), dims=[8, 16])
    keys = np.arange(20_000, dtype=np.uint64)
    print("ready", flush=True)
    while True:
        seq += 1
        for dim, part in ((8, keys[::2]), (16, keys[1::2])):
            where = store.shard_of(part)
            for s, shard in enumerate(store.shards):
                sel = part[where == s]
                values = np.full((sel.size, dim), float(seq), dtype=np.float32)
                state = np.full((sel.size, Adam(lr=0.1).state_width(dim)), seq, np.float32)
                shard.import_rows(dim, sel, values, state)
        checkpoint.dump(directory, store, position={"batch": seq}, keep=seq % 3)
        print(f"committed {seq}", flush=True)


if __name__ == "__main__":
    main()
