# `make demo` runs the quickstart transfer experiment; `make test` runs the test suite.
# Both set up everything first: a virtual environment in .venv with the pinned packages, and
# Fashion-MNIST from Debian's dataset-fashion-mnist package.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Outside CI the slow end-to-end and large-model tests are left out; CI runs them too, all but
# the exhaustive reference sweeps (every Keras architecture), which `make test-all` adds.
PYTEST_ARGS ?= $(if $(CI),-m "not exhaustive",-m "not slow")

.PHONY: demo test test-all setup data

demo: setup data
	$(PY) -m scripts.ablate --config configs/quickstart.py --workdir runs/quickstart

test: setup data
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-all: setup data
	$(PY) -m pytest -q --durations=15

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,reference]"
	rm -f $(VENV)/.installed-* && touch $@

data:
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || [ -f $(FASHION_MNIST)/train-images-idx3-ubyte ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or put the"; \
	  echo "four IDX files in a directory and pass data.idx_dir=DIR in the config (see README)."; \
	  exit 1; \
	fi
