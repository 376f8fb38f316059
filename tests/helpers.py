"""Shared test helpers: launching ``plt_train.train`` under torchrun, reading its metrics,
composing configs.  (Fixtures live in ``conftest.py``; plain functions live here, imported
by name, so a test never imports another test module or ``conftest``.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from plt_train.training import loggers

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Small, fast runs: the debug model, no wandb, no validation unless asked, and the MFU
# denominator given (measuring it takes half a second of matmuls in every process).
DEBUG_ARGS = ["experiment=debug", "logging.wandb=false", "train.eval_interval=0",
              "checkpoint.save_at_end=false", "checkpoint.save_interval=0",
              "logging.peak_tflops=1"]

# One change to the dense GPT baseline (the default config is the EP=2 flagship).
DENSE_BASELINE = ["model=small", "moe=dense", "parallel=data"]


def compose_run(overrides: list[str]):
    """The ``RunConfig`` ``plt_train.train`` would run with these Hydra overrides."""
    from plt_train.config.store import compose_config

    return compose_config(overrides)


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


def run_process_group(cmd: list[str], env: dict, timeout: int,
                      cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session, output through files (a stray child holding a pipe
    cannot block us), and kill whatever is left of the session afterwards.

    Past ``timeout`` the session gets SIGTERM first (torchrun passes it on, and each rank of
    ``plt_train.train`` writes its stacks to ``<run_dir>/stacks_rank<R>.log``), then
    SIGKILL; the test fails with the output and those stacks, so a rare hang leaves evidence
    in the report rather than in a temporary directory that is gone by the time anyone looks."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                             start_new_session=True)
        timed_out = ""
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = _processes_of_session(p.pid)  # who was still there
            _signal_session(p.pid, signal.SIGTERM)
            try:
                rc = p.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                rc = None
        finally:
            _signal_session(p.pid, signal.SIGKILL)
            p.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        raise AssertionError(f"timed out after {timeout} s (exit {rc} after SIGTERM): "
                             f"{' '.join(map(str, cmd))}\n--- stdout\n{stdout[-3000:]}\n"
                             f"--- stderr\n{stderr[-6000:]}\n--- still running at the "
                             f"timeout\n{timed_out}\n{_stacks_of(cmd)}")
    return subprocess.CompletedProcess(cmd, rc, stdout, stderr)


STOP_GRACE_S = 20  # torchrun's own grace between its SIGTERM and SIGKILL is 30 s


def _signal_session(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _processes_of_session(sid: int) -> str:
    ps = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,args", "-s", str(sid)],
                        capture_output=True, text=True)
    return ps.stdout or ps.stderr or "(ps printed nothing)"


def _stacks_of(cmd: list[str]) -> str:
    """The ``stacks_rank*.log`` a stopped ``plt_train.train`` left in its ``run_dir=``."""
    run_dirs = [Path(str(a).split("=", 1)[1]) for a in cmd if str(a).startswith("run_dir=")]
    logs = sorted(p for d in run_dirs for p in d.glob("stacks_rank*.log"))
    return "\n".join(f"--- {p}\n{p.read_text()[-6000:]}" for p in logs) or "(no stacks files)"


def one_process_env(**extra: str) -> dict:
    """``os.environ`` (and ``extra``) for a one-process tool or script started from a test,
    without the process-group variables an in-process test left behind (``init_distributed``
    sets ``MASTER_PORT`` to its store's port, which may still be taken): the tool picks its
    own."""
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def torchrun_script(script: str, arg: str, nproc: int,
                    timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=nproc script arg`` from the repository root;
    fails the test on error."""
    cmd = TORCHRUN + ["--standalone", f"--nproc-per-node={nproc}", script, arg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = run_process_group(cmd, env, timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def train_many(root: Path, runs: dict, nproc: int, timeout: int = 600) -> dict[str, str]:
    """Several trainings, ``{run_dir: Hydra overrides}``, one after another in ONE torchrun
    launch (``tests/distributed/train_many.py``: a launch's start-up, ~5 s, paid once);
    returns ``{run_dir: the logging rank's output of that run}``."""
    spec = Path(root) / "runs.json"
    spec.write_text(json.dumps({str(k): list(v) for k, v in runs.items()}))
    proc = torchrun_script("tests/distributed/train_many.py", str(spec), nproc, timeout)
    out, current = {str(k): [] for k in runs}, None
    for line in proc.stdout.splitlines():
        if line.startswith("[train_many] "):
            current = line.removeprefix("[train_many] ")
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def read_metrics(run_dir: Path, kind: str | None = "train") -> list[dict]:
    """The run's rows of ``kind`` (None: all), through the project's reader; the tests
    mostly want the training rows."""
    return loggers.read_metrics(run_dir, kind)


def losses_by_step(run_dir: Path, kind: str = "train") -> dict[int, float]:
    """Last logged loss per step (a resumed run re-logs the steps it repeats); ``kind``
    "valid" for the validation losses."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, kind)}


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def traceback_frames(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip().startswith('File "')]


def assert_clean_failure(proc, *words):
    """Our message is there; no traceback frame from megatron-core or from our own code.
    (torchrun itself prints a ChildFailedError summary, with its own frames, for any failed
    worker.)"""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for w in words:
        assert w in text, text[-3000:]
    bad = [f for f in traceback_frames(text) if "megatron" in f or "plt_train" in f]
    assert not bad, bad


def checkpoint_tensors(step_dir: Path, tmp_path: Path) -> dict:
    """A saved checkpoint's tensors by dotted name, read with torch's own DCP reader
    (megatron's torch_dist format is DCP underneath), without building a model."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
    walk("", torch.load(out, weights_only=False))
    return flat
