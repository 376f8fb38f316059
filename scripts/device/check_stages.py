"""Check, on CPU, that every stage of ``scripts/device/gpu_check.sh`` would start: the script
it runs exists and accepts its arguments, so the GPU script cannot rot between GPU sessions.

    DRY_RUN=1 W=/tmp/w bash scripts/device/gpu_check.sh && python scripts/device/check_stages.py /tmp/w/commands.tsv

Each ``python3 scripts/X.py ...`` stage: the script is imported and its ``main`` run with
argparse stopped right after a successful parse (an unknown or malformed flag exits 2 as it
would on the GPU); a script with a ``model_config(args)`` (``bench_train.py``) also builds
the model config its ``--set`` describes.  Each ``python3 -m pytest ...`` stage: every path it
names exists.  Prints one line per stage; exit status 1 if any fails.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class _Parsed(Exception):
    def __init__(self, args):
        self.args_ = args


@contextlib.contextmanager
def _stop_after_parse():
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def check_script(path: Path, args: list[str]) -> str | None:
    """None if ``path`` parses ``args``, else why not."""
    if not path.is_file():
        return f"{path} does not exist"
    spec = importlib.util.spec_from_file_location(f"_stage_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [str(path), *args]
    err = io.StringIO()
    try:
        spec.loader.exec_module(module)
        with _stop_after_parse(), contextlib.redirect_stderr(err):
            module.main()
        return "main() returned without parsing arguments"
    except _Parsed as parsed:
        if hasattr(module, "model_config"):
            try:
                module.model_config(parsed.args_)
            except Exception as exc:  # a bad --set key or value
                return f"--set: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return None
    except SystemExit as exc:
        return f"exit {exc.code}: {err.getvalue().strip().splitlines()[-1:]}"
    finally:
        sys.argv = argv


def check_pytest(args: list[str]) -> str | None:
    paths, after_flag = [], False
    for word in args:
        if word == "--deselect":
            after_flag = True
            continue
        if not word.startswith("-"):
            paths.append(word.split("::")[0])
        after_flag = False
    missing = [p for p in paths if not (REPO / p).exists()]
    return f"missing {missing}" if missing else None


def check(words: list[str]) -> str | None:
    if words[:3] == ["python3", "-m", "pytest"]:
        return check_pytest(words[3:])
    if words[0] == "python3" and words[1].endswith(".py"):
        return check_script(REPO / words[1], words[2:])
    return f"no check for {' '.join(words[:3])}"


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:])[0])
    failed = 0
    for line in path.read_text().splitlines():
        name, *words = line.split("\t")
        why = check(words)
        failed += why is not None
        print(f"{name:24} {'ok' if why is None else 'FAILED: ' + why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
