# Two entry points: `make run` (the main job) and `make test` (the test suite). Both create and reuse a
# virtual environment in $(VENV) and install the CPU build of torch 2.13.0 plus this package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) "$(TORCH_SPEC)" numpy
	$(PIP) --no-deps -e .

run: install
	$(PIP) matplotlib tqdm "jax>=0.6.1" chex
	$(PY) experiments/train_moe.py

test: install
	$(PIP) pytest "jax>=0.6.1" chex triton matplotlib tqdm
	$(PY) -m pytest -q
