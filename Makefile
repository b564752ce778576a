# `make demo` runs the quickstart transfer experiment; `make test` runs the test suite.
# Both set up everything first: a virtual environment in .venv with the pinned packages,
# Fashion-MNIST from Debian's dataset-fashion-mnist package, and oneDNN's convolutions for the
# CPU (Debian's libdnnl-dev, built against jaxlib's FFI headers; see models/cpu/native.py).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Outside CI the slow end-to-end and large-model tests are left out; CI runs them too, all but
# the exhaustive reference sweeps (every Keras architecture), which `make test-all` adds.
PYTEST_ARGS ?= $(if $(CI),-m "not exhaustive",-m "not slow")
# Two workers, a test file each at a time: most tests wait on XLA's single-threaded compiler,
# so one pytest process kept the two cores about half busy.
WORKERS ?= -n 2 --dist loadfile
# The tests run with glibc's huge pages for large buffers (models/cpu/process.py), which glibc
# reads only at start-up; the demo runs in a plain process.
test test-all: export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test test-all setup data onednn

# The demo pretrains, publishes the pretrained network, verifies the published directory and
# transfers from it (research/publish.py; README: "Publishing a checkpoint").
QUICKSTART := runs/quickstart
demo: setup data onednn
	$(PY) -m scripts.train --config configs/quickstart_pretrain.py --workdir $(QUICKSTART)/pretrain
	rm -rf $(QUICKSTART)/published
	$(PY) -m scripts.publish --workdir $(QUICKSTART)/pretrain --output $(QUICKSTART)/published
	$(PY) -m scripts.verify $(QUICKSTART)/published
	$(PY) -m scripts.ablate --workdir $(QUICKSTART) \
	  --config configs/quickstart.py:pretrain.init.checkpoint=$(QUICKSTART)/published

test: setup data onednn
	$(PY) -m pytest -q --durations=15 $(WORKERS) $(PYTEST_ARGS)

test-all: setup data onednn
	$(PY) -m pytest -q --durations=15 $(WORKERS)

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,reference]"
	rm -f $(VENV)/.installed-* && touch $@

# Without oneDNN (not root, no apt-get), convolutions stay XLA's: slower on the CPU, same values.
# CI stops there instead, so that the oneDNN tests never skip.
onednn: setup
	@if [ ! -f /usr/include/oneapi/dnnl/dnnl.hpp ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq libdnnl-dev || (apt-get update -qq && apt-get install -y -qq libdnnl-dev)) >/dev/null; \
	fi
	@$(PY) -c "from models.cpu import native; print(native.build_library())" || { \
	  echo "oneDNN is not available: 'sudo apt-get install libdnnl-dev' for faster CPU convolutions."; \
	  [ -z "$(CI)" ]; }

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
