"""One local two-node Slurm cluster per test session (started lazily, stopped at the end)."""
from __future__ import annotations

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    try:
        c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as err:
        pytest.skip(f"no Slurm here: {err}")
    yield c
    c.stop()
