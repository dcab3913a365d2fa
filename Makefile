# The two commands of the README: `make demo` (main job on the embedded data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,export,slurm]'
	touch $@

demo: setup
	$(PY) -m ced_train +recipe=tiny_distill

test: setup
	$(PY) -m pytest

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done
