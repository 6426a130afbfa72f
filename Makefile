# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN := torch==2.13.0
DEMO_ARGS ?= --task mnist-mlp --methods fp32,ste,fogzo,analytical,delayed-sgd --bits 2 --seeds 5

.PHONY: demo test test-all lint install-demo install-dev datasets

datasets:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || ! command -v bible >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist bible-kjv; \
	  else echo "note: run 'sudo apt-get install -y dataset-fashion-mnist bible-kjv' for the fashion/kjv tasks"; fi; \
	fi

install-demo: datasets
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[data,plot]'

install-dev: datasets
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[data,plot,dev]'

demo: install-demo
	metaste compare $(DEMO_ARGS)

test: install-dev
	$(PYTHON) -m pytest -n 2 -m "not slow" -q

test-all: install-dev
	$(PYTHON) -m pytest -n 2 -q

lint:
	ruff check metaste tests examples benchmarks
	ruff format --check metaste tests examples benchmarks
