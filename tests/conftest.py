import os
from pathlib import Path

# Compiled numba kernels are cached in the checkout (same as the Makefile), before persia imports numba.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache"))
