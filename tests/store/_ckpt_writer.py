"""Writes checkpoint generations in a loop until killed; run by test_checkpoint's kill test.

Usage: ``python _ckpt_writer.py DIRECTORY ROWS``. Continues from the sequence number of the current
generation (if any). Every generation's arrays encode its sequence number ``seq`` (see
:func:`expected_arrays`), so a reader can check that what it loaded is one whole generation.
Prints ``ready`` once imports are done and ``committed SEQ`` after each ``write_generation`` returned.
"""

from __future__ import annotations

import sys

import numpy as np

KIND = "kill-test"


def expected_arrays(seq: int, rows: int) -> dict[str, np.ndarray]:
    """The arrays of generation number ``seq`` (a few MB for ``rows`` around 1e5)."""
    return {
        "values": np.full((rows, 8), float(seq), dtype=np.float32),
        "keys": np.arange(rows, dtype=np.uint64) + np.uint64(seq),
        "seq": np.array([seq], dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float64),
    }


def main() -> None:
    from persia.errors import CheckpointError
    from persia.store.checkpoint import read_current, write_generation

    directory, rows = sys.argv[1], int(sys.argv[2])
    try:
        _, meta = read_current(directory, kind=KIND)
        seq = int(meta["seq"])
    except CheckpointError:
        seq = 0
    print("ready", flush=True)
    while True:
        seq += 1
        # keep varies so that removals of old generations are killed part-way too
        write_generation(
            directory,
            expected_arrays(seq, rows),
            {"seq": seq, "rows": rows},
            kind=KIND,
            keep=seq % 3,
        )
        print(f"committed {seq}", flush=True)


if __name__ == "__main__":
    main()
