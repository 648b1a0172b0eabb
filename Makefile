# Two entry points for a fresh machine: `make train` (the main job) and `make test` (lint, the manual, the tests).
# Both create .venv in the repo root on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps the install small; on a GPU machine use the torch build that matches your CUDA.
TORCH ?= torch==2.13.0

.PHONY: install train test test-fast lint bench docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-offline.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[demo,test,bench,docs]"
	$(BIN)/pip install --quiet --no-deps -r requirements-offline.txt
	touch $@

install: $(VENV)/.installed

train: install
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/train.py $(ARGS)

# The benchmark against full fine-tuning and the peers, rate grid and seeds (several hours on 2 idle CPU cores;
# resumable): writes experiments/results/benchmark.md and its plots. ARGS="suite=tweets methods=[full,hift]" for a
# part.
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/benchmark.py $(ARGS)

lint: install
	$(BIN)/ruff check lightning_hift tests experiments docs/hooks
	$(BIN)/ruff format --check lightning_hift tests experiments docs/hooks
	$(BIN)/mypy

# The core tests drive a Trainer; they run again on the older `pytorch_lightning` package (tests/helpers/lightning.py).
CORE_TESTS := tests/test_strategy.py tests/test_resume.py tests/test_precision.py tests/test_faults.py \
	tests/test_bad_input.py tests/test_memory.py tests/test_features.py tests/test_drop_in.py tests/test_lr.py \
	tests/test_closure_calls.py tests/test_budget.py

# The edit-test loop: unit tests and doctests on tiny models (under a minute on 2 cores).
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "not integration and not slow and not gpu" $(ARGS)

# The manual into site/; warnings (a broken link, a missing reference, a docstring that does not parse) fail it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(ARGS)
	HF_HUB_OFFLINE=1 HIFT_TEST_LIGHTNING=pytorch_lightning $(BIN)/pytest -m "not slow" $(CORE_TESTS) $(ARGS)
