"""``plt-preprocess`` against Megatron-LM's ``tools/preprocess_data.py``, side by side.

    python scripts/bench_preprocess.py --megatron-lm /path/to/Megatron-LM     # ~2 min
    python scripts/bench_preprocess.py                   # ours alone (no Megatron-LM checkout)

Same input (the embedded corpus's JSONL repeated ``--repeat`` times: 12.6 MB each), same
``tokenizer.json`` (the embedded corpus's BPE), eod appended, same cores: Megatron-LM with
``--workers`` processes, ours with the tokenizer's own thread pool.  Each tool runs
``--rounds`` times, alternating; the table has the median wall time (start-up included, as a
user waits for it), tokens per second from it, the peak memory of the whole process tree
(sampled every 50 ms with psutil: Megatron's workers are processes) and whether the two
outputs are byte-identical.

Megatron-LM's current tool imports its whole ``megatron/`` tree, which needs Python 3.12's
``typing.override``; on 3.11 a ``sitecustomize`` in a temporary directory (only on that
subprocess's ``PYTHONPATH``) supplies it from ``typing_extensions``.  Its tokenizer is the same
``tokenizer.json`` in a folder with a ``tokenizer_config.json`` (``HuggingFaceTokenizer``).
Every setting is pinned below.  Outputs: a table (printed last), ``--out`` JSON (a list of
records) and ``--plot`` PNG.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHIM = """import typing, typing_extensions
if not hasattr(typing, "override"):  # Python 3.12's, used by Megatron-LM's megatron/ tree
    typing.override = typing_extensions.override
"""


def log(msg: str) -> None:
    print(f"[bench_preprocess] {msg}", flush=True)


def run_measured(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak MiB of the process tree's summed RSS) of ``cmd``."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed ({proc.returncode}): {stderr[-2000:]}")
    return wall, peak / 2**20


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tokens_in(prefix: Path) -> int:
    from plt_train.data.datasets import read_index

    return read_index(str(prefix)).tokens


def run(args) -> list[dict]:
    from plt_train.data.corpus import ensure_corpus, read_jsonl_texts
    from plt_train.data.tokenizer import Tokenizer, train_bpe

    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    corpus = ensure_corpus(work)  # the embedded corpus's JSONL
    data = work / "input.jsonl"
    with open(data, "wb") as out:
        for _ in range(args.repeat):
            out.write(corpus.read_bytes())
    tok_dir = work / "tokenizer"
    tok_dir.mkdir()
    if args.tokenizer:
        shutil.copy(args.tokenizer, tok_dir / "tokenizer.json")
    else:
        train_bpe(read_jsonl_texts(corpus), 8192, tok_dir / "tokenizer.json")
    tokenizer = Tokenizer.load(tok_dir / "tokenizer.json")
    eod = tokenizer.hf.id_to_token(tokenizer.eod)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod, "bos_token": eod}))
    size_mb = data.stat().st_size / 1e6
    log(f"input {size_mb:.1f} MB ({args.repeat} x the embedded corpus), in {work}")

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tools = {"plt-preprocess": ([sys.executable, "-c",
                                 "import sys; from plt_train.data.preprocess import main; "
                                 "sys.exit(main())",
                                 "--input", str(data), "--output-prefix", str(work / "ours"),
                                 "--tokenizer", str(tok_dir / "tokenizer.json")],
                                {**env, "PYTHONPATH": str(REPO)}, REPO, work / "ours")}
    if args.megatron_lm:
        mlm = Path(args.megatron_lm).resolve()
        shim = work / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SHIM)
        tools["megatron-lm"] = (
            [sys.executable, str(mlm / "tools" / "preprocess_data.py"), "--input", str(data),
             "--output-prefix", str(work / "megatron"), "--tokenizer-type",
             "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir), "--workers",
             str(args.workers), "--append-eod"],
            {**env, "PYTHONPATH": f"{shim}:{mlm}"}, mlm, work / "megatron_text_document")
    runs: dict[str, list] = {name: [] for name in tools}
    for r in range(args.rounds):
        for name, (cmd, tool_env, cwd, _) in tools.items():
            wall, peak = run_measured(cmd, tool_env, cwd)
            runs[name].append((wall, peak))
            log(f"round {r + 1} {name}: {wall:.2f} s, peak {peak:.0f} MiB")
    records = []
    digests = {name: md5(Path(str(prefix) + ".bin")) + md5(Path(str(prefix) + ".idx"))
               for name, (*_, prefix) in tools.items()}
    for name, (*_, prefix) in tools.items():
        wall = statistics.median(w for w, _ in runs[name])
        tokens = tokens_in(prefix)
        records.append(dict(
            tool=name, input_mb=round(size_mb, 1), tokens=tokens, wall_s=round(wall, 2),
            walls_s=[round(w, 2) for w, _ in runs[name]], tokens_per_s=tokens / wall,
            peak_mib=round(max(p for _, p in runs[name])),
            workers=args.workers if name == "megatron-lm" else None,
            identical_to_ours=digests[name] == digests["plt-preprocess"],
            cores=os.cpu_count(), device=f"CPU ({platform.machine()})",
            python=platform.python_version(), date=time.strftime("%Y-%m-%d")))
    shutil.rmtree(work, ignore_errors=True)
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["tool"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [r["tokens_per_s"] / 1e6 for r in records])
    left.set_ylabel("M tokens / s (wall, start-up included)")
    right.bar(names, [r["peak_mib"] for r in records])
    right.set_ylabel("peak RSS of the process tree (MiB)")
    fig.suptitle(f"{records[0]['input_mb']} MB of JSONL, {records[0]['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(records: list[dict]) -> str:
    rows = [f"{'tool':>15} {'wall s':>7} {'M tok/s':>8} {'peak MiB':>9} {'identical':>9}"]
    for r in records:
        rows.append(f"{r['tool']:>15} {r['wall_s']:7.2f} {r['tokens_per_s'] / 1e6:8.3f} "
                    f"{r['peak_mib']:9d} {str(r['identical_to_ours']):>9}")
    by = {r["tool"]: r for r in records}
    if "megatron-lm" in by:
        ratio = by["plt-preprocess"]["tokens_per_s"] / by["megatron-lm"]["tokens_per_s"]
        rows.append(f"plt-preprocess / megatron-lm tokens/s: {ratio:.2f} (target >= 1.5)")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout (its tools/)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json (default: a BPE-8192 trained on the corpus)")
    p.add_argument("--repeat", type=int, default=6, help="copies of the 12.6 MB corpus")
    p.add_argument("--workers", type=int, default=2, help="Megatron-LM's worker processes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench_preprocess.json")
    p.add_argument("--plot", default="bench_preprocess.png", help="'' for no plot")
    args = p.parse_args(argv)
    records = run(args)
    Path(args.out).write_text(json.dumps(records, indent=1))
    if args.plot:
        plot(records, Path(args.plot))
    r = records[0]
    print(f"\n== {r['device']}, {r['cores']} cores, Python {r['python']}, {r['date']}: "
          f"{r['input_mb']} MB of JSONL, {r['tokens']:,} tokens")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
