"""Fixtures, and the markers each test folder gets (plain helpers: ``tests/helpers.py``)."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter (plt_train/kernels/__init__.py).
# Triton reads this when a kernel is decorated, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One embedded-corpus build per test session, shared by every test (and subprocess)."""
    path = os.environ.get("PLT_TRAIN_TEST_CACHE") or str(tmp_path_factory.mktemp("plt_cache"))
    os.environ["PLT_TRAIN_CACHE"] = path
    return path


@pytest.fixture(scope="module")
def one_rank():
    """A one-process megatron group for in-process model tests; yields the device."""
    from plt_train.runtime import destroy_distributed, detect_device, init_distributed, set_seed

    dev = detect_device()
    init_distributed(dev)
    set_seed(0)
    yield dev
    destroy_distributed()


# Markers by where a test lives (registered in pytest.ini).  `make test` runs them all;
# `make test-unit` leaves out the ones that start process groups, clusters or benchmarks.
_MARKERS_BY_PATH = {
    "distributed/": "distributed",  # torchrun launches: parity, resume, sweeps
    "slurm/": "slurm",  # a real two-node Slurm cluster on this machine
    "cluster/": "cluster",  # network namespaces joined by shaped links, on this machine
    "gpu/": "gpu",  # skipped without CUDA
    "scripts/": "slow",  # the benchmark scripts, end to end
    "test_main_job.py": "distributed",
    "test_cli_errors.py": "distributed",
    "inference/test_generate_cli.py": "distributed",
}


def pytest_collection_modifyitems(config, items):
    root = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        rel = os.path.relpath(str(item.path), root).replace(os.sep, "/")
        for prefix, marker in _MARKERS_BY_PATH.items():
            if rel.startswith(prefix):
                item.add_marker(getattr(pytest.mark, marker))
