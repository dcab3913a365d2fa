# The two commands of the README: `make demo` (main job on the embedded data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

FLOORS_VENV ?= .venv-floors
# The tests `make test-floors` runs against the oldest allowed releases: models, parity, export, HF layout, safe
# loading, store, shard format, a recipe's composition and the learning-free end-to-end run.
FLOORS_TESTS ?= tests/test_models.py tests/test_parity.py tests/test_tag_export.py tests/test_hf_layout.py \
	tests/test_safe_loading.py tests/test_store.py tests/test_shards_format.py tests/test_recipes.py tests/test_e2e.py

.PHONY: setup demo test bench test-floors

setup: $(VENV)/.installed

# constraints.txt: the exact versions CI tested.
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,export,slurm,official]'
	touch $@

# Not part of CI (a second torch install, several GB): the dependency floors of pyproject.toml, installed exactly.
test-floors:
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PYTHON) -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	reqs = p['dependencies'] + [r for extra in ('dev', 'export', 'slurm', 'official') for r in p['optional-dependencies'][extra]]; \
	print('\n'.join(re.sub(r'>=', '==', r) for r in reqs if '>=' in r))" > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c $(FLOORS_VENV)/floors.txt -e '.[dev,export,slurm,official]'
	$(FLOORS_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|lightning|numpy|timm|onnxruntime)=='
	$(FLOORS_VENV)/bin/python -m pytest -q $(FLOORS_TESTS)

demo: setup
	$(PY) -m ced_train +recipe=tiny_distill

test: setup
	$(PY) -m pytest

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done
