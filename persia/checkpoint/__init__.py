"""Job checkpoints that survive failures: full dumps while training, re-sharding on load.

See :mod:`persia.checkpoint.job` for the layout and the guarantees; incremental deltas are in
:mod:`persia.store.delta`, export for serving in :mod:`persia.serving`.
"""

from persia.checkpoint.job import (
    JOB_FORMAT,
    KIND,
    DumpReport,
    JobCheckpoint,
    dump,
    is_job_checkpoint,
    read,
    restore_store,
    restore_with_deltas,
)

__all__ = [
    "JOB_FORMAT",
    "KIND",
    "DumpReport",
    "JobCheckpoint",
    "dump",
    "is_job_checkpoint",
    "read",
    "restore_store",
    "restore_with_deltas",
]
