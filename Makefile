# Entry points on a fresh machine: `make demo` (the main job), `make test` (what CI runs) and
# `make results` (every suite; rewrites docs/results.md and the README's results blocks).
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN := torch==2.13.0
SUITES ?= demo fogzo-mnist hyperste lsq-mnist new-methods curriculum fashion-resnet kjv-llama
# one torch thread per process: the commands run their work in one process per core
export OMP_NUM_THREADS := 1

.PHONY: demo test test-fast results lint install-demo install-dev datasets bench learned-plots

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
	$(PIP) install -q -e '.[data,plot,dev,all]'

demo: install-demo
	$(PYTHON) -m metaste.bench.cli compare --suite demo --out results

# the default tests, then the slow ones (2-process torch.distributed runs)
test: install-dev
	$(PYTHON) -m pytest -n 2 --dist worksteal -m "not slow" -q
	$(PYTHON) -m pytest -n 2 --dist worksteal -m slow -q

test-fast: install-dev
	$(PYTHON) -m pytest -n 2 --dist worksteal -m "not slow" -q

results: install-demo
	for s in $(SUITES); do $(PYTHON) -m metaste.bench.cli compare --suite $$s --out docs/results || exit 1; done
	$(PYTHON) -m metaste.bench.cli report --results docs/results --doc docs/results.md --readme README.md

lint:
	ruff check metaste tests examples benchmarks
	ruff format --check metaste tests examples benchmarks

# the cost benchmarks; rewrites the README's cost block (about 10 minutes on 2 cores)
bench:
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/run_all.py --readme README.md --json benchmarks/cost.json

# the plots of what PEGE, JacQuant and the calibrated surrogate learn (docs/methods/*.png; about a minute)
learned-plots: install-demo
	$(PYTHON) -m metaste.bench.learned --out docs/methods
