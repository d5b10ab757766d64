"""One local Ray cluster (2 CPUs) shared by every Ray test of the session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install .[ray])")
    from persia.backends.ray.backend import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
