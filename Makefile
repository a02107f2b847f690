# Set-up and everyday commands. Everything runs inside a virtual environment that the
# first command creates, so a fresh machine needs nothing but python3 (>= 3.10).
#
#   make lab     the main job: the lab's demo and comparison on real data (first run installs)
#   make test    install with the test extra and run the whole suite
#   make bench   speed and memory against the peer libraries
#   make lint    ruff
#
# TORCH_SPEC is installed before the package so that pip never resolves the plain
# `torch>=2.5` requirement to a multi-GB CUDA build on a CPU machine. The default is the
# CPU wheel these machines carry; on a GPU machine use e.g. `make test TORCH_SPEC=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test lab demo bench lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test,lab,bench,dev]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

lab: $(VENV)/.installed
	$(VENV)/bin/explore demo
	$(VENV)/bin/explore compare

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

bench: $(VENV)/.installed
	$(PY) -m benchmarks

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
