"""How far the shared block moves each loop's input at init: the scale check behind
``model.loop.norm_between_loops`` (issue 19, part 4; docs/benchmarks.md).

For each form of feeding a loop's output on (looped fed raw or normed; PLT normed at
``hidden_scale`` 0.02 or raw at 1.0) and each block depth, builds the model at init
(``init_method_std`` 0.02, as every comparison in ``plt_quality.py``), runs one batch of
random tokens through loop 1 and loop 2, and prints the RMS of each loop's input and of the
block's update to it.  A loop whose update is a small fraction of its input barely changes
it: that is what the normed feed does to a looped model's loop 2.

    python scripts/loop_input_scales.py [--hidden 128] [--layers 1 2] [--out F.json]

Writes a list of records (form, layers, loop, input_rms, update_rms, ratio).  Random weights
and tokens from fixed seeds, one process, a few seconds.

``--runs RUN_DIR ...`` measures trained PLT runs instead: for each checkpoint of each run,
the two parts of loop 2's input, ``emb_scale * Embed(x_i)`` and ``hidden_scale *
fed(h_{i-1})`` (``fed``: the final norm or nothing, ``norm_between_loops``), as RMS over the
first sequences of the run's own training data.  A raw feed lets the second part grow with
loop 1's residual stream during training until the current token's embedding is a small
part of loop 2's input (records: run, step, emb_rms, fed_rms, ratio).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

FORMS = {  # name: (model.name, LoopConfig overrides)
    "looped, raw (default)": ("looped", {"norm_between_loops": False}),
    "looped, normed": ("looped", {"norm_between_loops": True}),
    "plt, normed x 0.02 (default)": ("plt", {"norm_between_loops": True, "hidden_scale": 0.02}),
    "plt, normed x 0.05": ("plt", {"norm_between_loops": True, "hidden_scale": 0.05}),
    "plt, raw x 1.0": ("plt", {"norm_between_loops": False, "hidden_scale": 1.0}),
}


def measure(form: str, layers: int, hidden: int, heads: int, device) -> list[dict]:
    import torch

    from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
    from plt_train.models import build_model
    from plt_train.runtime.device import megatron_device_kwargs

    name, loop = FORMS[form]
    seq, vocab = 256, 8192
    m = ModelConfig(name=name, loops=2, num_layers=layers, hidden_size=hidden,
                    num_attention_heads=heads, seq_length=seq, init_method_std=0.02,
                    tie_embeddings=False, loop=LoopConfig(**loop))
    chunks, _, _ = build_model(m, ParallelConfig(), vocab, torch.float32,
                               megatron_device_kwargs(device), 1, device.device)
    model = chunks[0].eval()
    tokens = torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(0))
    rms = lambda t: float(t.float().pow(2).mean().sqrt())  # noqa: E731
    records = []
    with torch.no_grad():
        emb = model.embed(tokens, torch.arange(seq)[None])
        rope, x = model.rotary_pos_emb(seq), emb
        for loop_index in range(2):
            model.loop_state.begin(loop_index)
            h = model.run_block(x, rope)
            records.append({"form": form, "layers": layers, "hidden": hidden,
                            "loop": loop_index + 1, "input_rms": rms(x),
                            "update_rms": rms(h - x), "ratio": rms(h - x) / rms(x)})
            x = model.next_loop_input(emb, model.between_loops(h))
    return records


def loop2_input_parts(model, tokens):
    """(``emb_scale * Embed(x)``, ``hidden_scale * shift(fed(h1))``) of a PLT ``model``: the
    two terms whose sum is its loop 2's input (``next_loop_input``)."""
    import torch

    seq = tokens.shape[1]
    with torch.no_grad():
        emb = model.embed(tokens, torch.arange(seq)[None])
        model.loop_state.begin(0)
        h = model.run_block(emb, model.rotary_pos_emb(seq))
        previous = model.shift(model.between_loops(h))
    return model.opts.emb_scale * emb, model.opts.hidden_scale * previous


def first_sequences(prefix: str, count: int, seq: int):
    """``count`` sequences of ``seq`` tokens: the dataset's first documents, concatenated."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs, need, got, have = IndexedDataset(prefix), count * seq, [], 0
    for i in range(len(docs)):
        got.append(np.asarray(docs[i], dtype=np.int64))
        have += len(got[-1])
        if have >= need:
            return torch.from_numpy(np.concatenate(got)[:need].reshape(count, seq))
    raise SystemExit(f"{prefix} holds fewer than {need} tokens")


def measure_runs(run_dirs: list[str], sequences: int = 8) -> list[dict]:
    """The two parts of loop 2's input at every checkpoint of each trained PLT run."""
    from plt_train.config.schema import ModelName
    from plt_train.data import prepare_data
    from plt_train.generate import load_trained

    rms = lambda t: float(t.float().pow(2).mean().sqrt())  # noqa: E731
    records = []
    for run in map(Path, run_dirs):
        checkpoints = sorted((run / "checkpoints").glob("step_*[0-9]"))
        if not checkpoints:
            raise SystemExit(f"{run}: no checkpoints (a run dir with checkpoints/step_*)")
        tokens = None  # the run's data and shape: read once, for every checkpoint
        for ckpt in checkpoints:
            chunk, cfg, _, _ = load_trained(run, checkpoint=str(ckpt))
            if cfg.model.name != ModelName.plt or cfg.model.loops < 2:
                raise SystemExit(f"{run} is a {cfg.model.name} model with {cfg.model.loops} "
                                 "loops: --runs splits a PLT's later-loop input")
            if tokens is None:
                tokens = first_sequences(prepare_data(cfg.data).prefix, sequences,
                                         cfg.model.seq_length)
            emb, fed = loop2_input_parts(chunk.eval(), tokens)
            emb, fed = emb[1:], fed[1:]  # position 0 has no previous token
            records.append({"run": str(run), "step": int(ckpt.name.split("_")[1]),
                            "hidden_scale": cfg.model.loop.hidden_scale,
                            "normed": chunk.normed_feed, "emb_rms": rms(emb),
                            "fed_rms": rms(fed), "ratio": rms(fed) / rms(emb)})
    return records


def print_runs(records: list[dict]) -> None:
    print(f"{'run':<40}{'step':>7}{'feed':>16}{'Embed RMS':>11}{'fed RMS':>9}{'fed/Embed':>11}")
    for r in records:
        feed = f"{'normed' if r['normed'] else 'raw'} x {r['hidden_scale']:g}"
        print(f"{Path(r['run']).name[-40:]:<40}{r['step']:>7}{feed:>16}{r['emb_rms']:>11.3f}"
              f"{r['fed_rms']:>9.3f}{r['ratio']:>11.2f}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None, help="JSON file for the records")
    ap.add_argument("--runs", nargs="+", default=None, metavar="RUN_DIR",
                    help="trained PLT runs: split loop 2's input at each checkpoint")
    args = ap.parse_args(argv)

    from plt_train.runtime import detect_device, init_distributed, set_seed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29547", "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    device = detect_device()
    init_distributed(device)
    set_seed(0)
    if args.runs:
        records = measure_runs(args.runs)
        print_runs(records)
        if args.out:
            Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
        return records
    records = [r for form in FORMS for layers in args.layers
               for r in measure(form, layers, args.hidden, args.heads, device)]
    print(f"{'form':<30}{'layers':>7}{'loop':>5}{'input RMS':>11}{'update RMS':>12}"
          f"{'update/input':>14}")
    for r in records:
        print(f"{r['form']:<30}{r['layers']:>7}{r['loop']:>5}{r['input_rms']:>11.3f}"
              f"{r['update_rms']:>12.3f}{r['ratio']:>14.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
