# The README's two commands. Both build the virtual environment from scratch on a fresh
# machine, from requirements.lock only (exact versions and hashes, Python 3.11, Linux x86_64).
# torch is the CPU wheel torch==2.13.0+cpu: taken from $(TORCH_WHEELS) when that folder exists
# (it does on this project's machines), else from PyTorch's CPU index.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
UV          := $(VENV)/bin/uv
UV_VERSION  := 0.13.9
STAMP       := $(VENV)/.installed
LOCK        := requirements.lock
TORCH_WHEELS ?= /opt/wheels
TORCH_INDEX  ?= https://download.pytorch.org/whl/cpu
PYPI_INDEX   ?= https://pypi.org/simple
TORCH_SOURCE := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)

export WANDB_MODE ?= offline
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-all bench lint lock clean

# deepspeed ships only an sdist; building it against the venv's own torch (no isolation)
# keeps uv from fetching a second, CUDA torch just to build it.
$(STAMP): $(LOCK) pyproject.toml Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install --quiet --python $(PY) --require-hashes -r $(LOCK) \
	    --index-url $(PYPI_INDEX) $(TORCH_SOURCE) --no-build-isolation-package deepspeed
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# Prepares the embedded corpus, prints the mixture plan, trains the tiny LM with Cooldown
# and prints a per-language table; outputs under outputs/<date>/<time>/.
demo: $(STAMP)
	$(PY) -m pipeline.train experiment=demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) scripts/bench_sampler.py

# The sampler benchmark with its peer baselines, installed outside $(VENV) so its CPU torch stays:
# torchdata (pure Python) into a --target folder on PYTHONPATH; mosaicml-streaming in a venv of its
# own (numpy<2.2; its import needs torchvision, on PyPI only as a CUDA build, so PyPI's torch 2.13.0
# CUDA build comes along, ~5 GB, run on CPU). Pass options with BENCH_ARGS="--num-sources 50 ...".
.PHONY: bench-baselines
bench-baselines: $(STAMP)
	$(UV) pip install --quiet --no-deps --require-hashes --target .cache/bench-baselines/site \
	    -r requirements-bench-baselines.lock --index-url $(PYPI_INDEX)
	test -x .cache/bench-baselines/streaming-venv/bin/python || \
	    $(UV) venv --quiet --python $(PYTHON) .cache/bench-baselines/streaming-venv
	$(UV) pip install --quiet --python .cache/bench-baselines/streaming-venv/bin/python --require-hashes \
	    -r requirements-bench-streaming.lock --index-url $(PYPI_INDEX)
	PYTHONPATH=.cache/bench-baselines/site $(PY) scripts/bench_sampler.py --baselines all \
	    --streaming-python .cache/bench-baselines/streaming-venv/bin/python $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Re-resolve the lock after changing dependencies in pyproject.toml (needs the registry).
lock:
	$(PYTHON) -m pip install --quiet uv==$(UV_VERSION)
	echo "torch==2.13.0+cpu" > .torch-constraint.txt
	$(PYTHON) -m uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --generate-hashes --index-url $(PYPI_INDEX) \
	    $(TORCH_SOURCE) -c .torch-constraint.txt --no-emit-find-links -o $(LOCK)
	rm -f .torch-constraint.txt

clean:
	rm -rf $(VENV) .cache outputs multirun
