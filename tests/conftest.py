import os
from pathlib import Path

# Compiled numba kernels are cached in the checkout (same as the Makefile), before persia imports numba.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache"))

# TrainCtx(nn_threads="auto") picks torch's thread count by timing the first steps: two runs of
# one job could then differ in the last bits. Tests compare runs bit for bit, so the suite keeps
# torch's count; tests/runtime/test_nn_threads.py covers "auto" (and subprocesses inherit this).
os.environ.setdefault("PERSIA_NN_THREADS", "keep")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _embedding_seed_is_per_test():
    """``persia.utils.setup_seed`` sets the process-wide seed of new embedding rows; start every
    test from the default (0) and restore it after, so results do not depend on test order."""
    import persia.utils

    saved = persia.utils._EMBEDDING_SEED
    persia.utils._EMBEDDING_SEED = 0
    yield
    persia.utils._EMBEDDING_SEED = saved
