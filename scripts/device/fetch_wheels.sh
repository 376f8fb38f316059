#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU session: downloads the Python 3.12 wheels the lent
# GPU machine lacks (it has torch 2.11, numpy, tokenizers, psutil, pytest, matplotlib, tqdm; no
# internet) into .whl/ (git-ignored), to be named in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any -d .whl)
$PY -m pip download "${common[@]}" megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 \
    PyYAML
# antlr4-python3-runtime 4.9.3 (hydra's parser runtime) is published as an sdist only; it is
# pure Python, so a wheel built here installs there.
$PY -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
