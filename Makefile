# Two commands for a fresh machine:
#   make train   set up, then pretrain the default model on the embedded corpus (2 processes)
#   make test    set up, then run the whole test suite (CI)
#   make test-unit   the unit tests alone (no torchrun, Slurm, emulated cluster or benchmark
#                    runs): a few minutes
PYTHON ?= python3
VENV ?= .venv
NPROC ?= 2
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test test-unit clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	PYTHON=$(BIN)/python NPROC_PER_NODE=$(NPROC) launch/torchrun.sh $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests -m "not distributed and not slurm and not cluster and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
