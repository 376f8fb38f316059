"""How far the shared block moves each loop's input at init: the scale check behind
``model.loop.norm_between_loops`` (issue 19, part 4; docs/benchmarks.md).

For each form of feeding a loop's output on (looped fed raw or normed; PLT normed at
``hidden_scale`` 0.05 or raw at 1.0) and each block depth, builds the model at init
(``init_method_std`` 0.02, as every comparison in ``plt_quality.py``), runs one batch of
random tokens through loop 1 and loop 2, and prints the RMS of each loop's input and of the
block's update to it.  A loop whose update is a small fraction of its input barely changes
it: that is what the normed feed does to a looped model's loop 2.

    python scripts/loop_input_scales.py [--hidden 128] [--layers 1 2] [--out F.json]

Writes a list of records (form, layers, loop, input_rms, update_rms, ratio).  Random weights
and tokens from fixed seeds, one process, a few seconds.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

FORMS = {  # name: (model.name, LoopConfig overrides)
    "looped, raw (default)": ("looped", {"norm_between_loops": False}),
    "looped, normed": ("looped", {"norm_between_loops": True}),
    "plt, normed x 0.05 (default)": ("plt", {"norm_between_loops": True, "hidden_scale": 0.05}),
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


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None, help="JSON file for the records")
    args = ap.parse_args(argv)

    from plt_train.runtime import detect_device, init_distributed, set_seed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29547", "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    device = detect_device()
    init_distributed(device)
    set_seed(0)
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
