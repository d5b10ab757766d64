"""Serving: export a trained job (TorchScript dense model, embedding rows, request recipe) and
load it to predict on raw rows, with persia alone (no job file, no training script).

Example (the test ``tests/serving/test_serving.py`` runs the same)::

    persia train examples/adult_income/job.yaml --export /tmp/adult-export
    python -c "import persia.serving as s; print(s.load('/tmp/adult-export').predict(
        [{'workclass': 'Private', 'education': 'Bachelors', 'age': 39, ...}]))"

:func:`open_model` is the one entry point for serving both kinds of model: such an export, or a
checkpoint written by the PERSIA API (``TrainCtx.dump_checkpoint(dir, with_jit_model=True)``),
which can also follow the training job's deltas and new checkpoints.

See docs/serving.md for the layout and the guarantees.
"""

from persia.serving.export import (
    KIND,
    SERVING_FORMAT,
    export,
    export_from_checkpoint,
    export_from_ctx,
    run_and_export,
    serving_meta,
)
from persia.serving.model import (
    CheckpointModel,
    ExportModel,
    RowsNotSupported,
    ServedModel,
    open_model,
)
from persia.serving.predictor import Predictor, load

__all__ = [
    "CheckpointModel",
    "ExportModel",
    "RowsNotSupported",
    "ServedModel",
    "open_model",
    "KIND",
    "SERVING_FORMAT",
    "Predictor",
    "export",
    "export_from_checkpoint",
    "export_from_ctx",
    "load",
    "run_and_export",
    "serving_meta",
]
