"""A job through PERSIA's API with PERSIA's ``metrics_config`` in ``global_config.yml`` and
``PERSIA_METRICS_GATEWAY_ADDR`` set (how a PERSIA user turns metrics on), writing incremental
deltas that a reader then loads; then a few requests to a served export, reported as a server
reports them. Run by tests/telemetry/test_prometheus.py as a script:

    python _api_job.py WORKDIR JOB_NAME EXPORT_DIR

Prints one JSON line: what it trained and served.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from runtime._jobs import Net, make_batches, run  # noqa: E402

from persia import telemetry  # noqa: E402
from persia.ctx import TrainCtx  # noqa: E402
from persia.embedding.optim import Adagrad  # noqa: E402
from persia.store.delta import DeltaReader  # noqa: E402


def main(work: Path, job_name: str, export_dir: str) -> None:
    inc = work / "inc"
    (work / "global_config.yml").write_text(
        yaml.safe_dump(
            {
                "common_config": {
                    "metrics_config": {
                        "enable_metrics": True,
                        "push_interval_seconds": 1,
                        "job_name": job_name,
                    }
                },
                "embedding_parameter_server_config": {
                    "capacity": 100000,
                    "enable_incremental_update": True,
                    "incremental_buffer_size": 40,
                    "incremental_dir": str(inc),
                },
            }
        )
    )
    (work / "embedding_config.yml").write_text(
        yaml.safe_dump(
            {
                "feature_index_prefix_bit": 12,
                "slots_config": {"a": {"dim": 4}, "b": {"dim": 4, "pooling": "mean"}},
            }
        )
    )
    model = Net()
    with TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=str(work / "embedding_config.yml"),
        global_config_file=str(work / "global_config.yml"),
    ) as ctx:
        losses = run(ctx, make_batches(40), staleness=4)
        time.sleep(2.5)  # two pushes while the delta writer is running (its lag is a gauge)
        store = ctx.runtime.store
        reader = DeltaReader(inc)
        from persia.store import ShardedStore

        follower = ShardedStore(1, 100000, store.optimizer, dims=[4])
        applied = reader.apply_pending(follower)

    # a served model, timed as a server times its requests
    from persia.serving import load

    predictor = load(export_dir)
    rec = telemetry.current()
    rec.serving_model_time(Path(export_dir).stat().st_mtime)
    job = yaml.safe_load((ROOT / "examples/adult_income/job.yaml").read_text())
    columns = job["data"]["columns"]
    with gzip.open(ROOT / "examples/adult_income/data/adult.data.gz", "rt") as f:
        rows = [
            dict(zip(columns, (v.strip() for v in line), strict=True))
            for line, _ in zip(csv.reader(f), range(4), strict=False)
        ]
    from persia.server._core import record

    record("predict", "422", 0.0)  # an answer to a bad request: counted, no latency or samples
    served = 0
    for _ in range(20):
        t0 = time.perf_counter()
        out = predictor.predict(rows)
        record("predict", "200", time.perf_counter() - t0, len(rows))  # as the server records
        served += len(out)
        time.sleep(0.05)
    time.sleep(1.5)
    telemetry.shutdown()  # the last push
    print(json.dumps({"batches": len(losses), "deltas_applied": len(applied), "served": served}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
