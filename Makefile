# The README's two commands. Both build the virtual environment from scratch on a
# fresh machine; torch is pinned to the CPU 2.13.0 wheel so pip never pulls CUDA.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export WANDB_MODE ?= offline
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-all bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Prepares the embedded corpus, prints the mixture plan, trains the tiny LM with Cooldown
# and prints a per-language table; outputs under outputs/<date>/<time>/.
demo: $(STAMP)
	$(PY) -m pipeline.train experiment=demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) scripts/bench_sampler.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache outputs multirun
