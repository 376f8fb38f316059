"""``plt-generate`` / ``load_for_generation``: a PLT checkpoint trained with PP=2 loads into
one process and generates.

The PP=2 checkpoint and a PP=1 checkpoint of the same run (same seed and data, equal to 1e-5
by the parity tests) must load to the same weights: that checks resharding of the looped
model's layers across pipeline layouts, not just that loading runs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import DEBUG_ARGS, REPO, run_train

ARGS = DEBUG_ARGS + ["model.name=plt", "model.loops=2", "model.loop.window=8", "train.steps=3",
                     "checkpoint.save_at_end=true"]

COMPARE = """
import sys, torch
from plt_train.generate import load_for_generation
a, _ = load_for_generation(sys.argv[1])
wa = {n: p.detach().clone() for n, p in a.model.named_parameters()}
b, _ = load_for_generation(sys.argv[2])
diff = max((p - wa[n]).abs().max().item() for n, p in b.model.named_parameters())
print("MAXDIFF", diff, len(wa))
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(29700 + os.getpid() % 200), "RANK": "0", "WORLD_SIZE": "1",
            "LOCAL_RANK": "0"}


def test_generate_from_pipeline_checkpoint(tmp_path, data_cache):
    pp2, pp1 = tmp_path / "pp2", tmp_path / "pp1"
    run_train(pp2, ARGS + ["parallel.pipeline=2"], nproc=2)
    run_train(pp1, ARGS, nproc=1)
    cmp = subprocess.run([sys.executable, "-c", COMPARE, str(pp2), str(pp1)], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=300)
    line = [x for x in cmp.stdout.splitlines() if x.startswith("MAXDIFF")]
    assert line, cmp.stderr[-3000:]
    diff, count = float(line[0].split()[1]), int(line[0].split()[2])
    assert count > 10 and diff < 1e-5, line

    gen = subprocess.run([sys.executable, "-m", "plt_train.generate", str(pp2),
                          "--prompt", "import os", "--prompt", "def f(x):",
                          "--max-new-tokens", "12", "--cuda-graph", "auto", "--kernel", "torch"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    outputs = [x for x in gen.stdout.splitlines() if "\u2502" in x]
    assert [x.split("\u2502")[0] for x in outputs] == ["import os", "def f(x):"]
    assert "plt loops=2: " in gen.stderr
    # --cuda-graph auto: replayed from a CUDA graph on a GPU (a dense model), eager on CPU
    assert f"decode steps {'graph' if torch.cuda.is_available() else 'eager'}" in gen.stderr


def _fake_run(root, overrides):
    """A run directory as training leaves it (its saved config), without checkpoints."""
    from omegaconf import OmegaConf

    from tests.helpers import compose_run

    (root / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(compose_run(DEBUG_ARGS + overrides)),
                   root / ".hydra" / "config.yaml")
    return root


@pytest.mark.parametrize("case, words", [
    ("missing", "run directory {run} does not exist"),
    ("no_config", "{run} is not a run directory (no .hydra/config.yaml)"),
    ("no_checkpoint", "no checkpoint under {run}"),
    ("bad_checkpoint", "checkpoint.load: {run}/nowhere does not exist"),
    ("tokens", "--max-new-tokens must be >= 1, got 0"),
    ("empty_prompt", "--prompt is empty"),
    ("top_p", "--top-p must be in (0, 1], got 0.0"),
])
def test_cli_errors_are_one_line(case, words, tmp_path, monkeypatch, capsys):
    """Each used to end in a traceback (FileNotFoundError, AttributeError 'kind', ...)."""
    from plt_train.generate import main

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)  # main() sets them; restored after the test
    run = tmp_path / "run"
    if case == "no_config":
        run.mkdir()
    elif case != "missing":
        _fake_run(run, ["model.name=plt", "model.loops=2"])
    argv = [str(run), "--prompt", "x"]
    argv += {"tokens": ["--max-new-tokens", "0"], "empty_prompt": ["--prompt", ""],
             "top_p": ["--top-p", "0"],
             "bad_checkpoint": ["--checkpoint", str(run / "nowhere")]}.get(case, [])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert words.format(run=run) in err and "Traceback" not in err


def test_a_gpt_run_generates_with_the_kv_cache(tmp_path, data_cache):
    """``model.name=gpt`` runs (megatron's GPTModel) used to be refused (an AttributeError
    before that): their checkpoint decodes through the vanilla decoder, the same weights,
    and training's end-of-run sample works for them too."""
    trained = run_train(tmp_path, DEBUG_ARGS + ["model.name=gpt", "train.steps=2",
                                      "checkpoint.save_at_end=true", "sample.prompt=import",
                                      "sample.max_new_tokens=4", "sample.temperature=0"])
    gen = subprocess.run([sys.executable, "-m", "plt_train.generate", str(tmp_path),
                          "--prompt", "import", "--max-new-tokens", "4"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "gpt (decoded as vanilla) loops=1: 4 tokens" in gen.stderr
    (line,) = [x for x in gen.stdout.splitlines() if "\u2502" in x]
    sample = [x for x in trained.stdout.splitlines() if "[plt_train] sample: " in x]
    # greedy both times, from the same weights: the same continuation
    assert sample and sample[0].endswith(f"-> {line.split(chr(0x2502))[1]!r}"), (sample, line)
