"""Shared fixtures: launching ``plt_train.train`` under torchrun and reading its metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter (kernels/__init__.py).  Triton
# reads this when a kernel is decorated, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Small, fast runs: the debug model, no wandb, no validation unless asked.
DEBUG_ARGS = ["experiment=debug", "logging.wandb=false", "train.eval_interval=0",
              "checkpoint.save_at_end=false", "checkpoint.save_interval=0"]


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


def run_train(run_dir: Path, args: list[str], nproc: int = 1, env: dict | None = None,
              timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = TORCHRUN + ["--standalone", f"--nproc-per-node={nproc}", "-m", "plt_train.train",
                      f"run_dir={run_dir}"] + list(args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = run_process_group(cmd, full_env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_process_group(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session, output through files (a stray child holding a pipe
    cannot block us), and kill whatever is left of the session afterwards."""
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Last logged train loss per step (a resumed run re-logs the steps it repeats)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}
