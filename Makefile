# The two commands of the README:  make demo  and  make test.
# Each creates the virtual environment it needs from nothing, installs, and runs.

PYTHON ?= python3
VENV   ?= .venv
# The torch pair is pinned together (torchvision must match torch's build).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# make test runs the suite in this many pytest-xdist workers, a whole test file to each (module fixtures such
# as test_pods' S3 server, and the control plane, start once). Much of the suite waits on servers, controllers
# and child processes: on two cores, two workers took 670 s and three 616 s where one takes about 19 minutes.
TEST_WORKERS ?= 3
# make bench BENCH_ARGS=--full: the benchmarks at their documented sizes (about 20 minutes on two cores).
BENCH_ARGS ?=

BIN := $(VENV)/bin

.PHONY: demo test test-fast controlplane bench image clean help

help:
	@echo "make demo   run the MNIST-1D and linreg sweeps locally and write the reports"
	@echo "make test   run the test suite (builds the cluster tests' Kubernetes control plane once per machine)"
	@echo "make test-fast  the tests not marked slow (a few minutes; no control plane)"
	@echo "make bench  run every benchmark under benchmarks/ at reduced sizes (BENCH_ARGS=--full: documented sizes)"
	@echo "make image  build the container image (needs Docker)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/critbatch demo

test: $(VENV)/.installed controlplane
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The cluster tests' Kubernetes control plane (tests/kube/README.md): built with Go once per machine into
# a cache outside the checkout, reused after that.
controlplane:
	@bash tests/kube/go/build.sh >/dev/null

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

image:
	images/build.sh

clean:
	rm -rf $(VENV) critbatch-out .pytest_cache
