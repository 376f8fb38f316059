"""The package stands on its own: a wheel carries the Hydra presets, the console scripts work
from any directory after a plain (non-editable) install, and a same-named ``kernels`` package
on the path cannot shadow ours."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

GROUPS = ("checkpoint", "data", "experiment", "logging", "model", "moe", "optim", "parallel",
          "train")


def _run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip wheel --no-deps .`` from a copy of the repository's files (pip builds in place;
    git's list: tracked and not ignored), then the wheel installed, without its dependencies,
    into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"),
          str(src)], cwd=root)
    (wheel,) = (root / "dist").glob("plt_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "plt_train/configs/config.yaml" in names
    for group in GROUPS:
        assert any(n.startswith(f"plt_train/configs/{group}/") and n.endswith(".yaml")
                   for n in names), group
    assert not any(n.startswith("kernels/") for n in names)  # no top-level `kernels`
    assert "plt_train/kernels/gswa.py" in names
    for name in ("plt_tiny_mc.yaml", "plt_tiny_mc.jsonl", "plt_tiny_gen.yaml",
                 "plt_tiny_gen.jsonl"):  # the shipped lm-eval tasks
        assert f"plt_train/evaluation/tasks/{name}" in names, name
    target = root / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
          str(wheel)], cwd=root)
    return target


def test_console_scripts_work_from_any_directory(installed, tmp_path):
    env = {"PYTHONPATH": str(installed)}
    where = _run([sys.executable, "-c", "import plt_train.config.store as s, plt_train; "
                  "print(plt_train.__file__); print(s.CONFIG_DIR)"], tmp_path, env).stdout
    package, configs = where.split()
    assert package.startswith(str(installed)) and configs == str(installed / "plt_train/configs")
    plan = _run([str(installed / "bin" / "plt-dryrun"), "--world-size", "8", "model=1b",
                 "moe=dense", "parallel=data", "train.global_batch_size=64"], tmp_path, env)
    assert "layers per pipeline stage" in plan.stdout
    job = _run([str(installed / "bin" / "plt-train"), "--cfg", "job", "experiment=debug"],
               tmp_path, env)
    assert "name: debug" in job.stdout and "hidden_size: 64" in job.stdout
    assert "usage: plt-generate" in _run([str(installed / "bin" / "plt-generate"), "--help"],
                                         tmp_path, env).stdout
    assert "usage: plt-export" in _run([str(installed / "bin" / "plt-export"), "--help"],
                                       tmp_path, env).stdout
    assert "usage: plt-eval" in _run([str(installed / "bin" / "plt-eval"), "--help"],
                                     tmp_path, env).stdout
    data = _run([sys.executable, "-c", "from plt_train.evaluation.tasks import shipped_config; "
                 "print(shipped_config('plt_tiny_mc')['dataset_kwargs']['data_files']['test'])"],
                tmp_path, env).stdout.strip()
    assert data == str(installed / "plt_train/evaluation/tasks/plt_tiny_mc.jsonl")


def test_a_same_named_kernels_package_cannot_shadow_ours(tmp_path):
    """``kernels`` is also a package on PyPI: ours is ``plt_train.kernels``."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the PyPI kernels package')\n")
    script = ("import plt_train.models.plt.attention, plt_train.models.moe.layer\n"
              "from plt_train.kernels import use_triton\n"
              "import plt_train.kernels as k; print(k.__file__)\n")
    out = _run([sys.executable, "-c", script], REPO,
               {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}).stdout
    assert out.strip().endswith(os.path.join("plt_train", "kernels", "__init__.py"))
